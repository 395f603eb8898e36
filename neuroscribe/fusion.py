"""Inference copies of conv nets that make fewer passes over their activations.

Two folds, each exact in real arithmetic, both found by tracing one forward pass (which tensor each module received
and returned), never by module names or order:

* batch norm (eval mode, running statistics) whose input *is* the output of a Conv2d: its scale and shift go into
  that convolution's weight and bias, and the batch norm becomes ``nn.Identity`` under the same name;
* a symmetric zero pad (``nn.ZeroPad2d``, ``nn.ConstantPad2d`` with 0) whose output *is* a Conv2d's input, or which
  is a Conv2d's own child fed that conv's input (TensorFlow-style "same" convolutions, as in EfficientNet-Lite):
  the padding moves into the convolution (``padding=``), the pad becomes ``nn.Identity``.

Nothing is folded that would change a layer the caller keeps (``keep``: its output must stay what it was), nor a
module called more than once per pass. The copy is then checked against the original on the traced batch, at every
kept layer and at the output; a copy that disagrees (e.g. a conv output that is also read elsewhere, which tracing
cannot see) is dropped and the original is used. What :func:`fold_for_inference` did is returned beside the model.

Used for the describe stage's inference passes (verification, the tagger's classifier), not for recording: record's
overhead is measured against the model's own forward pass. On EfficientNet-Lite0 at 224 px on 2 CPU cores, batch
norm, the pads and the activations took about half of the forward time (``benchmarks/fusion_speed.py``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["fold_for_inference"]

_PADS = (nn.ZeroPad2d, nn.ConstantPad2d)


def _plan(model: nn.Module, x: torch.Tensor, keep: set[str]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``(conv, batchnorm)`` and ``(pad, conv)`` name pairs that can be folded, from one traced pass."""
    names = {m: n for n, m in model.named_modules()}
    calls: dict[str, int] = {}
    produced: dict[int, tuple[str, torch.Tensor]] = {}  # id(output) -> (conv or pad name, the tensor: keeps the id)
    inputs: dict[str, torch.Tensor] = {}
    bn_pairs, pad_pairs = [], []

    def pre(mod, args):
        name = names[mod]
        calls[name] = calls.get(name, 0) + 1
        if args and isinstance(args[0], torch.Tensor):
            inputs[name] = args[0]
            src = produced.get(id(args[0]))
            if src is not None and src[1] is args[0]:
                if isinstance(mod, nn.BatchNorm2d) and isinstance(model.get_submodule(src[0]), nn.Conv2d):
                    bn_pairs.append((src[0], name))
                elif isinstance(mod, nn.Conv2d) and isinstance(model.get_submodule(src[0]), _PADS):
                    pad_pairs.append((src[0], name))

    def post(mod, args, out):
        if isinstance(out, torch.Tensor):
            produced[id(out)] = (names[mod], out)

    handles = []
    for mod in model.modules():
        if isinstance(mod, (nn.Conv2d, nn.BatchNorm2d) + _PADS):
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
    bn_pairs = [(c, b) for c, b in bn_pairs if {c, b} <= once and c not in keep and _foldable_bn(model, c, b)]
    pad_pairs = [(p, c) for p, c in pad_pairs if {p, c} <= once and p not in keep and _foldable_pad(model, p, c)]
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
        scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.weight.copy_(conv.weight * scale.reshape(-1, *([1] * (conv.weight.dim() - 1))))
        conv.bias = nn.Parameter((bias - bn.running_mean) * scale + shift, requires_grad=False)
        _set(model, bn_name, nn.Identity())
    for pad_name, conv_name in pad_pairs:
        model.get_submodule(conv_name).padding = _symmetric(model.get_submodule(pad_name))
        _set(model, pad_name, nn.Identity())


def _outputs(model: nn.Module, x: torch.Tensor, keep: list[str]) -> list[torch.Tensor]:
    from .hooks import trace
    with torch.no_grad(), trace(model, keep) as tr:
        out = model(x)
    return [tr[k] for k in keep] + [o for o in (out if isinstance(out, (tuple, list)) else [out])
                                    if isinstance(o, torch.Tensor)]


def _agree(a: list[torch.Tensor], b: list[torch.Tensor], rtol: float) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and float((x.float() - y.float()).abs().max()) <= rtol * max(1.0, float(x.abs().max()))
        for x, y in zip(a, b))


def fold_for_inference(model: nn.Module, x: torch.Tensor, keep: Iterable[str] = (),
                       rtol: float = 1e-3) -> tuple[nn.Module, dict]:
    """An inference copy of ``model`` with batch norm and symmetric zero pads folded into its convolutions (see the
    module docstring), traced and checked on the batch ``x``; the layers named in ``keep`` give the same outputs.

    Returns ``(model_to_use, info)``: the original ``model`` itself when there is nothing to fold (no copy is made)
    or when the check fails; ``info`` = ``{"batchnorm": n, "pad": n, "checked": bool, "why": str}``."""
    keep = list(dict.fromkeys(keep))
    if model.training:
        return model, {"batchnorm": 0, "pad": 0, "checked": False, "why": "the model is in training mode"}
    bn_pairs, pad_pairs = _plan(model, x, set(keep))
    if not bn_pairs and not pad_pairs:
        return model, {"batchnorm": 0, "pad": 0, "checked": False, "why": "nothing to fold"}
    folded = copy.deepcopy(model)
    _apply(folded, bn_pairs, pad_pairs)
    if not _agree(_outputs(model, x, keep), _outputs(folded, x, keep), rtol):
        return model, {"batchnorm": 0, "pad": 0, "checked": False,
                       "why": "the folded copy disagreed with the model on the traced batch; the model is used as is"}
    return folded, {"batchnorm": len(bn_pairs), "pad": len(pad_pairs), "checked": True, "why": ""}
