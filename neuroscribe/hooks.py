"""One small mechanism to reach named layers, for recording and for ablating.

Layers are ``named_modules()`` names. :func:`trace` checks every name before attaching any hook, attaches on
enter and removes in ``finally``. A hook may *edit* a layer's output (ablation) and/or *retain* it (recording);
the retained output is always the one after the edit, copied at the hook so in-place operations later in the
model cannot change it. ``stop=True`` ends the forward pass as soon as every
retained layer has produced its output, so recording early layers does not pay for the rest of the network.

Layer outputs come in three kinds (see :func:`unit_view`): spatial maps -> C units on an HxW grid, laid out
channels-first ``(B, C, H, W)`` (conv nets) or channels-last ``(B, H, W, C)`` (Swin stages, blocks that end in a
Linear or LayerNorm); transformer tokens ``(B, T, D)`` -> D units on a g x g grid of patch tokens after dropping
the CLS/register prefix; flat ``(B, D)`` -> D units without spatial extent.

Which of the two a map is, :func:`layer_layout` decides per layer, for recording and ablating alike: a declaration
(the job's ``layouts:``, or :func:`declare_layouts` on the model, e.g. by a model adapter) wins; then the module's
type where it fixes the layout (Conv2d, BatchNorm2d, pooling: channels-first; Linear, plain LayerNorm:
channels-last); then the layer's channel count (the module's width, or the model's timm ``feature_info``) against
the shape; then the shape alone (the spatial grid of a square input is square). An output both readings fit
(e.g. 24 channels on a 24 x 24 grid) is refused with :class:`LayoutError`, which names the layer and how to declare
it; the recorder then runs a second blank pass at another input size and takes as channels the axis whose length
did not change (:func:`layout_from_resize`), declaring the result on the model. (This is the logical order of the
axes; torch's ``channels_last`` memory format, :func:`neuroscribe.models.channels_last`, leaves it unchanged.)
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn


class UnknownLayerError(KeyError):
    """A layer name is not a module of the model; the message lists the nearest valid names."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it readable
        return str(self.args[0])


class _StopForward(Exception):
    pass


def nearest_layers(name: str, valid: list[str], n: int = 5) -> list[str]:
    """The ``n`` layer names of ``valid`` nearest to ``name``; never empty while ``valid`` is not: when no name is
    close (another architecture's naming, e.g. ``features.3`` on a ResNet), the most similar names of the same depth
    (number of dots), else of any depth."""
    near = difflib.get_close_matches(name, valid, n=n, cutoff=0.5)
    same_depth = [v for v in valid if v.count(".") == name.count(".")]
    return near or difflib.get_close_matches(name, same_depth or valid, n=n, cutoff=0.0)


def resolve_layers(model: nn.Module, names: Iterable[str], spec: str | None = None) -> dict[str, nn.Module]:
    """Map each name to its module, or raise :class:`UnknownLayerError` naming the nearest valid ones of this
    ``model`` (``spec``, when given, is named in the message)."""
    modules = dict(model.named_modules())
    out = {}
    for name in names:
        if name == "" or name not in modules:
            near = nearest_layers(name, [n for n in modules if n])
            raise UnknownLayerError(f"unknown layer {name!r} in {spec or type(model).__name__}; nearest valid names: "
                                    f"{near}. Run `neuroscribe layers {spec or 'SPEC'}` to list every layer.")
        out[name] = modules[name]
    return out


def _first_tensor(output):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    raise TypeError(f"layer output of type {type(output).__name__} holds no tensor to record")


def _replace_first(output, new: torch.Tensor):
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, tuple):
        return (new,) + tuple(output[1:])
    if isinstance(output, list):
        return [new] + list(output[1:])
    raise TypeError(f"cannot edit a layer output of type {type(output).__name__}")


class Trace:
    """Outputs retained during a :func:`trace` block, keyed by layer name."""

    def __init__(self) -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        self.inputs: dict[str, torch.Tensor] = {}  # first positional input of ``retain_inputs`` layers
        self.calls: dict[str, int] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.outputs[name]

    def __contains__(self, name: str) -> bool:
        return name in self.outputs


@contextlib.contextmanager
def trace(model: nn.Module, retain: Iterable[str] = (), edit: dict[str, Callable] | None = None,
          stop: bool = False, detach: bool = True, calls: dict[str, int] | None = None,
          retain_inputs: Iterable[str] = (), visit: dict[str, Callable] | None = None) -> Iterator[Trace]:
    """Hook ``retain``, ``edit`` and ``visit`` layers of ``model`` for the duration of the block.

    ``edit[name](tensor) -> tensor`` replaces the layer's (first) output tensor (every call of a module that is
    called more than once). A retained module called several times keeps its last output. ``visit[name](tensor)``
    is called with that last output itself (detached, not copied) while the pass waits: it must read it at once
    and keep no reference (the model may overwrite it in place later) -- the recorder folds batches in this way,
    without a copy of every layer. With ``stop=True`` the pass ends once every retained and visited layer has been
    called ``calls[name]`` times (default 1; the recorder counts calls on a first blank pass); call the model
    through :func:`run` so the early exit is caught.
    """
    calls = dict(calls or {})
    retain = list(retain)
    retain_inputs = list(retain_inputs)
    edit = dict(edit or {})
    visit = dict(visit or {})
    modules = resolve_layers(model, list(dict.fromkeys(retain + list(edit) + retain_inputs + list(visit))))
    tr = Trace()
    remaining = set(retain) | set(visit)
    handles = []
    try:
        for name, mod in modules.items():
            handles.append(mod.register_forward_hook(functools.partial(
                _layer_hook, name, tr, remaining, retain, edit, retain_inputs, calls, stop, detach, visit)))
        yield tr
    finally:
        for h in handles:
            h.remove()


def _layer_hook(name: str, tr: Trace, remaining: set[str], retain: list[str], edit: dict[str, Callable],
                retain_inputs: list[str], calls: dict[str, int], stop: bool, detach: bool, visit: dict[str, Callable],
                _module, _inputs, output):
    """The forward hook of layer ``name`` in a :func:`trace` block (a module-level function, so that mutation
    testing reaches it: mutmut leaves decorated functions such as :func:`trace` alone)."""
    result = None
    if name in retain_inputs and _inputs:
        tr.inputs[name] = _inputs[0].detach().clone()
    if name in edit:
        result = _replace_first(output, edit[name](_first_tensor(output)))
        output = result
    if name in retain or name in visit:
        t = _first_tensor(output)
        tr.calls[name] = tr.calls.get(name, 0) + 1
        last = tr.calls[name] >= calls.get(name, 1)
        if name in retain:
            # a copy: later in-place ops of the model (ReLU(inplace=True), ``out += identity``) would
            # otherwise rewrite the retained tensor
            tr.outputs[name] = t.detach().clone() if detach else t.clone()
        if name in visit and last and name in remaining:
            visit[name](t.detach())
        if last:
            remaining.discard(name)
        if stop and not remaining and not edit:
            raise _StopForward
    return result


def run(model: nn.Module, x: torch.Tensor):
    """Call ``model(x)``, treating an early stop raised by a ``trace(stop=True)`` hook as normal."""
    try:
        return model(x)
    except _StopForward:
        return None


# --------------------------------------------------------------------------------------------- unit views
def prefix_tokens(model: nn.Module | None, n_tokens: int) -> int:
    """How many leading non-patch tokens (CLS, registers) a (B, T, D) output has.

    The model's own ``num_prefix_tokens`` (timm) wins; otherwise the smallest prefix (0..8) that leaves a
    square grid of patch tokens.
    """
    v = getattr(model, "num_prefix_tokens", None) if model is not None else None
    if isinstance(v, int):
        return v
    g = math.isqrt(n_tokens)
    if g * g == n_tokens:
        return 0
    for p in range(1, 9):
        g = math.isqrt(n_tokens - p)
        if g * g == n_tokens - p:
            return p
    raise ValueError(f"cannot lay {n_tokens} tokens on a square grid after dropping up to 8 prefix tokens")


def unit_view(t: torch.Tensor, n_prefix: int | None = None, layout: str | None = None) -> torch.Tensor:
    """Bring a layer output to ``(B, units, H, W)``: a channels-first map as is, a channels-last one (``layout``
    'nhwc') permuted, tokens reshaped to the patch grid, flat 1x1. A map without ``layout`` is read by its shape
    alone (:func:`detect_layout`)."""
    if t.dim() == 4:
        layout = layout or detect_layout(tuple(t.shape), "<unnamed>")
        return t.permute(0, 3, 1, 2) if _valid_layout("<unnamed>", layout) == "nhwc" else t
    if t.dim() == 2:
        return t[:, :, None, None]
    if t.dim() == 3:
        b, n, d = t.shape
        p = n_prefix if n_prefix is not None else prefix_tokens(None, n)
        g = math.isqrt(n - p)
        if g * g != n - p:
            raise ValueError(f"{n} tokens minus {p} prefix tokens is not a square grid")
        return t[:, p:, :].reshape(b, g, g, d).permute(0, 3, 1, 2)
    raise ValueError(f"cannot interpret a layer output of shape {tuple(t.shape)} as units")


def spatial_max(a: torch.Tensor) -> torch.Tensor:
    """``[B, C]``: each unit's max over the map of ``a [B, C, H, W]`` (NaN wins, as with ``amax``). On a channels-last
    tensor by max pooling over the whole map, the same values: ``amax`` over the two outer-strided axes is ~7x slower
    there (a 32 x 16 x 112 x 112 batch: 7.4 ms vs 1.0 ms on this project's 2-core CPU)."""
    if (a.dim() == 4 and a.is_floating_point() and not a.is_contiguous()
            and a.is_contiguous(memory_format=torch.channels_last)):
        return torch.nn.functional.max_pool2d(a, tuple(a.shape[2:])).flatten(1)
    return a.flatten(2).amax(2)


def layer_kind(t: torch.Tensor) -> str:
    return {4: "conv", 3: "tokens", 2: "flat"}.get(t.dim(), "other")


# --------------------------------------------------------------------------------------------- layouts
LAYOUTS = ("nchw", "nhwc")
#: Attribute holding a model's layout declarations ``{layer: 'nchw' | 'nhwc'}`` (see :func:`declare_layouts`).
LAYOUT_ATTR = "neuroscribe_layouts"
_CHANNELS_FIRST = (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.GroupNorm, nn.MaxPool2d, nn.AvgPool2d,
                   nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


class LayoutError(ValueError):
    """A 4-D layer output whose channel axis cannot be told; the message names the layer and how to declare it."""


def _valid_layout(name: str, layout: str) -> str:
    if layout not in LAYOUTS:
        raise LayoutError(f"layer {name!r}: layout must be one of {list(LAYOUTS)}; got {layout!r}")
    return layout


def declare_layouts(model: nn.Module, layouts: Mapping[str, str]) -> nn.Module:
    """Declare how layers of ``model`` lay out their 4-D outputs (``{layer: 'nchw' | 'nhwc'}``), for every later
    recording and ablation; declarations add to (and override) earlier ones. Returns ``model``."""
    checked = {name: _valid_layout(name, v) for name, v in layouts.items()}
    setattr(model, LAYOUT_ATTR, {**(getattr(model, LAYOUT_ATTR, None) or {}), **checked})
    return model


def module_width(mod: nn.Module) -> int | None:
    """The output width a module's parameters fix (conv/linear outputs, norm features), else None."""
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return int(mod.out_channels)
    if isinstance(mod, nn.Linear):
        return int(mod.out_features)
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        return int(mod.num_features)
    if isinstance(mod, nn.GroupNorm):
        return int(mod.num_channels)
    if isinstance(mod, nn.LayerNorm) and len(mod.normalized_shape) == 1:
        return int(mod.normalized_shape[0])
    return None


def module_layout(mod: nn.Module) -> str | None:
    """The layout a module's type fixes for its 4-D output, else None (e.g. a block, an activation)."""
    if isinstance(mod, _CHANNELS_FIRST):
        return "nchw"
    if isinstance(mod, nn.Linear) or type(mod) is nn.LayerNorm:  # both act on the last axis
        return "nhwc"
    return None


def channel_count(model: nn.Module | None, name: str, mod: nn.Module) -> int | None:
    """Layer ``name``'s channel count: the module's width, else the model's timm ``feature_info``, else None."""
    width = module_width(mod)
    if width is not None:
        return width
    info = getattr(model, "feature_info", None)
    for f in info if isinstance(info, list) else []:
        if isinstance(f, dict) and f.get("module") == name and isinstance(f.get("num_chs"), int):
            return int(f["num_chs"])
    return None


def detect_layout(shape: tuple[int, ...], name: str, channels: int | None = None) -> str:
    """'nchw' or 'nhwc' for a 4-D output ``shape`` (batch first) with ``channels`` channels (None: unknown, then
    the reading whose spatial grid is square); raises :class:`LayoutError` unless exactly one reading fits."""
    _, a, b, c = shape
    if channels is not None:
        fits = [lay for lay, n in zip(LAYOUTS, (a, c)) if n == channels]
        why = f"its channel count {channels} matches {'both' if fits else 'neither'} axis 1 " \
              f"{'and' if fits else 'nor'} axis 3"
    else:
        fits = [lay for lay, ok in zip(LAYOUTS, (b == c, a == b)) if ok]
        why = f"no channel count is known for it and {'both readings' if fits else 'neither reading'} of the shape " \
              "give a square spatial grid"
    if len(fits) == 1:
        return fits[0]
    raise LayoutError(f"layer {name!r}: cannot tell whether its output {list(shape[1:])} is channels-first "
                      f"(C, H, W) or channels-last (H, W, C): {why}. {_how_to_declare(name)}")


def _how_to_declare(name: str) -> str:
    return (f"Declare it in the job config, e.g. `layouts: {{{name}: nhwc}}` (or nchw), or in code with "
            f"neuroscribe.hooks.declare_layouts(model, {{{name!r}: 'nhwc'}})")


def layout_from_resize(name: str, shape: tuple[int, ...], other: tuple[int, ...]) -> str:
    """'nchw' or 'nhwc' for a layer whose 4-D output had ``shape`` at one input size and ``other`` at another: the
    channel axis is the one that kept its length while the two spatial axes changed. Raises :class:`LayoutError`
    (naming the layer) unless exactly one reading fits."""
    (_, a, b, c), (_, a2, b2, c2) = shape, other
    fits = [lay for lay, kept, moved in (("nchw", a == a2, b != b2 and c != c2), ("nhwc", c == c2, a != a2 and b != b2))
            if kept and moved]
    if len(fits) == 1:
        return fits[0]
    raise LayoutError(f"layer {name!r}: cannot tell whether its output is channels-first (C, H, W) or channels-last "
                      f"(H, W, C): it is {list(shape[1:])} at one input size and {list(other[1:])} at another. "
                      f"{_how_to_declare(name)}")


def layer_layout(model: nn.Module, name: str, shape: tuple[int, ...], declared: Mapping[str, str] | None = None,
                 module: nn.Module | None = None) -> str | None:
    """How layer ``name`` of ``model`` lays out its output of ``shape``: 'nchw' or 'nhwc' for 4-D, None otherwise.

    ``declared`` (e.g. the job's ``layouts``), then the model's own declarations (:func:`declare_layouts`), then
    the module's type, then its channel count against the shape, then the shape alone (see the module docstring);
    raises :class:`LayoutError` naming the layer where both readings fit. Recording and ablation both call this.
    """
    if len(shape) != 4:
        return None
    decl = {**(getattr(model, LAYOUT_ATTR, None) or {}), **(declared or {})}
    if name in decl:
        return _valid_layout(name, decl[name])
    mod = module if module is not None else resolve_layers(model, [name])[name]
    return module_layout(mod) or detect_layout(tuple(shape), name, channel_count(model, name, mod))


@dataclass
class LayerInfo:
    name: str
    type: str
    kind: str
    shape: tuple[int, ...]
    units: int
    calls: int
    layout: str | None = None  # 'nchw' | 'nhwc' for a map ('?' where it must be declared), else None


def layer_catalogue(model: nn.Module, input_size: int, device: str | torch.device = "cpu") -> list[LayerInfo]:
    """Every named module with its output shape, layout and unit count, from one forward pass of a blank image."""
    seen: dict[str, list] = {}
    handles = []
    for name, mod in model.named_modules():
        if not name:
            continue

        def hook(_m, _i, out, name=name):
            try:
                t = _first_tensor(out)
            except TypeError:
                return
            seen.setdefault(name, [type(_m).__name__, t.shape, 0])
            seen[name][1] = t.shape
            seen[name][2] += 1
        handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size, device=device))
    finally:
        for h in handles:
            h.remove()
    out = []
    modules = dict(model.named_modules())
    for name, (typ, shape, calls) in seen.items():
        kind = {4: "conv", 3: "tokens", 2: "flat"}.get(len(shape), "other")
        try:
            layout = layer_layout(model, name, tuple(shape), module=modules[name])
        except LayoutError:
            layout = "?"  # to be declared before recording it
        units = int(shape[1] if layout in ("nchw", "?") else shape[-1]) if kind != "other" else 0
        out.append(LayerInfo(name, typ, kind, tuple(int(s) for s in shape[1:]), units, calls, layout))
    return out
