"""Exact, fast tests of :mod:`neuroscribe.hooks`, sized for mutation testing (``make mutation``).

The layer hooks (read, edit, retain, early stop), unit views of NCHW / NHWC / token / flat outputs, and how a
layer's layout is decided (declarations, module type, channel count, shape). Tensors are tiny; every expected value
is written out or built by plain indexing.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from neuroscribe import hooks as H
from neuroscribe.hooks import LayoutError


def seq(n: int, *shape: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32).reshape(*shape)


# ============================================================================== first tensor / replace
def test_first_tensor_of_each_output_kind():
    t, u = seq(2, 2), seq(3, 3)
    assert H._first_tensor(t) is t
    assert H._first_tensor((t, u)) is t
    assert H._first_tensor([t, u]) is t
    assert H._first_tensor(SimpleNamespace(last_hidden_state=u)) is u
    for bad in [(), [], (None, t), {0: t}, None]:
        with pytest.raises(TypeError, match=f"^layer output of type {type(bad).__name__} holds no tensor to record$"):
            H._first_tensor(bad)


def test_replace_first_keeps_the_rest():
    t, new, a, b = seq(1, 1), seq(2, 2), object(), object()
    assert H._replace_first(t, new) is new
    out = H._replace_first((t, a, b), new)
    assert type(out) is tuple and out[0] is new and out[1] is a and out[2] is b and len(out) == 3
    out = H._replace_first([t, a, b], new)
    assert type(out) is list and out[0] is new and out[1] is a and out[2] is b and len(out) == 3
    with pytest.raises(TypeError, match="cannot edit a layer output of type dict"):
        H._replace_first({0: t}, new)


# ============================================================================== hooks in a trace
class Chain(nn.Module):
    """x -> a (x2) -> b (+1, called twice) -> c (x3); ``out += 100`` rewrites b's output and c's input in place."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(2.0))
        self.a, self.b, self.c = Scale(self.w), Plus(), Scale3()
        self.after = 0  # modules run after the retained ones (to see an early stop)

    def forward(self, x):
        y = self.b(self.b(self.a(x)))
        z = self.c(y)
        y += 100          # in place, after c read it: a retained copy must not change
        self.after += 1
        return z


class Scale(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = w

    def forward(self, x):
        return x * self.w


class Plus(nn.Module):
    def forward(self, x):
        return x + 1


class Scale3(nn.Module):
    def forward(self, x):
        return x * 3


def test_trace_retains_copies_after_the_edit():
    m, x = Chain(), torch.tensor([1.0, 2.0])
    with H.trace(m, retain=["b", "c"], edit={"a": lambda t: t * 10}, retain_inputs=["c"]) as tr:
        z = H.run(m, x)
    # a: x*2*10 = [20, 40]; b twice: [22, 42]; c: [66, 126]
    assert z.tolist() == [66.0, 126.0]
    assert tr["b"].tolist() == [22.0, 42.0] and tr["c"].tolist() == [66.0, 126.0]  # not rewritten by `y += 100`
    assert tr.inputs["c"].tolist() == [22.0, 42.0] and set(tr.inputs) == {"c"}
    assert tr.calls == {"b": 2, "c": 1} and set(tr.outputs) == {"b", "c"}
    assert "b" in tr and "a" not in tr
    assert not tr["b"].requires_grad and tr["b"].grad_fn is None and not tr.inputs["c"].requires_grad
    assert m.after == 1
    assert not m.a._forward_hooks and not m.b._forward_hooks and not m.c._forward_hooks  # removed on exit


def test_trace_without_detach_keeps_the_graph():
    m = Chain()
    with H.trace(m, retain=["a"], detach=False) as tr:
        H.run(m, torch.tensor([1.0, 2.0]))
    assert tr["a"].requires_grad
    tr["a"].sum().backward()
    assert m.w.grad.item() == 3.0


def test_an_edit_on_a_tuple_output_and_no_edit_returns_none():
    class Pair(nn.Module):
        def forward(self, x):
            return x, x + 1

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = Pair()

        def forward(self, x):
            a, b = self.p(x)
            return a * 10 + b

    m, x = M(), torch.tensor([1.0])
    with H.trace(m, edit={"p": lambda t: t * 0}, retain=["p"]) as tr:
        assert H.run(m, x).tolist() == [2.0]
    assert tr["p"].tolist() == [0.0]
    with H.trace(m, retain=["p"]) as tr:
        assert H.run(m, x).tolist() == [12.0]


def test_stop_after_every_retained_layer_and_its_calls():
    x = torch.tensor([1.0])
    for retain, calls, stopped in [(["a"], None, True), (["b"], None, True), (["b"], {"b": 2}, True),
                                   (["b"], {"b": 3}, False), (["a", "c"], None, True)]:
        m = Chain()
        with H.trace(m, retain=retain, stop=True, calls=calls) as tr:
            out = H.run(m, x)
        assert (out is None) == stopped and m.after == (0 if stopped else 1), (retain, calls)
        assert set(tr.outputs) == set(retain)
    m = Chain()
    with H.trace(m, retain=["b"], stop=True, calls={"b": 2}) as tr:
        H.run(m, x)
    assert tr["b"].tolist() == [4.0] and tr.calls["b"] == 2  # the second call's output
    m = Chain()
    with H.trace(m, retain=["b"], stop=False) as tr:
        assert H.run(m, x).tolist() == [12.0]
    m = Chain()  # an edit needs the whole pass: no early stop
    with H.trace(m, retain=["a"], edit={"c": lambda t: t}, stop=True) as tr:
        assert H.run(m, x).tolist() == [12.0]



def test_visit_reads_each_layers_last_output_before_later_in_place_ops_and_counts_for_the_stop():
    m, x = Chain(), torch.tensor([1.0, 2.0])
    seen = []
    with H.trace(m, visit={"b": lambda t: seen.append(("b", t.tolist(), t.requires_grad)),
                           "c": lambda t: seen.append(("c", t.tolist(), t.requires_grad))},
                 calls={"b": 2}, edit={"a": lambda t: t * 10}) as tr:
        H.run(m, x)
    # b's second call only (its last), read before `y += 100` rewrote it; c once; nothing retained
    assert seen == [("b", [22.0, 42.0], False), ("c", [66.0, 126.0], False)]
    assert tr.outputs == {} and tr.calls == {"b": 2, "c": 1}
    m, seen = Chain(), []
    with H.trace(m, visit={"b": lambda t: seen.append(t)}, stop=True, calls={"b": 2}):
        assert H.run(m, x) is None  # stopped after b's last call, before c
    assert m.after == 0 and len(seen) == 1 and seen[0].tolist() == [4.0, 6.0]
    m = Chain()
    with H.trace(m, visit={"a": lambda t: None}, retain=["c"], stop=True):
        H.run(m, x)
    assert m.after == 0  # waits for c as well, then stops
    m = Chain()
    with H.trace(m, visit={"a": lambda t: t.mul_(0)}):  # a visit that writes would change the model's pass
        assert H.run(m, x).tolist() == [6.0, 6.0]  # (0 + 1 + 1) x 3


# ============================================================================== unit views
def test_prefix_tokens():
    assert [H.prefix_tokens(None, n) for n in (16, 17, 20, 24, 1, 2, 10)] == [0, 1, 4, 8, 0, 1, 1]
    assert H.prefix_tokens(SimpleNamespace(num_prefix_tokens=5), 16) == 5
    assert H.prefix_tokens(SimpleNamespace(num_prefix_tokens=None), 17) == 1
    assert H.prefix_tokens(SimpleNamespace(), 17) == 1 and H.prefix_tokens(nn.ReLU(), 16) == 0
    with pytest.raises(ValueError, match="^cannot lay 34 tokens on a square grid after dropping up to 8 prefix"):
        H.prefix_tokens(None, 34)  # 34 = 25 + 9: only a prefix of 9 would do


def test_unit_view_of_each_layout():
    t = seq(2 * 3 * 4 * 5, 2, 3, 4, 5)
    assert H.unit_view(t, layout="nchw") is t
    v = H.unit_view(t, layout="nhwc")
    assert v.shape == (2, 5, 3, 4) and torch.equal(v, t.permute(0, 3, 1, 2))
    sq = seq(2 * 3 * 3 * 5, 2, 3, 3, 5)  # H == W on axes 1, 2: channels-last by shape
    assert torch.equal(H.unit_view(sq), sq.permute(0, 3, 1, 2))
    sq = seq(2 * 5 * 3 * 3, 2, 5, 3, 3)
    assert H.unit_view(sq) is sq
    flat = seq(6, 2, 3)
    assert H.unit_view(flat).shape == (2, 3, 1, 1) and H.unit_view(flat)[1, 2, 0, 0] == 5
    tok = seq(2 * 10 * 3, 2, 10, 3)  # 1 CLS + 3x3
    v = H.unit_view(tok)
    assert v.shape == (2, 3, 3, 3) and torch.equal(v, tok[:, 1:].reshape(2, 3, 3, 3).permute(0, 3, 1, 2))
    v = H.unit_view(tok, n_prefix=6)  # 2x2 grid after an explicit prefix of 6
    assert torch.equal(v, tok[:, 6:].reshape(2, 2, 2, 3).permute(0, 3, 1, 2))
    tok = seq(25 * 2, 1, 25, 2)
    assert H.unit_view(tok, n_prefix=9).shape == (1, 2, 4, 4) and H.unit_view(tok).shape == (1, 2, 5, 5)
    with pytest.raises(ValueError, match="^25 tokens minus 2 prefix tokens is not a square grid$"):
        H.unit_view(tok, n_prefix=2)
    with pytest.raises(ValueError, match=r"cannot interpret a layer output of shape \(1, 1, 1, 1, 1\) as units"):
        H.unit_view(torch.zeros(1, 1, 1, 1, 1))
    with pytest.raises(LayoutError, match="^layer '<unnamed>': cannot tell"):
        H.unit_view(torch.zeros(1, 4, 4, 4))
    with pytest.raises(LayoutError, match=r"^layer '<unnamed>': layout must be one of \['nchw', 'nhwc'\]; got 'x'$"):
        H.unit_view(t, layout="x")


def test_layer_kind():
    assert [H.layer_kind(torch.zeros((1,) * d)) for d in (4, 3, 2, 1, 5)] == ["conv", "tokens", "flat", "other",
                                                                              "other"]


# ============================================================================== layouts
def test_declare_layouts_adds_and_overrides():
    m = nn.Sequential(nn.ReLU())
    assert H.declare_layouts(m, {"0": "nhwc", "x": "nchw"}) is m
    H.declare_layouts(m, {"0": "nchw", "y": "nhwc"})
    assert getattr(m, H.LAYOUT_ATTR) == {"0": "nchw", "x": "nchw", "y": "nhwc"}
    with pytest.raises(LayoutError, match=r"^layer 'z': layout must be one of \['nchw', 'nhwc'\]; got 'NHWC'$"):
        H.declare_layouts(m, {"z": "NHWC"})
    assert getattr(m, H.LAYOUT_ATTR) == {"0": "nchw", "x": "nchw", "y": "nhwc"}


class LN(nn.LayerNorm):
    pass


def test_module_width_and_layout():
    cases = [(nn.Conv1d(1, 3, 1), 3, None), (nn.Conv2d(1, 4, 1), 4, "nchw"), (nn.Conv3d(1, 5, 1), 5, None),
             (nn.ConvTranspose2d(1, 6, 1), None, "nchw"), (nn.Linear(2, 7), 7, "nhwc"),
             (nn.BatchNorm1d(8), 8, None), (nn.BatchNorm2d(9), 9, "nchw"), (nn.GroupNorm(2, 10), 10, "nchw"),
             (nn.LayerNorm(11), 11, "nhwc"), (nn.LayerNorm((2, 12)), None, "nhwc"), (LN(13), 13, None),
             (nn.MaxPool2d(2), None, "nchw"), (nn.AvgPool2d(2), None, "nchw"),
             (nn.AdaptiveAvgPool2d(1), None, "nchw"), (nn.AdaptiveMaxPool2d(1), None, "nchw"),
             (nn.ReLU(), None, None), (nn.Sequential(nn.Conv2d(1, 2, 1)), None, None)]
    for mod, width, layout in cases:
        assert H.module_width(mod) == width and type(H.module_width(mod)) is type(width), mod
        assert H.module_layout(mod) == layout, mod


def test_channel_count_from_the_module_or_feature_info():
    blk = nn.ReLU()
    m = nn.Sequential(blk)
    assert H.channel_count(m, "0", blk) is None and H.channel_count(m, "0", nn.Linear(1, 3)) == 3
    m.feature_info = ["x", {"module": "1", "num_chs": 4}, {"module": "0", "num_chs": "6"}, {"num_chs": 7},
                      {"module": "0", "num_chs": 5}, {"module": "0", "num_chs": 8}]
    assert H.channel_count(m, "0", blk) == 5
    assert H.channel_count(m, "0", nn.Conv2d(1, 2, 1)) == 2
    assert H.channel_count(m, "2", blk) is None
    m.feature_info = ({"module": "0", "num_chs": 5},)  # only a list (timm's) is read
    assert H.channel_count(m, "0", blk) is None


def msg(name, shape, why):
    return (f"layer {name!r}: cannot tell whether its output {list(shape)} is channels-first (C, H, W) or "
            f"channels-last (H, W, C): {why}. Declare it in the job config, e.g. `layouts: {{{name}: nhwc}}` (or "
            f"nchw), or in code with neuroscribe.hooks.declare_layouts(model, {{{name!r}: 'nhwc'}})")


def test_detect_layout():
    assert H.detect_layout((1, 8, 3, 3), "l") == "nchw" and H.detect_layout((1, 3, 3, 8), "l") == "nhwc"
    assert H.detect_layout((1, 8, 3, 4), "l", 8) == "nchw" and H.detect_layout((1, 3, 4, 8), "l", 8) == "nhwc"
    cases = [((1, 4, 4, 4), None, "no channel count is known for it and both readings of the shape give a square "
                                  "spatial grid"),
             ((1, 2, 3, 4), None, "no channel count is known for it and neither reading of the shape give a square "
                                  "spatial grid"),
             ((1, 5, 3, 5), 5, "its channel count 5 matches both axis 1 and axis 3"),
             ((1, 5, 3, 5), 3, "its channel count 3 matches neither axis 1 nor axis 3")]
    for shape, ch, why in cases:
        with pytest.raises(LayoutError) as e:
            H.detect_layout(shape, "blk.1", ch)
        assert str(e.value) == msg("blk.1", shape[1:], why)


def test_layout_from_resize():
    assert H.layout_from_resize("l", (1, 24, 24, 24), (2, 24, 32, 32)) == "nchw"
    assert H.layout_from_resize("l", (1, 24, 24, 24), (2, 32, 32, 24)) == "nhwc"
    why = ("layer 'blk.1': cannot tell whether its output is channels-first (C, H, W) or channels-last (H, W, C): "
           "it is [4, 4, 4] at one input size and {} at another. Declare it in the job config, e.g. "
           "`layouts: {{blk.1: nhwc}}` (or nchw), or in code with "
           "neuroscribe.hooks.declare_layouts(model, {{'blk.1': 'nhwc'}})")
    assert H.layout_from_resize("blk.1", (1, 4, 4, 4), (1, 5, 5, 4)) == "nhwc"
    # nothing moved, only one spatial axis moved (either reading), or nothing kept
    for other in [(1, 4, 4, 4), (1, 4, 5, 4), (1, 4, 4, 5), (1, 5, 4, 4), (1, 5, 5, 5)]:
        with pytest.raises(LayoutError) as e:
            H.layout_from_resize("blk.1", (1, 4, 4, 4), other)
        assert str(e.value) == why.format(list(other[1:]))


def test_layer_layout_order_of_evidence():
    m = nn.Sequential(nn.Conv2d(1, 4, 1), nn.Linear(2, 4), nn.ReLU(), nn.ReLU())
    assert H.layer_layout(m, "0", (1, 4, 5)) is None and H.layer_layout(m, "0", (1, 4)) is None
    assert H.layer_layout(m, "0", (1, 4, 4, 4)) == "nchw" and H.layer_layout(m, "1", (1, 4, 4, 4)) == "nhwc"
    assert H.layer_layout(m, "0", (1, 4, 4, 4), module=nn.Linear(1, 2)) == "nhwc"  # the given module wins
    assert H.layer_layout(m, "2", (1, 3, 3, 6)) == "nhwc"  # shape alone
    m.feature_info = [{"module": "2", "num_chs": 4}]
    assert H.layer_layout(m, "2", (1, 4, 4, 3)) == "nchw" and H.layer_layout(m, "2", (1, 4, 4, 3), {}) == "nchw"
    H.declare_layouts(m, {"0": "nhwc", "3": "nchw"})
    assert H.layer_layout(m, "0", (1, 4, 4, 4)) == "nhwc"  # the model's declaration beats the type
    assert H.layer_layout(m, "0", (1, 4, 4, 4), {"0": "nchw"}) == "nchw"  # the job's beats the model's
    assert H.layer_layout(m, "3", (1, 4, 4, 4), {"0": "nchw"}) == "nchw"
    m2 = nn.Sequential(nn.ReLU(), LN(4))  # a LayerNorm subclass (e.g. timm's LayerNorm2d): its width, not its type
    assert H.layer_layout(m2, "1", (1, 4, 4, 3)) == "nchw" and H.layer_layout(m2, "0", (1, 4, 4, 3)) == "nhwc"
    with pytest.raises(LayoutError, match=r"^layer '1': layout must be one of \['nchw', 'nhwc'\]; got 'hw'$"):
        H.layer_layout(m, "1", (1, 4, 4, 4), {"1": "hw"})
    with pytest.raises(LayoutError, match="^layer '3': cannot tell"):
        H.layer_layout(nn.Sequential(*m[:3], nn.ReLU()), "3", (1, 4, 4, 4))


# ============================================================================== catalogue
class Zoo(nn.Module):
    """Outputs of every kind, in a fixed order: conv map, channels-last map, ambiguous map, tokens, flat, 5-D."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 2, stride=2)          # (1, 4, 2, 2) from a 4x4 input
        self.ln = nn.LayerNorm(4)                          # (1, 2, 2, 4) after a permute
        self.act = nn.Identity()                           # (1, 2, 3, 4): ambiguous
        self.tok = nn.Identity()                           # (1, 5, 4)
        self.none = NoneOut()                              # no tensor: left out
        self.lin = nn.Linear(4, 3)                         # (1, 3), called twice
        self.five = nn.Identity()                          # (1, 1, 1, 1, 2)
        self.dec = nn.Identity()                           # (1, 2, 3, 4), declared channels-last
        self.info = nn.Identity()                          # (1, 2, 2, 3), 3 channels by feature_info
        self.all = nn.Identity()                           # (1, 16): every value of the batch in one row
        self.feature_info = [{"module": "info", "num_chs": 3}]
        H.declare_layouts(self, {"dec": "nhwc"})

    def forward(self, x):
        c = self.conv(x)
        self.ln(c.permute(0, 2, 3, 1))
        self.act(torch.zeros(1, 2, 3, 4))
        self.tok(torch.zeros(1, 5, 4))
        self.none(c)
        self.lin(torch.zeros(2, 4))
        self.five(torch.zeros(1, 1, 1, 1, 2))
        self.dec(torch.zeros(1, 2, 3, 4))
        self.info(torch.zeros(1, 2, 2, 3))
        self.all(c.reshape(1, -1))
        return self.lin(c.mean((2, 3)))[:1]


class NoneOut(nn.Module):
    def forward(self, x):
        return None


def test_layer_catalogue():
    got = [(i.name, i.type, i.kind, i.shape, i.units, i.calls, i.layout) for i in H.layer_catalogue(Zoo(), 4)]
    assert got == [("conv", "Conv2d", "conv", (4, 2, 2), 4, 1, "nchw"),
                   ("ln", "LayerNorm", "conv", (2, 2, 4), 4, 1, "nhwc"),
                   ("act", "Identity", "conv", (2, 3, 4), 2, 1, "?"),
                   ("tok", "Identity", "tokens", (5, 4), 4, 1, None),
                   ("lin", "Linear", "flat", (3,), 3, 2, None),
                   ("five", "Identity", "other", (1, 1, 1, 2), 0, 1, None),
                   ("dec", "Identity", "conv", (2, 3, 4), 4, 1, "nhwc"),
                   ("info", "Identity", "conv", (2, 2, 3), 3, 1, "nhwc"),
                   ("all", "Identity", "flat", (16,), 16, 1, None)]
