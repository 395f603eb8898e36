"""Ablation: hooks really zero/mean the unit (checked against hand-edited copies), permanent edits match the hooks,
ViT tokens, errors for bad layers/units, and saving an edited model as a loadable checkpoint."""
import copy
import json
import warnings

import pytest
import torch
from torch import nn

from neuroscribe.ablate.edit import (
    ABLATION_ATTR,
    UnitIndexError,
    ablated,
    ablation_edits,
    as_unit_dict,
    permanent_edit,
    save_edited,
)
from neuroscribe.hooks import UnknownLayerError, trace
from neuroscribe.models import load_model


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    m = load_model("torchvision:resnet18@none", num_classes=10).module.eval()
    with torch.no_grad():  # non-trivial BN statistics and affine terms, so a wrong edit shows
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    return m


@pytest.fixture(scope="module")
def x():
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _run(m, x):
    with torch.no_grad():
        return m(x)


class _Capture:
    """A copy of a module's output as the next layer receives it (after our edit hook, before in-place ops such as
    ResNet's ``out += identity`` or ``ReLU(inplace=True)`` change the tensor that ``trace`` retained)."""

    def __init__(self, module):
        self.module, self.out = module, None

    def __enter__(self):
        self.h = self.module.register_forward_hook(lambda _m, _i, o: setattr(self, "out", o.detach().clone()))
        return self

    def __exit__(self, *exc):
        self.h.remove()


def test_zero_bn_channels_equals_hand_edited_copy(resnet, x):
    hand = copy.deepcopy(resnet)
    with torch.no_grad():
        hand.layer1[0].bn2.weight[[3, 5]] = 0
        hand.layer1[0].bn2.bias[[3, 5]] = 0
    base = _run(resnet, x)
    with ablated(resnet, {"layer1.0.bn2": [3, 5]}), _Capture(resnet.layer1[0].bn2) as cap:
        out = _run(resnet, x)
    assert torch.all(cap.out[:, [3, 5]] == 0) and not torch.all(cap.out[:, 4] == 0)
    torch.testing.assert_close(out, _run(hand, x), rtol=0, atol=1e-5)
    assert not torch.allclose(out, base)  # the ablation changed the logits
    assert not resnet.layer1[0].bn2._forward_hooks  # hooks gone
    torch.testing.assert_close(_run(resnet, x), base)


def test_zero_conv_channels_and_mean_bn_channels(resnet, x):
    hand = copy.deepcopy(resnet)
    with torch.no_grad():
        hand.layer2[0].conv1.weight[[0, 7, 100]] = 0  # conv without bias: output channel = 0
    with ablated(resnet, [("layer2.0.conv1", 100), ("layer2.0.conv1", 0), ("layer2.0.conv1", 7)]):
        out = _run(resnet, x)
    torch.testing.assert_close(out, _run(hand, x), rtol=0, atol=1e-5)

    means = {"layer3.1.bn1": torch.linspace(-1, 1, 256)}
    hand = copy.deepcopy(resnet)
    with torch.no_grad():
        hand.layer3[1].bn1.weight[[2, 9]] = 0
        hand.layer3[1].bn1.bias[[2, 9]] = means["layer3.1.bn1"][[2, 9]]
    with ablated(resnet, {"layer3.1.bn1": [2, 9]}, "mean", means), _Capture(resnet.layer3[1].bn1) as cap:
        out = _run(resnet, x)
    got = cap.out
    assert torch.all(got[:, 2] == means["layer3.1.bn1"][2]) and torch.all(got[:, 9] == means["layer3.1.bn1"][9])
    torch.testing.assert_close(out, _run(hand, x), rtol=0, atol=1e-5)


def test_flat_units_zero_and_mean(resnet, x):
    with ablated(resnet, {"fc": [2]}):
        out = _run(resnet, x)
    assert torch.all(out[:, 2] == 0)
    with ablated(resnet, {"fc": [2, 4]}, "mean", {"fc": torch.arange(10.0)}):
        out = _run(resnet, x)
    assert torch.all(out[:, 2] == 2.0) and torch.all(out[:, 4] == 4.0)


@pytest.mark.parametrize("layer,units", [("layer1.0.bn2", [3, 5]), ("layer2.0.conv1", [0, 7]), ("fc", [1])])
@pytest.mark.parametrize("method", ["zero", "mean"])
def test_permanent_edit_equals_hook_ablation(resnet, x, layer, units, method):
    width = {"layer1.0.bn2": 64, "layer2.0.conv1": 128, "fc": 10}[layer]
    means = {layer: torch.randn(width, generator=torch.Generator().manual_seed(2))} if method == "mean" else None
    before = copy.deepcopy(resnet.state_dict())
    if method == "mean" and layer == "layer2.0.conv1":  # no bias to hold the mean: falls back to a hook
        with pytest.warns(UserWarning, match="no bias"):
            edited = permanent_edit(resnet, {layer: units}, method, means)
        assert getattr(edited, ABLATION_ATTR)[layer]["how"] == "hook"
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            edited = permanent_edit(resnet, {layer: units}, method, means)
        assert getattr(edited, ABLATION_ATTR)[layer]["how"] == "weights"
    with ablated(resnet, {layer: units}, method, means):
        hooked = _run(resnet, x)
    torch.testing.assert_close(_run(edited, x), hooked, rtol=0, atol=1e-5)
    for k, v in resnet.state_dict().items():  # the original is untouched
        assert torch.equal(v, before[k]), k


def test_permanent_edit_without_parameters_uses_a_hook(resnet, x):
    with pytest.warns(UserWarning, match="permanent forward hook"):
        edited = permanent_edit(resnet, {"layer1.0": [1, 2]})  # residual block output: no weights produce it
    with trace(edited, retain=["layer1.0"]) as tr:
        out = _run(edited, x)
    assert torch.all(tr["layer1.0"][:, [1, 2]] == 0)
    with ablated(resnet, {"layer1.0": [1, 2]}):
        torch.testing.assert_close(out, _run(resnet, x), rtol=0, atol=0)


def test_errors_name_the_problem(resnet, x):
    with pytest.raises(UnknownLayerError, match="layer1.0.bn2"):
        ablation_edits(resnet, {"layer1.0.bn3": [0]})
    with pytest.raises(UnitIndexError, match=r"units 0\.\.63"):
        ablation_edits(resnet, {"layer1.0.bn2": [64]})  # eager: the BN's width is known
    with pytest.raises(UnitIndexError, match="negative"):
        ablation_edits(resnet, {"layer1.0.bn2": [-1]})
    with pytest.raises(ValueError, match="needs means"):
        ablation_edits(resnet, {"fc": [0]}, "mean")
    with pytest.raises(ValueError, match="no means given for layer 'fc'"):
        ablation_edits(resnet, {"fc": [0]}, "mean", {"layer1.0.bn2": torch.zeros(64)})
    with pytest.raises(ValueError, match="has 9 values but layer 'fc' has 10 units"):
        ablation_edits(resnet, {"fc": [0]}, "mean", {"fc": torch.zeros(9)})
    with pytest.raises(ValueError, match="'zero' or 'mean'"):
        ablation_edits(resnet, {"fc": [0]}, "median")
    # a layer whose width only its output reveals: checked on the first call
    with pytest.raises(UnitIndexError, match=r"layer 'layer1.0', which has units 0\.\.63"), \
            ablated(resnet, {"layer1.0": [70]}):
        _run(resnet, x)
    assert not resnet.layer1[0]._forward_hooks
    with pytest.raises(TypeError, match="ints"):
        as_unit_dict({"fc": [1.5]})
    assert ablation_edits(resnet, {}) == {} and ablation_edits(resnet, {"fc": []}) == {}


def test_save_edited_round_trip(resnet, x, tmp_path):
    means = {"layer4.1.bn2": torch.randn(512)}
    edited = permanent_edit(resnet, {"layer4.1.bn2": [0, 10, 300]}, "mean", means)
    path = save_edited(edited, tmp_path / "m.safetensors",
                       {"arch": "torchvision:resnet18", "num_classes": 10, "class_names": list("abcdefghij"),
                        "preprocess": {"resize": 72, "crop": 64}})
    side = json.loads((tmp_path / "m.safetensors.spec.json").read_text())
    assert side["arch"] == "torchvision:resnet18" and side["num_classes"] == 10
    assert side["ablation"]["layer4.1.bn2"]["units"] == [0, 10, 300]
    lm = load_model(f"checkpoint:{path}")
    assert lm.class_names == list("abcdefghij") and lm.preprocess.crop == 64
    torch.testing.assert_close(_run(lm.module, x), _run(edited, x), rtol=0, atol=1e-5)
    with pytest.warns(UserWarning):
        hooked = permanent_edit(resnet, {"layer1.0": [0]})
    with pytest.raises(ValueError, match="forward hook"):
        save_edited(hooked, tmp_path / "h.safetensors", {"arch": "torchvision:resnet18"})
    with pytest.raises(ValueError, match="arch"):
        save_edited(edited, tmp_path / "n.safetensors", {})


def test_vit_token_ablation_covers_every_token():
    from torchvision.models import VisionTransformer
    torch.manual_seed(0)
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                            num_classes=10).eval()
    with torch.no_grad():
        vit.encoder.ln.weight.uniform_(0.5, 1.5)
        vit.encoder.ln.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 32, 32)
    block = "encoder.layers.encoder_layer_0"
    means = {block: torch.arange(16.0)}
    with ablated(vit, {block: [1, 4]}, "mean", means, retain=[block]) as tr:
        _run(vit, x)
    t = tr[block]
    assert t.shape == (2, 17, 16)  # CLS + 16 patch tokens
    assert torch.all(t[:, :, 1] == 1.0) and torch.all(t[:, :, 4] == 4.0)  # CLS (token 0) included
    assert not torch.all(t[:, :, 2] == 2.0)
    # final LayerNorm: hook == hand-edited weights == permanent edit
    hand = copy.deepcopy(vit)
    with torch.no_grad():
        hand.encoder.ln.weight[[3, 8]] = 0
        hand.encoder.ln.bias[[3, 8]] = 0
    with ablated(vit, {"encoder.ln": [3, 8]}):
        hooked = _run(vit, x)
    torch.testing.assert_close(hooked, _run(hand, x), rtol=0, atol=1e-5)
    torch.testing.assert_close(_run(permanent_edit(vit, {"encoder.ln": [3, 8]}), x), hooked, rtol=0, atol=1e-5)
    with pytest.raises(UnitIndexError, match=r"0\.\.15"):
        ablation_edits(vit, {"encoder.ln": [16]})


def test_efficientnet_lite0_real_photo():
    from neuroscribe.datasets.probe import load_image, sample_root
    lm = load_model("efficientnet-lite0")
    m = lm.module
    photo = min((sample_root() / "val" / "n03445777").iterdir())  # a golf ball
    x = lm.preprocess.transform()(load_image(photo))[None]
    base = _run(m, x)
    # _blocks.15 has no skip connection (192 -> 320 filters): its output is its _bn2's output
    hand = copy.deepcopy(m)
    units = [5, 17, 200]
    with torch.no_grad():
        hand._blocks[15]._bn2.weight[units] = 0
        hand._blocks[15]._bn2.bias[units] = 0
    with ablated(m, {"_blocks.15": units}):
        out = _run(m, x)
    torch.testing.assert_close(out, _run(hand, x), rtol=0, atol=1e-4)
    # mean ablation of the head BN, as hook and as baked weights
    means = {"_bn1": torch.rand(1280)}
    head = list(range(3, 1280, 25))[:50]
    with ablated(m, {"_bn1": head}, "mean", means, retain=["_bn1"]) as tr:
        out = _run(m, x)
    torch.testing.assert_close(tr["_bn1"][0, head], means["_bn1"][head][:, None, None].expand(50, 7, 7))
    torch.testing.assert_close(_run(permanent_edit(m, {"_bn1": head}, "mean", means), x), out,
                               rtol=0, atol=1e-4)
    assert base.argmax(1).item() == lm.class_names.index("golf ball")


def test_later_stages_see_the_jobs_preprocess_overrides(tmp_path):
    """A job that records EfficientNet-Lite0 at 64 px (``preprocess`` overrides) is flagged, ablated and evaluated at
    64 px too: every stage after record gets its model from ``job_model``, which applies the overrides (main once
    gave those stages the model's own 224 px while the units had been recorded at 64)."""
    from neuroscribe.config import load_config
    from neuroscribe.datasets.sets import test_sets
    from neuroscribe.runtime import job_model
    cfg = load_config(None, {"model": "efficientnet-lite0", "preprocess": {"resize": 73, "crop": 64},
                             "data": {"split": "val", "limit": 10}, "out": str(tmp_path / "job"),
                             "shifts": [{"name": "boxed", "data": {"split": "val", "limit": 10},
                                         "cue": {"kind": "text"}, "fraction": 1.0, "correlation": "wrong"}]})
    lm, _ = job_model(cfg)
    assert (lm.preprocess.resize, lm.preprocess.crop, lm.preprocess.mean) == (73, 64, (0.5, 0.5, 0.5))
    sets = test_sets(cfg, lm.preprocess, lm.class_names)
    assert set(sets) == {"in-distribution", "boxed"}
    for ds, _, _ in sets.values():
        assert ds[0][0].shape == (3, 64, 64)
    plain, _ = job_model(load_config(None, {"model": "efficientnet-lite0", "out": str(tmp_path / "job2")}))
    assert (plain.preprocess.resize, plain.preprocess.crop) == (224, 224)
