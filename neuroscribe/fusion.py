"""Inference copies of conv nets that make fewer passes over their activations.

Two folds, each exact in real arithmetic, both found by tracing one forward pass (which tensor each module received
and returned), never by module names or order:

* a plain ``nn.BatchNorm2d`` (eval mode, running statistics) whose input *is* the output of a Conv2d: its scale and
  shift go into that convolution's weight and bias (computed in float64), and the batch norm becomes
  ``nn.Identity`` under its name. timm's ``BatchNormAct2d`` (a norm, then its ``drop`` and ``act`` children) is
  folded alike and keeps its ``drop`` and ``act`` under their names; a subclass with its own forward carries more
  than a norm and is left alone;
* a symmetric zero pad (``nn.ZeroPad2d``, ``nn.ConstantPad2d`` with 0) whose output *is* a Conv2d's input, or which
  is a Conv2d's own child fed that conv's input (TensorFlow-style "same" convolutions, as in EfficientNet-Lite):
  the padding moves into the convolution (``padding=``), the pad becomes ``nn.Identity``.

A fold is not planned when it would change what a kept layer (``keep``) outputs: a kept conv or pad, or a conv or
pad whose output tensor is a kept layer's output; nor for a module called more than once per pass. The copy is then
checked against the original on the traced batch, every element of every kept layer and of the output (tensors in
tuples, lists and dicts): ``|folded - original| <= tol * (max|original| + |original|)``, ``tol`` = 1e-5 (2e-3 for
CUDA convolutions in TF32). What the trace cannot see (a conv output also read elsewhere, an in-place edit between
conv and norm, a conv that standardises its weight) fails the check; each fold is then tried alone and only those
that pass alone are kept (checked again together); otherwise the original model is used. Only float32 and float64
models are folded. What :func:`fold_for_inference` did is returned beside the model.

Used for the describe stage's inference passes (verification, the tagger's classifier) and, with
``record.fold_model`` (the default), for the record pass (``benchmarks/record_overhead.py`` prints the pass against
the forward of the model as loaded and against that of the folded copy, so the hooks' own cost stays visible). In a
profile of the describe stage on EfficientNet-Lite0
(528 units, 1,000 photos), batch norm took 23 s and the pads 17 s of the 120 s spent in the model's forward;
``benchmarks/fusion_speed.py`` measures the folded copy against the original.

The memory layout of those passes is here too (:func:`channels_last`, :func:`to_layout`; re-exported by
:mod:`neuroscribe.models`): NHWC kernels, used by verification, training, the ablation curve and evaluation (the
tagger's classifier converts its own copy once).
"""

from __future__ import annotations

import contextlib
import copy
import sys
import weakref
from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["channels_last", "fold_for_inference", "to_layout", "uses_conv2d"]

_PADS = (nn.ZeroPad2d, nn.ConstantPad2d)


def uses_conv2d(module: nn.Module) -> bool:
    """Whether ``module`` holds a 2-D convolution (then the channels-last layout speeds it up)."""
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def to_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``x`` in the channels-last memory layout when asked and 4-D; values and indexing are unchanged."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


@contextlib.contextmanager
def channels_last(module: nn.Module, enable: bool = True):
    """Run passes of a conv net in the channels-last memory layout (NHWC kernels: ~1.5x faster inference and ~1.2x
    faster training of ResNet-18 on this project's 2-core CPU); the module's usual layout is restored on exit. Yields
    whether the layout is in use, for :func:`to_layout` on inputs. Layouts change float summation order, not what
    any index means, so hooks and unit edits behave the same. Inside an outer block on the same module nothing is
    converted (each conversion copies every weight: ~5 ms for EfficientNet-Lite0, twice per batch otherwise)."""
    if not enable:
        yield False
        return
    if module in _NHWC:
        yield True
        return
    on = uses_conv2d(module)
    if not on:
        yield False
        return
    module.to(memory_format=torch.channels_last)
    _NHWC.add(module)
    try:
        yield True
    finally:
        _NHWC.discard(module)
        module.to(memory_format=torch.contiguous_format)


_NHWC: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # modules inside a channels_last block now


def _timm_norm_act(mod: nn.Module) -> bool:
    """timm's ``BatchNormAct2d`` or a subclass keeping its forward: norm, then ``drop``, then ``act``."""
    if not isinstance(mod, nn.BatchNorm2d) or "timm" not in sys.modules:
        return False
    try:
        from timm.layers import BatchNormAct2d
    except ImportError:  # pragma: no cover - an old timm without timm.layers: nothing folded
        return False
    return isinstance(mod, BatchNormAct2d) and type(mod).forward is BatchNormAct2d.forward \
        and isinstance(getattr(mod, "drop", None), nn.Module) and isinstance(getattr(mod, "act", None), nn.Module)


class _DropAct(nn.Module):
    """What is left of a folded ``BatchNormAct2d``: its ``drop`` and ``act``, under their own names (hooks and
    ``keep`` names such as ``bn1.act`` still resolve)."""

    def __init__(self, drop: nn.Module, act: nn.Module):
        super().__init__()
        self.drop, self.act = drop, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


def _is_bn(mod: nn.Module) -> bool:
    return type(mod) is nn.BatchNorm2d or _timm_norm_act(mod)


def _plan(model: nn.Module, x: torch.Tensor, keep: list[str]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``(conv, batchnorm)`` and ``(pad, conv)`` name pairs that can be folded, from one traced pass."""
    names = {m: n for n, m in model.named_modules()}
    kept_modules = {model.get_submodule(k) for k in keep}
    calls: dict[str, int] = {}
    produced: dict[int, tuple[str, torch.Tensor]] = {}  # id(output) -> (conv or pad name, the tensor: keeps the id)
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    kept_out: list[torch.Tensor] = []
    bn_pairs, pad_pairs = [], []

    def pre(mod, args):
        name = names[mod]
        calls[name] = calls.get(name, 0) + 1
        if args and isinstance(args[0], torch.Tensor):
            inputs[name] = args[0]
            src = produced.get(id(args[0]))
            if src is not None and src[1] is args[0]:
                if _is_bn(mod) and isinstance(model.get_submodule(src[0]), nn.Conv2d):
                    bn_pairs.append((src[0], name))
                elif isinstance(mod, nn.Conv2d) and isinstance(model.get_submodule(src[0]), _PADS):
                    pad_pairs.append((src[0], name))

    def post(mod, args, out):
        if isinstance(out, torch.Tensor):
            if mod in kept_modules:
                kept_out.append(out)
            if isinstance(mod, (nn.Conv2d,) + _PADS):
                produced[id(out)] = (names[mod], out)
                outputs[names[mod]] = out

    handles = []
    for mod in model.modules():
        if isinstance(mod, (nn.Conv2d, nn.BatchNorm2d) + _PADS) or mod in kept_modules:
            handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    for conv_name, conv in model.named_modules():  # "same" convs: the pad is the conv's child, fed the conv's input
        if isinstance(conv, nn.Conv2d):
            for child_name, child in conv.named_children():
                pad_name = f"{conv_name}.{child_name}" if conv_name else child_name
                if isinstance(child, _PADS) and pad_name in inputs and conv_name in inputs \
                        and inputs[pad_name] is inputs[conv_name]:
                    pad_pairs.append((pad_name, conv_name))
    once = {n for n, c in calls.items() if c == 1}

    def free(name: str) -> bool:  # not kept, and its output is no kept layer's output
        return name not in keep and not any(outputs.get(name) is t for t in kept_out)
    bn_pairs = [(c, b) for c, b in bn_pairs if {c, b} <= once and free(c) and _foldable_bn(model, c, b)]
    pad_pairs = [(p, c) for p, c in pad_pairs if {p, c} <= once and free(p) and _foldable_pad(model, p, c)]
    return bn_pairs, pad_pairs


def _foldable_bn(model: nn.Module, conv_name: str, bn_name: str) -> bool:
    conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
    return (not bn.training and bn.track_running_stats and bn.running_mean is not None
            and bn.num_features == conv.out_channels)


def _symmetric(pad: nn.Module) -> tuple[int, int] | None:
    if isinstance(pad, nn.ConstantPad2d) and not isinstance(pad, nn.ZeroPad2d) and pad.value != 0:
        return None
    left, right, top, bottom = pad.padding
    return (top, left) if left == right and top == bottom and min(left, top) >= 0 else None


def _foldable_pad(model: nn.Module, pad_name: str, conv_name: str) -> bool:
    conv = model.get_submodule(conv_name)
    return (_symmetric(model.get_submodule(pad_name)) is not None and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str) and tuple(conv.padding) == (0, 0))


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


@torch.no_grad()
def _apply(model: nn.Module, bn_pairs, pad_pairs) -> None:
    for conv_name, bn_name in bn_pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        mean, var = bn.running_mean.double(), bn.running_var.double()
        scale = (bn.weight.double() if bn.affine else torch.ones_like(var)) / torch.sqrt(var + bn.eps)
        shift = bn.bias.double() if bn.affine else torch.zeros_like(mean)
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(mean)
        w = conv.weight
        w.copy_((w.double() * scale.reshape(-1, *([1] * (w.dim() - 1)))).to(w.dtype))
        conv.bias = nn.Parameter(((bias - mean) * scale + shift).to(w.dtype), requires_grad=False)
        _set(model, bn_name, _DropAct(bn.drop, bn.act) if _timm_norm_act(bn) else nn.Identity())
    for pad_name, conv_name in pad_pairs:
        model.get_submodule(conv_name).padding = _symmetric(model.get_submodule(pad_name))
        _set(model, pad_name, nn.Identity())


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _tensors(v)]
    return []


def _outputs(model: nn.Module, x: torch.Tensor, keep: list[str]) -> list[torch.Tensor]:
    from .hooks import trace
    with torch.no_grad(), trace(model, keep) as tr:
        out = model(x)
    return [tr[k] for k in keep] + _tensors(out)


def _agree(a: list[torch.Tensor], b: list[torch.Tensor], tol: float) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and bool(((x.double() - y.double()).abs()
                                     <= tol * (x.double().abs().max().clamp_min(1e-12) + x.double().abs())).all())
        for x, y in zip(a, b))


def fold_for_inference(model: nn.Module, x: torch.Tensor, keep: Iterable[str] = ()) -> tuple[nn.Module, dict]:
    """An inference copy of ``model`` with batch norm and symmetric zero pads folded into its convolutions (see the
    module docstring), traced and checked on the batch ``x``; the layers named in ``keep`` give the same outputs.

    Returns ``(model_to_use, info)``: the original ``model`` itself when there is nothing to fold (no copy is made)
    or when no fold passes the check; ``info`` = ``{"batchnorm": n, "pad": n, "checked": bool, "why": str}``."""
    keep = list(dict.fromkeys(keep))

    def unchanged(why: str) -> tuple[nn.Module, dict]:
        return model, {"batchnorm": 0, "pad": 0, "checked": False, "why": why}
    if model.training:
        return unchanged("the model is in training mode")
    if {p.dtype for p in model.parameters()} - {torch.float32, torch.float64}:
        return unchanged("only float32 and float64 models are folded")
    bn_pairs, pad_pairs = _plan(model, x, keep)
    if not bn_pairs and not pad_pairs:
        return unchanged("nothing to fold")
    ref = _outputs(model, x, keep)
    if not ref:
        return unchanged("the model returns no tensor to check a fold against")
    tf32 = x.is_cuda and torch.backends.cudnn.allow_tf32
    tol = 2e-3 if tf32 else 1e-5

    def folded(bns, pads) -> nn.Module | None:
        try:
            m = copy.deepcopy(model)
            _apply(m, bns, pads)
            return m if _agree(ref, _outputs(m, x, keep), tol) else None
        except Exception:  # noqa: BLE001 - a fold that cannot run is a fold not made
            return None
    m = folded(bn_pairs, pad_pairs)
    if m is None:  # some fold is wrong in a way the trace cannot see: keep the ones that pass alone
        bn_pairs = [p for p in bn_pairs if folded([p], []) is not None]
        pad_pairs = [p for p in pad_pairs if folded([], [p]) is not None]
        m = folded(bn_pairs, pad_pairs) if bn_pairs or pad_pairs else None
    if m is None:
        return unchanged("no fold agreed with the model on the traced batch; the model is used as is")
    return m, {"batchnorm": len(bn_pairs), "pad": len(pad_pairs), "checked": True, "why": ""}
