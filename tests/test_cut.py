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


class _Branch(nn.Module):
    """conv -> head with a Python branch: on ``self.training`` (fixed when torch.fx traces) or on a value (torch.fx
    cannot trace it)."""

    def __init__(self, on: str):
        super().__init__()
        self.on, self.conv, self.head = on, nn.Conv2d(3, 6, 3), nn.Linear(6, 4)

    def forward(self, x):
        h = self.conv(x)
        if self.training if self.on == "training" else h.mean() > 0:
            h = h * 0 if self.on == "training" else h * 2
        return self.head(h.mean((2, 3)))


def test_a_model_left_in_training_mode_is_traced_as_it_is_scored(val):
    torch.manual_seed(5)
    m = _Branch("training").train()
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
    # n = 2..6 from layer1 (the first layer of the units so far), each cut checked once on its first batch by a full
    # pass (4 + 2)
    assert runs[False] == 2 * (6 + 7) * len(val)
    assert runs[True] == 2 * ((4 + 1 + 2) * len(val) + 4 + 2)


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 3, 3, padding=1), nn.Linear(3, 4)

    def forward(self, x):
        return self.head(self.conv(self.conv(x)).mean((2, 3)))


def test_what_cannot_be_cut_makes_full_passes(resnet, val):
    torch.manual_seed(4)
    for model, layers in ((_Branch("value"), ["conv"]), (_Twice(), ["conv"]), (resnet, ["layer1", "layer1.0"])):
        assert LayerGraph.trace(model.eval(), layers) is None
    m = _Branch("value").eval()
    labels = _logits(m, val, {}).argmax(1)  # the unablated model is right everywhere: ablations show
    val = [(x, y) for (x, _), y in zip(val, labels.split([len(y) for _, y in val]))]
    top = int(labels.mode().values)  # the most predicted class: its logit set to -100 turns its images wrong
    units = [("conv", 0), ("conv", 5), ("head", (top + 1) % 4), ("head", top)]
    means = {"conv": torch.zeros(6), "head": torch.full((4,), -100.0)}
    want = {u: int((_logits(m, val, ablation_edits(m, {u[0]: [u[1]]}, "mean", means)).argmax(1) == labels).sum())
            / len(labels) for u in units}  # each unit's accuracy from its own full pass, apart from the fallback
    assert want[("head", top)] != want[("head", (top + 1) % 4)]  # a unit scored with another's edit would show
    got = order_units(m, units, val, "mean", means, progress=False)
    assert dict(got) == want and len(got) == len(units)
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


class _Small(nn.Module):
    """stem -> layer -> head, with ``kind`` choosing what happens around the cut (the holes a review found)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind, self.scale = kind, None
        self.stem, self.layer, self.act = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, padding=1), nn.Hardswish(True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        if self.kind == "lazy":
            if self.scale is None:  # built on the first call: tracing would leave a Proxy here
                self.scale = torch.ones_like(x[:1])
            x = x * self.scale
        h = self.stem(x)
        if self.kind == "in-place before":
            h.relu_()  # its result is never read: only the write matters
        if self.kind == "isinstance" and isinstance(h, torch.Tensor):  # False on a torch.fx Proxy
            h = h.relu()
        if self.kind == "grad" and not torch.is_grad_enabled():
            h = h * 2
        v = h[:, :4, ::2] if self.kind == "view" else None
        b = self.layer(h)
        if self.kind == "view":
            self.act(h)  # writes into h, which v views: copies of v and h apart would not see it
            return self.head(torch.cat([v.mean((2, 3)), b[:, 4:].mean((2, 3))], 1))
        return self.head((b + h).mean((2, 3)))


def _cut_vs_full(model, val, layer="layer"):
    graph = LayerGraph.trace(model, [layer])
    edit_sets = [ablation_edits(model, {layer: [u]}) for u in (0, 1)]
    got = None if graph is None else cut_correct(model, graph, layer, val, edit_sets, CPU, reduce=_keep)
    if got is not None:
        for edits, out in zip(edit_sets, got):
            assert torch.equal(out, _logits(model, val, edits))
    return got is not None


@pytest.mark.parametrize("kind,cut", [("in-place before", True), ("grad", True), ("isinstance", False),
                                      ("view", False), ("lazy", False)])
def test_what_tracing_would_get_wrong_is_exact_or_falls_back(val, kind, cut):
    """In-place writes before the cut are kept (no dead-code elimination) and grad mode is traced as scored: exact.
    A branch fixed wrongly at trace time, a view whose base is written after the cut: the first batch's check
    against a full pass falls back. A model that tracing would change (a lazily built attribute): not traced, and
    left as it was."""
    torch.manual_seed(6)
    m = _Small(kind).eval()
    assert _cut_vs_full(m, val) is cut
    assert m.scale is None and torch.is_tensor(m(val[0][0]))  # the model works as before tracing


def test_hooks_the_graphs_would_skip_mean_full_passes(val):
    torch.manual_seed(7)
    m = _Small("plain").eval()
    assert _cut_vs_full(m, val)
    for where in (m, m.stem):  # the model itself; a leaf keeps its hook (stem is called as a whole)
        for register in (where.register_forward_pre_hook, where.register_forward_hook):
            h = register(lambda *a: None)
            try:
                assert _cut_vs_full(m, val) is (where is m.stem)
            finally:
                h.remove()
    block = torchvision.models.resnet18(num_classes=4).eval()
    h = block.layer1.register_forward_hook(lambda *a: None)  # traced through when layer2 is the cut
    try:
        assert LayerGraph.trace(block, ["layer2"]) is None
    finally:
        h.remove()
    assert LayerGraph.trace(block, ["layer2"]) is not None


def test_named_tuple_outputs_cross_the_cut(val):
    from collections import namedtuple
    pair = namedtuple("pair", "a b")

    class Twin(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            y = self.conv(x)
            return pair(y, y * 2)

    class UsesTwin(nn.Module):  # the stem's named tuple is read again after the cut (t.b): it is carried over
        def __init__(self):
            super().__init__()
            self.stem, self.layer, self.head = Twin(), nn.Conv2d(4, 4, 3, padding=1), nn.Linear(4, 3)

        def forward(self, x):
            t = self.stem(x)
            return self.head((self.layer(t.a) + t.b).mean((2, 3)))
    torch.manual_seed(8)
    assert _cut_vs_full(UsesTwin().eval(), val)


def test_class_index_and_labels_reach_each_batch_as_in_val_correct(resnet, val):
    """``class_index`` (a model with more outputs than the task's classes) picks the logits compared, and ``reduce``
    gets each batch's labels, as val_correct's full passes do."""
    from neuroscribe.ablate.select import val_correct
    graph = LayerGraph.trace(resnet, ["layer3"])
    edit_sets = [ablation_edits(resnet, {"layer3": [u]}) for u in (2, 11)]
    cols = [7, 2, 5, 0]  # the task's four classes, in the task's order: labels 0..3
    val4 = [(x, y % 4) for x, y in val]
    got = cut_correct(resnet, graph, "layer3", val4, edit_sets, CPU, class_index=cols)
    for edits, right in zip(edit_sets, got):
        assert torch.equal(right, val_correct(resnet, val4, edits, CPU, class_index=cols))
    picked = cut_correct(resnet, graph, "layer3", val4, edit_sets, CPU, class_index=cols, reduce=_keep)
    assert picked[0].shape == (12, 4)
    assert torch.equal(picked[0], _logits(resnet, val4, edit_sets[0])[:, cols])
    seen = cut_correct(resnet, graph, "layer3", val4, edit_sets, CPU, reduce=lambda out, y: y.clone())
    assert torch.equal(seen[0], torch.cat([y for _, y in val4]))


def test_what_the_cut_is_not_asked_for_is_none_or_an_error(resnet, val):
    graph = LayerGraph.trace(resnet, ["layer2", "layer4"])
    assert cut_correct(resnet, graph, "layer2", val, [], CPU) is None  # nothing to score
    assert cut_correct(resnet, graph, "layer3", val, [ablation_edits(resnet, {"layer3": [0]})], CPU) is None
    other = ablation_edits(resnet, {"layer2": [0], "layer3": [0]})  # layer3 is not a leaf of this graph
    assert cut_correct(resnet, graph, "layer2", val, [other], CPU) is None
    edits = [ablation_edits(resnet, {"layer2": [0]})]
    for empty in ([], [(torch.zeros(0, 3, 48, 48), torch.zeros(0, dtype=torch.long))]):  # no batch; no image
        with pytest.raises(ValueError, match="^the validation loader yielded no images$"):
            cut_correct(resnet, graph, "layer2", empty, edits, CPU)
    one = [(val[0][0][:1], val[0][1][:1])]  # a single image is enough
    assert cut_correct(resnet, graph, "layer2", one, edits, CPU)[0].shape == (1,)


def test_the_first_batch_check_runs_with_one_batch_and_one_edit_set(val):
    """A graph that tracing got wrong (a branch on isinstance) is caught on the first batch and first edit set,
    even when there is no other."""
    m = _Small("isinstance").eval()
    graph = LayerGraph.trace(m, ["layer"])
    assert graph is not None
    assert cut_correct(m, graph, "layer", val[:1], [ablation_edits(m, {"layer": [0]})], CPU) is None


class _Scaled(nn.Module):
    """A parameter read before the cut and again after it (a get_attr node in the graph), and a residual value."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 8).view(1, 8, 1, 1))
        self.stem, self.layer, self.head = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 3)

    def forward(self, x):
        h = self.stem(x) * self.scale
        b = self.layer(h)
        return self.head((b * self.scale + h).mean((2, 3)))


def test_a_parameter_read_on_both_sides_is_read_again_and_only_read_values_cross(val):
    torch.manual_seed(9)
    m = _Scaled().eval()
    assert _cut_vs_full(m, val)
    head, tail, at = LayerGraph.trace(m, ["layer"]).split("layer")
    values = head(val[0][0])
    assert len(values) == 2 and at == 1  # h (read again by the residual) and the layer's output; not the parameter
    assert not any(v is m.scale for v in values)
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.LazyLinear(2)).eval()
    seq(val[0][0])
    head, _, at = LayerGraph.trace(seq, ["2"]).split("2")
    assert len(head(val[0][0])) == 1 and at == 0  # a chain: only the layer's output crosses


def test_fresh_copies_every_tensor_of_a_cut_value_and_keeps_its_type():
    from collections import namedtuple

    from neuroscribe.ablate.cut import _fresh
    pair = namedtuple("pair", "a b")
    t = torch.arange(3.0)
    v = (pair(t, [t, {"k": t}]), 4, "s")
    f = _fresh(v)
    assert type(f) is tuple and type(f[0]) is pair and type(f[0].b) is list and type(f[0].b[1]) is dict
    leaves = [f[0].a, f[0].b[0], f[0].b[1]["k"]]
    assert all(torch.equal(x, t) and x is not t and x.data_ptr() != t.data_ptr() for x in leaves)
    assert f[1:] == (4, "s")


def test_global_hooks_and_hooks_inside_a_leaf():
    """A global forward (pre-)hook would not run on the graphs: full passes. A hook on a module inside a leaf layer
    runs (the leaf is called as a whole): the graph is kept."""
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
    block = torchvision.models.resnet18(num_classes=4).eval()
    assert LayerGraph.trace(block, ["layer1"]) is not None
    for register in (register_module_forward_hook, register_module_forward_pre_hook):
        h = register(lambda *a: None)
        try:
            assert LayerGraph.trace(block, ["layer1"]) is None
        finally:
            h.remove()
    h = block.layer1[0].register_forward_hook(lambda *a: None)  # a BasicBlock inside the leaf layer1
    try:
        assert LayerGraph.trace(block, ["layer1"]) is not None
        graph = LayerGraph.trace(block, ["layer2"])  # layer1 is traced through now: its block's hook would be lost
        assert graph is None
    finally:
        h.remove()
    graph = LayerGraph.trace(block, ["layer1"])
    h = block.layer2.register_forward_hook(lambda *a: None)  # a hook added after tracing, on a module traced through
    try:
        x = torch.randn(2, 3, 32, 32)
        assert cut_correct(block, graph, "layer1", [(x, torch.zeros(2, dtype=torch.long))],
                           [ablation_edits(block, {"layer1": [0]})], CPU) is None
    finally:
        h.remove()
