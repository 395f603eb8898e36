"""Exact, fast tests of the ablation edit, :mod:`neuroscribe.ablate.edit`, sized for mutation testing.

Zeroing and mean-replacing units of channels-first / channels-last maps, tokens and flat outputs, through the hook
(:func:`ablation_edits`) and baked into weights (:func:`permanent_edit`), with the unit lists, range checks and
messages. Tensors are tiny; expected outputs are built by plain indexing.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from neuroscribe.ablate import edit as E
from neuroscribe.ablate.edit import UnitIndexError
from neuroscribe.hooks import LayoutError, UnknownLayerError, declare_layouts, trace


def seq(*shape: int, dtype=torch.float32) -> torch.Tensor:
    n = int(np.prod(shape))
    return (torch.arange(n, dtype=torch.float32) + 1).reshape(*shape).to(dtype)


# ============================================================================== unit lists
def test_as_unit_dict_from_a_mapping():
    got = E.as_unit_dict({"b": [3, 1, 3], "a": 2, "c": [], 4: torch.tensor([[5, 0], [1, 1]]), "d": np.int64(7)})
    assert got == {"b": [1, 3], "a": [2], "c": [], "4": [0, 1, 5], "d": [7]}
    assert list(got) == ["b", "a", "c", "4", "d"]
    assert all(type(u) is int for us in got.values() for u in us)


def test_as_unit_dict_from_pairs_rows_and_flags():
    rows = [("x", 2), ["y", 0], (("x", 1), 0.5), SimpleNamespace(layer="z", unit=torch.tensor(4)), ("x", 2)]
    got = E.as_unit_dict(rows)
    assert got == {"x": [1, 2], "y": [0], "z": [4]} and list(got) == ["x", "y", "z"]
    assert type(got["z"][0]) is int


@pytest.mark.parametrize("bad, err, message", [
    ([("x", True)], TypeError, "layer 'x': unit indices must be ints; got True"),
    ([("x", 1.0)], TypeError, "layer 'x': unit indices must be ints; got 1.0"),
    ([("x", torch.tensor(2.0))], TypeError, "layer 'x': unit indices must be ints; got tensor(2.)"),
    ([("x", torch.tensor([1, 2]))], TypeError, "layer 'x': unit indices must be ints; got tensor([1, 2])"),
    ([("x", -1)], UnitIndexError, "layer 'x': unit -1 is negative; units are numbered from 0"),
    ([("x", 1, 2)], TypeError, "expected (layer, unit) pairs; got ('x', 1, 2)"),
    ([(1, 2)], TypeError, "expected (layer, unit) pairs; got (1, 2)"),
    (["xy"], TypeError, "expected (layer, unit) pairs; got 'xy'"),
    ([(("x", 1), 0.5, 3)], TypeError, "expected (layer, unit) pairs; got (('x', 1), 0.5, 3)"),
    ({"x": None}, TypeError, "layer 'x': expected a list of unit indices; got None"),
    ({"x": True}, TypeError, "layer 'x': expected a list of unit indices; got True"),
    ({"x": [0, -2]}, UnitIndexError, "layer 'x': unit -2 is negative; units are numbered from 0"),
    ({"x": torch.tensor([1.5])}, TypeError, "layer 'x': unit indices must be ints; got 1.5"),
    ({"x": torch.tensor([True])}, TypeError, "layer 'x': unit indices must be ints; got True"),
    ([SimpleNamespace(layer="x")], TypeError, "expected (layer, unit) pairs; got namespace(layer='x')"),
])
def test_as_unit_dict_refuses(bad, err, message):
    with pytest.raises(err, match="^" + re.escape(message) + "$"):
        E.as_unit_dict(bad)


def test_a_row_with_a_pair_first_is_unwrapped_only_at_length_two():
    assert E.as_unit_dict([[("x", 3), 0.1]]) == {"x": [3]}
    assert E.as_unit_dict([("x", 3)]) == {"x": [3]}


# ============================================================================== the axis and checks
def test_unit_axis():
    assert E.unit_axis(torch.zeros(1, 2, 3, 4), "nchw") == 1 and E.unit_axis(torch.zeros(1, 2, 3, 4), "nhwc") == 3
    assert E.unit_axis(torch.zeros(1, 5, 3, 3)) == 1 and E.unit_axis(torch.zeros(1, 3, 3, 5)) == 3
    assert E.unit_axis(torch.zeros(1, 2)) == 1 and E.unit_axis(torch.zeros(1, 2, 3)) == 2
    with pytest.raises(ValueError, match=re.escape(
            "cannot ablate units of a layer output of shape (1,) (expected conv (B,C,H,W), tokens (B,T,D) or flat "
            "(B,D))") + "$"):
        E.unit_axis(torch.zeros(1))
    with pytest.raises(LayoutError, match="^layer '<unnamed>': layout must be one of"):
        E.unit_axis(torch.zeros(1, 2, 3, 4), "hw")
    with pytest.raises(LayoutError, match="^layer '<unnamed>': cannot tell"):
        E.unit_axis(torch.zeros(1, 2, 2, 2))


def test_check_range_message():
    E._check_range("l", [0, 3], 4, "here")
    with pytest.raises(UnitIndexError, match=re.escape("unit 4 is out of range for layer 'l', which has units 0..3 "
                                                       "(here)") + "$"):
        E._check_range("l", [0, 4], 4, "here")
    with pytest.raises(UnitIndexError, match=re.escape("units 0..3 (here); also out of range: [5]") + "$"):
        E._check_range("l", [4, 0, 5], 4, "here")
    with pytest.raises(UnitIndexError, match=re.escape("unit -1 is out of range for layer 'l', which has units 0..3 "
                                                       "(w); also out of range: [5, 6, 7, 8, 9, 10, 11, 12, 13]")):
        E._check_range("l", [-1, 0, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], 4, "w")


def test_mean_vector():
    v = E._mean_vector("l", {"l": torch.tensor([1, 2], dtype=torch.float64, requires_grad=True)})
    assert v.dtype == torch.float32 and v.tolist() == [1.0, 2.0] and not v.requires_grad and v.device.type == "cpu"
    assert E._mean_vector("l", {"l": [1, 3]}).dtype == torch.float32
    for means, message in [
            (None, "method='mean' needs means: a per-unit mean vector for layer 'l' (e.g. "
                   "Recording.tensors(layer)['mean'])"),
            ({"b": [1.0], "a": [2.0]}, "method='mean': no means given for layer 'l'; means has layers ['a', 'b']"),
            ({"l": [[1.0]]}, "means['l'] must be a vector [units]; got shape (1, 1)"),
            ({"l": [1.0, float("nan")]}, "means['l'] holds non-finite values"),
            ({"l": [float("inf")]}, "means['l'] holds non-finite values")]:
        with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
            E._mean_vector("l", means)


def test_check_means_length():
    E._check_means_length("l", None, 3)
    E._check_means_length("l", torch.zeros(3), 3)
    with pytest.raises(ValueError, match="^" + re.escape("means['l'] has 2 values but layer 'l' has 3 units") + "$"):
        E._check_means_length("l", torch.zeros(2), 3)


# ============================================================================== UnitAblation
def ablate_ref(t, ax, units, vals):
    out = t.clone()
    for u, v in zip(units, vals):
        out.select(ax, u).fill_(v)
    return out


@pytest.mark.parametrize("shape, layout, ax", [((2, 4, 2, 3), "nchw", 1), ((2, 2, 3, 4), "nhwc", 3),
                                               ((2, 5, 4), None, 2), ((2, 4), None, 1)])
def test_unit_ablation_zero_and_mean(shape, layout, ax):
    t = seq(*shape)
    mean = torch.tensor([0.5, -1.25, 2.0, 7.0])
    z = E.UnitAblation("l", [0, 2], "zero", layout=layout)
    out = z(t)
    assert torch.equal(out, ablate_ref(t, ax, [0, 2], [0.0, 0.0])) and torch.equal(t, seq(*shape))
    m = E.UnitAblation("l", [1, 3], "mean", mean, layout=layout)
    assert torch.equal(m(t), ablate_ref(t, ax, [1, 3], [-1.25, 7.0])) and m.calls == 1
    assert torch.equal(m(t), ablate_ref(t, ax, [1, 3], [-1.25, 7.0])) and m.calls == 2
    assert z.calls == 1 and E.UnitAblation("l", [], "zero").calls == 0


def test_unit_ablation_keeps_the_dtype_per_call():
    mean = torch.tensor([1 / 3, 0.1])
    m = E.UnitAblation("l", [0], "mean", mean, layout="nchw")
    h = m(seq(1, 2, 1, 1, dtype=torch.float16))
    assert h.dtype == torch.float16 and h[0, 0, 0, 0] == torch.tensor(1 / 3).half()
    f = m(seq(1, 2, 1, 1))
    assert f.dtype == torch.float32 and f[0, 0, 0, 0] == torch.tensor(1 / 3) and f[0, 1, 0, 0] == 2
    z = E.UnitAblation("l", [1], "zero")
    h = z(seq(1, 3, dtype=torch.float16))
    assert h.dtype == torch.float16 and h.tolist() == [[1.0, 0.0, 3.0]]
    d = z(seq(1, 3, dtype=torch.float64))
    assert d.dtype == torch.float64 and d.tolist() == [[1.0, 0.0, 3.0]]


def test_unit_ablation_without_units_returns_its_input():
    t = seq(1, 3)
    a = E.UnitAblation("l", [], "zero")
    assert a(t) is t and a.calls == 1


def test_unit_ablation_layout_resolution():
    asked = []

    def layout(shape):
        asked.append(shape)
        return "nhwc"
    a = E.UnitAblation("l", [1], "zero", layout=layout)
    t = seq(1, 2, 2, 2)  # ambiguous by shape: the callable decides, once
    assert torch.equal(a(t), ablate_ref(t, 3, [1], [0.0])) and a.layout == "nhwc"
    a(seq(1, 2)), a(t)
    assert asked == [(1, 2, 2, 2)]
    b = E.UnitAblation("blk", [0], "zero")  # no layout: the shape alone, and the layer named when it cannot tell
    assert torch.equal(b(seq(1, 3, 3, 5)), ablate_ref(seq(1, 3, 3, 5), 3, [0], [0.0])) and b.layout == "nhwc"
    with pytest.raises(LayoutError, match="^layer 'blk': cannot tell"):
        E.UnitAblation("blk", [0], "zero")(seq(1, 2, 2, 2))
    assert E.UnitAblation("l", [0], "zero", layout="nchw").layout == "nchw"
    with pytest.raises(LayoutError, match=r"^layer 'q': layout must be one of \['nchw', 'nhwc'\]; got 'x'$"):
        E.UnitAblation("q", [0], "zero", layout="x")


def test_unit_ablation_checks_every_new_width():
    a = E.UnitAblation("l", [2], "mean", torch.zeros(3))
    a(seq(1, 3))
    with pytest.raises(UnitIndexError, match="^" + re.escape(
            "unit 2 is out of range for layer 'l', which has units 0..1 (output shape (1, 2))") + "$"):
        a(seq(1, 2))
    with pytest.raises(UnitIndexError, match=re.escape("units 0..0 (output shape (1, 1, 1, 1))")):
        E.UnitAblation("l", [2], "zero", layout="nchw")(seq(1, 1, 1, 1))
    with pytest.raises(ValueError, match="^" + re.escape("means['l'] has 3 values but layer 'l' has 4 units") + "$"):
        a(seq(1, 4))
    for args, message in [(("zero!",), "method must be 'zero' or 'mean'; got 'zero!'"),
                          (("mean",), "method='mean' for layer 'l' needs its mean vector")]:
        with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
            E.UnitAblation("l", [0], *args)


def test_repr():
    assert repr(E.UnitAblation("l", range(10), "zero")) == \
        "UnitAblation('l', units=[0, 1, 2, 3, 4, 5, 6, 7]..., method='zero')"


# ============================================================================== hooks and weights on a model
class Net(nn.Module):
    """conv -> bn -> gn -> relu -> (channels-last) ln -> back -> box (declared channels-last) -> pool -> lin."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv, self.bn, self.gn = nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4), nn.GroupNorm(2, 4)
        self.relu, self.ln, self.box = nn.ReLU(), nn.LayerNorm(4), nn.Identity()
        self.lin = nn.Linear(4, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
            self.bn.running_mean.copy_(torch.randn(4, generator=g))
            self.bn.running_var.copy_(torch.rand(4, generator=g) + 0.5)
        declare_layouts(self, {"box": "nhwc", "relu": "nchw"})
        self.eval()

    def forward(self, x):
        y = self.relu(self.gn(self.bn(self.conv(x))))
        y = self.box(self.ln(y.permute(0, 2, 3, 1)))
        return self.lin(y.mean((1, 2)))


X = torch.randn(2, 2, 3, 5, generator=torch.Generator().manual_seed(1))
MEANS = {k: torch.tensor([0.5, -1.5, 2.25, 3.0]) for k in ("conv", "bn", "gn", "relu", "ln", "box")}
MEANS["lin"] = torch.tensor([0.25, -0.75, 1.5])
AXIS = {"conv": 1, "bn": 1, "gn": 1, "relu": 1, "ln": 3, "box": 3, "lin": 1}
LAYERS = list(AXIS)


def outputs(model, edit=None):
    with torch.no_grad(), trace(model, retain=LAYERS, edit=edit) as tr:
        model(X)
    return tr


@pytest.mark.parametrize("method", ["zero", "mean"])
@pytest.mark.parametrize("layer", LAYERS)
def test_hook_and_weight_ablation_give_the_constant(layer, method):
    net = Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    plain = outputs(net)
    units = [2, 0] if layer != "lin" else [1]
    edits = E.ablation_edits(net, {"lin" if layer != "lin" else "conv": [], layer: units}, method,
                             MEANS if method == "mean" else None)
    assert list(edits) == [layer] and edits[layer].units == sorted(units)
    hooked = outputs(net, edits)
    want = ablate_ref(plain[layer], AXIS[layer], sorted(units),
                      [0.0] * len(units) if method == "zero" else MEANS[layer][sorted(units)].tolist())
    assert torch.equal(hooked[layer], want)
    weights = layer not in ("relu", "box")
    if weights:
        edited = E.permanent_edit(net, {layer: units}, method, MEANS)
    else:
        with pytest.warns(UserWarning) as w:
            edited = E.permanent_edit(net, {layer: units}, method, MEANS)
        why = f"{'ReLU' if layer == 'relu' else 'Identity'} has no weights that produce its output units"
        assert [str(x.message) for x in w] == [
            f"permanent_edit: layer {layer!r}: {why}; ablating it with a permanent forward hook instead (kept in "
            "this module object, but not in saved weights)"]
        assert w[0].filename != E.__file__  # attributed to the caller (under mutmut: its trampoline)
    assert getattr(edited, E.ABLATION_ATTR) == {layer: {"units": sorted(units), "method": method,
                                                        "how": "weights" if weights else "hook"}}
    baked = outputs(edited)
    assert torch.equal(baked[layer], want)
    for k in LAYERS[LAYERS.index(layer):]:
        assert torch.equal(baked[k], hooked[k]) or torch.allclose(baked[k], hooked[k], rtol=0, atol=1e-6), k
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # the original is untouched
    assert not any(m._forward_hooks for m in net.modules())


@pytest.mark.parametrize("mod, method, why", [
    (nn.Conv2d(2, 3, 1, bias=False), "mean", "Conv2d has no bias to hold the mean"),
    (nn.Linear(2, 3, bias=False), "mean", "Linear has no bias to hold the mean"),
    (nn.BatchNorm2d(3, affine=False), "zero", "BatchNorm2d has no affine weight"),
    (nn.LayerNorm(3, bias=False), "mean", "LayerNorm has no bias to hold the mean"),
    (nn.LayerNorm((1, 3)), "zero", "LayerNorm has no weights that produce its output units"),
])
def test_weight_edit_falls_back_to_a_hook(mod, method, why):
    assert E._edit_weights(mod, [1], method, torch.tensor([0.0, 5.0, 0.0])) == why


@pytest.mark.parametrize("mod, x", [(nn.Conv2d(2, 3, 1, bias=False), torch.ones(1, 2, 1, 1)),
                                    (nn.LayerNorm(3, bias=False), torch.tensor([[1.0, 2.0, 4.0]]))])
def test_weight_edit_without_bias_zeroes(mod, x):
    with pytest.warns(UserWarning) as w:  # the mean has nowhere to go: a hook
        hooked = E.permanent_edit(nn.Sequential(mod), [("0", 1)], "mean", {"0": [0.0, 5.0, 0.0]})
    assert len(w) == 1 and getattr(hooked, E.ABLATION_ATTR)["0"]["how"] == "hook"
    assert hooked(x).flatten()[1] == 5.0
    zeroed = E.permanent_edit(nn.Sequential(mod), [("0", 1)], "zero")
    assert getattr(zeroed, E.ABLATION_ATTR)["0"]["how"] == "weights" and zeroed(x).flatten()[1] == 0.0
    assert (zeroed[0].weight != 0).sum() == mod.weight.numel() - mod.weight[1].numel()


def test_weight_edit_zero_ignores_a_mean_and_keeps_the_dtype():
    lin = nn.Linear(2, 3).double()
    assert E._edit_weights(lin, [1], "zero", torch.tensor([7.0, 8.0, 9.0])) is None
    assert lin.bias[1] == 0 and (lin.weight[1] == 0).all()
    m = E.permanent_edit(nn.Sequential(nn.Linear(2, 3).double()), {"0": [2]}, "mean", {"0": [0.0, 0.0, 1 / 3]})
    assert m[0].bias.dtype == torch.float64 and m[0].bias[2] == torch.tensor(1 / 3, dtype=torch.float32).double()
    m = E.permanent_edit(nn.Sequential(nn.Linear(2, 3).half()), [("0", 0)])  # method 'zero' by default
    assert m[0].bias[0] == 0 and getattr(m, E.ABLATION_ATTR)["0"]["method"] == "zero"


def test_permanent_hook_on_a_tuple_output():
    class Pair(nn.Module):
        def forward(self, x):
            return x, x + 1
    with pytest.warns(UserWarning):
        m = E.permanent_edit(nn.Sequential(Pair()), {"0": [1]}, "mean", {"0": [9.0, 8.0]})
    a, b = m(seq(1, 2))
    assert a.tolist() == [[1.0, 8.0]] and b.tolist() == [[2.0, 3.0]]


def test_ablation_edits_checks_eagerly():
    net = Net()
    assert E.ablation_edits(net, {}) == {} and E.ablation_edits(net, {"conv": []}) == {}
    for units, method, means, err, message in [
            ({"conv": [4]}, "zero", None, UnitIndexError,
             "unit 4 is out of range for layer 'conv', which has units 0..3 (Conv2d with 4 outputs)"),
            ({"lin": [1, 3]}, "zero", None, UnitIndexError,
             "unit 3 is out of range for layer 'lin', which has units 0..2 (Linear with 3 outputs)"),
            ({"conv": [1]}, "mean", {"conv": [0.0, 1.0, 2.0]}, ValueError,
             "means['conv'] has 3 values but layer 'conv' has 4 units"),
            ({"conv": [1]}, "mean", None, ValueError, "method='mean' needs means"),
            ({"conv": [1]}, "max", None, ValueError, "method must be 'zero' or 'mean'; got 'max'")]:
        with pytest.raises(err, match="^" + re.escape(message)):
            E.ablation_edits(net, units, method, means)
        with pytest.raises(err, match="^" + re.escape(message)):
            E.permanent_edit(net, units, method, means)
    with pytest.raises(UnknownLayerError, match="unknown layer 'convv'"):
        E.ablation_edits(net, {"convv": [0]})
    e = E.ablation_edits(net, {"box": [9]})["box"]  # no parameters: checked on the first call
    message = "unit 9 is out of range for layer 'box', which has units 0..3 (output shape (2, 3, 5, 4))"
    with pytest.raises(UnitIndexError, match="^" + re.escape(message) + "$"):
        outputs(net, {"box": e})
    with pytest.warns(UserWarning):
        hooked = E.permanent_edit(net, {"box": [9]})  # the same check in a permanent hook
    with pytest.raises(UnitIndexError, match="^" + re.escape(message) + "$"):
        hooked(X)
    m = nn.Sequential(nn.ReLU())
    with pytest.raises(LayoutError, match="^layer '0': cannot tell"), trace(m, edit=E.ablation_edits(m, [("0", 0)])):
        m(torch.zeros(1, 2, 2, 2))  # both readings fit
