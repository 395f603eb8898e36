"""Scoring ablations from a cut (neuroscribe/ablate/cut.py): the outputs of full passes bit for bit, with one pass up to
the layer a batch instead of one a unit; what torch.fx cannot cut falls back to full passes."""
import random

import pytest
import torch
import torchvision
from torch import nn

from neuroscribe.ablate.cut import LayerGraph, cut_correct
from neuroscribe.ablate.edit import ablation_edits
from neuroscribe.ablate.select import accuracy_curve, order_units
from neuroscribe.hooks import trace
from neuroscribe.models import channels_last, to_layout

CPU = torch.device("cpu")


def _logits(model, val, edits):
    """Full passes with ``edits`` as hooks, the way val_correct runs them."""
    model.eval()
    with torch.no_grad(), channels_last(model) as layout, trace(model, edit=edits):
        return torch.cat([model(to_layout(x, layout)) for x, _ in val])


def _keep(out, _y):
    return out.clone()


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad():  # trained-looking statistics, so that one unit moves the outputs
        for bn in (b for b in m.modules() if isinstance(b, nn.BatchNorm2d)):
            bn.running_mean.normal_(0, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
    return m


@pytest.fixture(scope="module")
def val():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 3, 48, 48, generator=g), torch.randint(0, 10, (6,), generator=g)) for _ in range(2)]


@pytest.mark.parametrize("method", ["zero", "mean"])
@pytest.mark.parametrize("layer,units,later", [
    ("layer1", [3], {}),
    ("layer1.0.conv2", [5], {}),  # inside a block: the block's input skips the cut and is carried over it
    ("layer2.0.conv1", [7], {}),  # the downsample branch reads the block input after the cut
    ("layer2", [1, 2], {"layer4": [9]}),  # a later layer's edit runs as a hook in the rest of the graph
    ("fc", [4], {}),
])
def test_cut_outputs_equal_full_passes(resnet, val, method, layer, units, later):
    widths = {"layer1": 64, "layer1.0.conv2": 64, "layer2.0.conv1": 128, "layer2": 128, "layer4": 512, "fc": 10}
    means = {name: torch.randn(w, generator=torch.Generator().manual_seed(2)) for name, w in widths.items()}
    graph = LayerGraph.trace(resnet, [layer, *later])
    assert graph is not None and graph.split(layer) is not None
    edit_sets = [ablation_edits(resnet, {layer: units, **later}, method, means),
                 ablation_edits(resnet, {layer: [units[0] + 1]}, method, means)]
    got = cut_correct(resnet, graph, layer, val, edit_sets, CPU, reduce=_keep)
    base = _logits(resnet, val, {})
    for edits, out in zip(edit_sets, got):
        want = _logits(resnet, val, edits)
        assert torch.equal(out, want)
        assert not torch.equal(want, base)  # the edit did something: the comparison can tell


class _InPlaceAfterCut(nn.Module):
    """A value from before the cut is written in place after it (``Hardswish(inplace=True)``)."""

    def __init__(self):
        super().__init__()
        self.stem, self.branch, self.act = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, padding=1), nn.Hardswish(True)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        a = self.stem(x)
        b = self.branch(a)
        a = self.act(a)
        return self.head((a + b).mean((2, 3)))


def test_each_pass_gets_fresh_cut_values(val):
    torch.manual_seed(3)
    m = _InPlaceAfterCut().eval()
    graph = LayerGraph.trace(m, ["branch"])
    edit_sets = [ablation_edits(m, {"branch": [u]}) for u in range(3)]
    got = cut_correct(m, graph, "branch", val, edit_sets, CPU, reduce=_keep)
    for edits, out in zip(edit_sets, got):
        assert torch.equal(out, _logits(m, val, edits))


class _TrainOnly(nn.Module):
    """A branch on ``self.training`` in the traced forward itself (fixed when torch.fx traces)."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 6, 3), nn.Linear(6, 4)

    def forward(self, x):
        h = self.conv(x)
        if self.training:
            h = h * 0
        return self.head(h.mean((2, 3)))


def test_a_model_left_in_training_mode_is_traced_as_it_is_scored(val):
    torch.manual_seed(5)
    m = _TrainOnly().train()
    graph = LayerGraph.trace(m, ["conv"])
    assert m.training  # its mode is given back
    edit_sets = [ablation_edits(m, {"conv": [u]}) for u in range(2)]
    got = cut_correct(m, graph, "conv", val, edit_sets, CPU, reduce=_keep)
    assert m.training
    for edits, out in zip(edit_sets, got):
        assert torch.equal(out, _logits(m, val, edits))  # _logits scores in eval mode, as val_correct does


def test_order_units_and_curve_same_with_fewer_passes(resnet, val):
    labels = _logits(resnet, val, {}).argmax(1).split([len(y) for _, y in val])
    val = [(x, y) for (x, _), y in zip(val, labels)]  # the unablated model is right everywhere: ablations show
    top = int(labels[0][0])  # its logit set to -100 (mean ablation below) turns some images wrong
    units = [("layer3", 7), ("layer1", 3), ("fc", top), ("layer3", 1), ("layer1", 60), ("layer4", 100)]
    stem = []
    hook = resnet.conv1.register_forward_hook(lambda *a: stem.append(1))
    try:
        runs = {}
        for cut in (True, False):
            stem.clear()
            for method in ("zero", "mean"):
                means = {l: torch.full((w,), 0.5) for l, w in (("layer1", 64), ("layer3", 256), ("layer4", 512))}
                means["fc"] = torch.full((10,), -100.0)
                runs[cut, method] = (order_units(resnet, units, val, method, means, progress=False, cut=cut),
                                     accuracy_curve(resnet, units, val, method=method, means=means, progress=False,
                                                    cut=cut))
            runs[cut] = len(stem)
    finally:
        hook.remove()
    for method in ("zero", "mean"):
        assert runs[True, method] == runs[False, method]
    assert any(acc < 1 for _, acc in runs[True, "mean"][0]) and any(acc < 1 for _, acc in runs[True, "mean"][1])
    # full passes: 6 units + 7 curve points a method; cut: 4 layers to order, then n = 0, n = 1 from layer3 and
    # n = 2..6 from layer1 (the first layer of the units so far)
    assert runs[False] == 2 * (6 + 7) * len(val)
    assert runs[True] == 2 * (4 + 1 + 2) * len(val)


class _Branchy(nn.Module):
    """Control flow on a value: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 6, 3), nn.Linear(6, 4)

    def forward(self, x):
        h = self.conv(x)
        if h.mean() > 0:
            h = h * 2
        return self.head(h.mean((2, 3)))


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 3, 3, padding=1), nn.Linear(3, 4)

    def forward(self, x):
        return self.head(self.conv(self.conv(x)).mean((2, 3)))


def test_what_cannot_be_cut_makes_full_passes(resnet, val):
    torch.manual_seed(4)
    for model, layers in ((_Branchy(), ["conv"]), (_Twice(), ["conv"]), (resnet, ["layer1", "layer1.0"])):
        assert LayerGraph.trace(model.eval(), layers) is None
    m = _Branchy().eval()
    units = [("conv", 0), ("conv", 5), ("head", 1)]
    assert order_units(m, units, val, progress=False) == order_units(m, units, val, progress=False, cut=False)
    # an edit set with a layer before the cut, or without the cut's layer: not from this cut
    graph = LayerGraph.trace(resnet, ["layer1", "layer3"])
    both = ablation_edits(resnet, {"layer1": [0], "layer3": [0]})
    assert cut_correct(resnet, graph, "layer3", val, [both], CPU) is None
    assert cut_correct(resnet, graph, "layer1", val, [ablation_edits(resnet, {"layer3": [0]})], CPU) is None


def test_efficientnet_lite0_real_photos_cut_equals_full():
    """The product's real model and shipped photos: the graph is cut (the fast path runs) and every unit's logits
    equal the full pass's."""
    from neuroscribe.datasets.probe import load_image, sample_root
    from neuroscribe.models import load_model
    lm = load_model("efficientnet-lite0")
    tf = lm.preprocess.with_overrides(resize=73, crop=64).transform()
    photos = sorted((sample_root() / "val").glob("*/*"))
    photos = random.Random(0).sample(photos, 12)
    x = torch.stack([tf(load_image(p)) for p in photos])
    val = [(x[:6], torch.zeros(6, dtype=torch.long)), (x[6:], torch.zeros(6, dtype=torch.long))]
    layers = ["_blocks.3", "_blocks.12", "_conv_head", "_fc"]
    graph = LayerGraph.trace(lm.module, layers)
    assert graph is not None
    for layer in layers:
        edit_sets = [ablation_edits(lm.module, {layer: [u]}) for u in (1, 8)]
        got = cut_correct(lm.module, graph, layer, val, edit_sets, CPU, reduce=_keep)
        for edits, out in zip(edit_sets, got):
            assert torch.equal(out, _logits(lm.module, val, edits)), layer
