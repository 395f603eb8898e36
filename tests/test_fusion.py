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


class _ConvReadTwiceFaintly(_ConvReadTwice):
    """The second read of the conv output weighs 1/1000: folding bn changes the output by ~1e-3 of its size."""

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + 1e-3 * y


class _InplaceBetween(_ConvReadTwice):
    def forward(self, x):
        y = self.conv(x)
        return self.bn(y.clamp_(min=0))  # the same tensor object, other values


class _Dict(nn.Module):
    """A dict output (as Hugging Face models return), with a conv read twice in one branch only."""

    def __init__(self):
        super().__init__()
        self.bad, self.good = _ConvReadTwice(), nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))

    def forward(self, x):
        return {"a": self.good(x), "b": [self.bad(x)]}


@pytest.mark.parametrize("cls", [_ConvReadTwice, _ConvReadTwiceFaintly, _InplaceBetween])
def test_a_fold_the_trace_cannot_see_through_is_caught_by_the_check(cls):
    model = _randomise_bn(cls())
    out, info = fold_for_inference(model, torch.randn(2, 3, 8, 8))
    assert out is model and info["batchnorm"] == 0 and not info["checked"] and "no fold agreed" in info["why"]


def test_only_the_folds_that_pass_alone_are_kept_and_dict_outputs_are_checked():
    model = _randomise_bn(_Dict())
    x = torch.randn(2, 3, 8, 8)
    out, info = fold_for_inference(model, x)
    assert info == {"batchnorm": 1, "pad": 0, "checked": True, "why": ""}
    assert isinstance(out.good[1], nn.Identity) and isinstance(out.bad.bn, nn.BatchNorm2d)
    with torch.no_grad():
        a, b = model(x), out(x)
    assert torch.allclose(a["a"], b["a"], atol=1e-5) and torch.equal(a["b"][0], b["b"][0])


def test_a_kept_container_whose_output_is_the_conv_output_keeps_it(monkeypatch):
    import copy
    import types
    from neuroscribe import fusion
    copies = []
    monkeypatch.setattr(fusion, "copy", types.SimpleNamespace(deepcopy=lambda m: copies.append(m) or copy.deepcopy(m)))
    model = _randomise_bn(nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3)), nn.BatchNorm2d(4), nn.ReLU(),
                                        nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))
    out, info = fold_for_inference(model, torch.randn(2, 3, 8, 8), keep=["0"])
    assert info["batchnorm"] == 1 and isinstance(out[1], nn.BatchNorm2d) and isinstance(out[4], nn.Identity)
    assert len(copies) == 1  # left out when planned (the trace saw it), not after a failed check and one try per fold


def test_norms_with_more_than_a_norm_half_precision_and_affine_free_norms():
    timm = pytest.importorskip("timm")
    x = torch.randn(2, 3, 8, 8)
    act = _randomise_bn(nn.Sequential(nn.Conv2d(3, 4, 3), timm.layers.BatchNormAct2d(4, act_layer=nn.ReLU6)))
    wide = x * 8  # the activation exercised at both ends
    out, info = fold_for_inference(act, wide)  # timm's norm + activation: the norm folded, its drop and act kept
    assert info["batchnorm"] == 1 and isinstance(out[1].act, nn.ReLU6) and isinstance(out[1].drop, nn.Identity)
    kept, info = fold_for_inference(act, wide, keep=["1.act"])  # the activation's own name still resolves
    assert info["batchnorm"] == 1 and isinstance(kept[1].act, nn.ReLU6)

    class Same(timm.layers.BatchNormAct2d):  # a subclass keeping timm's forward: folded like it
        pass
    same = _randomise_bn(nn.Sequential(nn.Conv2d(3, 4, 3), Same(4, act_layer=nn.ReLU6)))
    assert fold_for_inference(same, wide)[1]["batchnorm"] == 1
    with torch.no_grad():
        want = act(wide)
        assert want.min() == 0 and want.max() == 6
        assert torch.allclose(want, out(wide), atol=1e-5)

    class Scaled(timm.layers.BatchNormAct2d):  # a subclass with its own forward: more than a norm, left alone
        def forward(self, x):
            return super().forward(x) * 2
    scaled = _randomise_bn(nn.Sequential(nn.Conv2d(3, 4, 3), Scaled(4)))
    out, info = fold_for_inference(scaled, x)
    assert out is scaled and info["why"] == "nothing to fold"
    half = _randomise_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).half()
    out, info = fold_for_inference(half, x.half())
    assert out is half and "float32" in info["why"]
    bare = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4, affine=False)).eval()
    bare[1].running_mean.uniform_(-1, 1)
    bare[1].running_var.uniform_(0.5, 2)
    out, info = fold_for_inference(bare, x)
    assert info["batchnorm"] == 1
    with torch.no_grad():
        assert torch.allclose(bare(x), out(x), atol=1e-5)


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


def test_the_taggers_classifier_runs_on_a_folded_copy():
    pytest.importorskip("efficientnet_lite_pytorch")
    from neuroscribe.datasets.probe import sample_root
    from neuroscribe.describe.offline import ImageNetClassifier
    from PIL import Image
    clf = ImageNetClassifier("efficientnet-lite0", torch.device("cpu"))
    photos = [Image.open(p).convert("RGB") for p in sorted((sample_root() / "val").rglob("*.jpg"))[::25]]
    p = clf(photos)
    assert clf._module is not clf.lm.module
    assert not any(isinstance(m, nn.BatchNorm2d) for m in clf._module.modules())
    x = torch.stack([clf.transform(im) for im in photos])
    with torch.no_grad():
        want = torch.softmax(clf.lm.module(x), 1).numpy()
    assert abs(p - want).max() < 1e-4 and (p.argmax(1) == want.argmax(1)).all()


def test_channels_last_nests_without_converting_again():
    """An inner block on a module already in the layout converts nothing and leaves it so; the outer one restores."""
    from neuroscribe.models import channels_last
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    nhwc = lambda: m[0].weight.is_contiguous(memory_format=torch.channels_last) and not m[0].weight.is_contiguous()
    with channels_last(m) as outer:
        assert outer and nhwc()
        w = m[2].weight.data_ptr()
        with channels_last(m) as inner:
            assert inner and m[2].weight.data_ptr() == w  # no copy of the weights
        assert nhwc() and m[2].weight.data_ptr() == w  # still in the layout after the inner block
        with channels_last(m, enable=False) as off:
            assert not off  # not asked for: the caller's inputs stay as they are
    assert m[0].weight.is_contiguous() and not nhwc()
    with channels_last(m) as again:  # left the outer block: converted again, restored again
        assert again and nhwc()
    assert not nhwc()
    with channels_last(nn.Linear(3, 2)) as on:
        assert not on
