"""Ablating units: zero or mean, through :func:`neuroscribe.hooks.trace`, or baked into a copy of the model.

A *unit* is what :func:`neuroscribe.hooks.unit_view` calls a unit: channel ``c`` of a map, channels-first
``(B, C, H, W)`` or channels-last ``(B, H, W, C)`` (as :func:`neuroscribe.hooks.layer_layout` decides for the layer,
the same way recording does; an ambiguous one raises :class:`~neuroscribe.hooks.LayoutError` on its first call),
dimension ``d`` of transformer tokens ``(B, T, D)`` (ablated in **every** token, the CLS/register prefix included)
or feature ``d`` of a flat output ``(B, D)``. Ablating sets the unit's output to a constant:

* ``method='zero'``: 0 everywhere;
* ``method='mean'``: the unit's mean activation ``means[layer][unit]`` everywhere (e.g. the per-unit mean a recording
  stores, ``Recording.tensors(layer)['mean']``, which averages the unit's map over images and positions).

:func:`ablation_edits` builds the ``edit`` callables for ``trace(model, edit=...)``; :func:`ablated` wraps that in a
context manager. :func:`permanent_edit` returns a copy of the model with the ablation written into the weights of the
module that *produces* the unit (conv/linear: output row zeroed, bias = 0 or the mean; batch/group/layer norm:
weight = 0, bias = 0 or the mean), so it survives saving with :func:`save_edited`; a layer without such parameters
(ReLU, a residual block, pooling) falls back to a permanent forward hook, with a warning.

Unit indices are checked against the layer's width: eagerly where the module's parameters give it (conv, linear,
norm layers), otherwise on the layer's first call (every call is checked; it is a cheap comparison). An index out
of range raises :class:`UnitIndexError` naming the layer and its valid range.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import numbers
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..hooks import Trace, _valid_layout, detect_layout, layer_layout, module_width, resolve_layers, trace

__all__ = [
    "ABLATION_ATTR",
    "Method",
    "UnitAblation",
    "UnitIndexError",
    "ablated",
    "ablation_edits",
    "as_unit_dict",
    "permanent_edit",
    "save_edited",
    "unit_axis",
]

Method = Literal["zero", "mean"]
#: ``layer -> unit indices``, or an iterable of ``(layer, unit)`` pairs (``((layer, unit), score)`` rows too).
Units = Mapping[str, Iterable[int]] | Iterable[Any]
#: Attribute that :func:`permanent_edit` sets on the copy: ``layer -> {'units', 'method', 'how'}``.
ABLATION_ATTR = "neuroscribe_ablation"


class UnitIndexError(IndexError):
    """A unit index is negative or beyond the layer's width; the message names the valid range."""


def as_unit_dict(units: Units) -> dict[str, list[int]]:
    """Normalise ``units`` to ``{layer: sorted unique unit indices}`` (layers in first-seen order).

    Accepts a mapping ``layer -> indices``, ``(layer, unit)`` pairs, or ``((layer, unit), score)`` rows as
    :func:`neuroscribe.ablate.select.order_units` returns them.
    """
    out: dict[str, set[int]] = {}
    if isinstance(units, Mapping):
        items = [(layer, u) for layer, us in units.items() for u in _as_list(layer, us)]
        for layer in units:
            out.setdefault(str(layer), set())
    else:
        items = []
        for row in units:
            if hasattr(row, "layer") and hasattr(row, "unit"):  # e.g. a flag.Flag
                row = (row.layer, row.unit)
            if (isinstance(row, (tuple, list)) and len(row) == 2 and isinstance(row[0], (tuple, list))):
                row = row[0]  # ((layer, unit), score)
            if not (isinstance(row, (tuple, list)) and len(row) == 2 and isinstance(row[0], str)):
                raise TypeError(f"expected (layer, unit) pairs; got {row!r}")
            items.append((row[0], row[1]))
    for layer, u in items:
        if isinstance(u, bool) or not (isinstance(u, numbers.Integral) or (torch.is_tensor(u) and u.numel() == 1
                                                                          and not u.is_floating_point())):
            raise TypeError(f"layer {layer!r}: unit indices must be ints; got {u!r}")
        u = int(u)
        if u < 0:
            raise UnitIndexError(f"layer {layer!r}: unit {u} is negative; units are numbered from 0")
        out.setdefault(str(layer), set()).add(u)
    return {layer: sorted(us) for layer, us in out.items()}


def _as_list(layer: str, us: Any) -> list:
    if isinstance(us, numbers.Integral) and not isinstance(us, bool):
        return [us]
    if torch.is_tensor(us):  # its Python numbers, checked like any others (a float or bool tensor is refused)
        return us.reshape(-1).tolist()
    try:
        return list(us)
    except TypeError:
        raise TypeError(f"layer {layer!r}: expected a list of unit indices; got {us!r}") from None


def unit_axis(t: torch.Tensor, layout: str | None = None) -> int:
    """The axis that indexes units: 1 for a channels-first map ``(B, C, H, W)`` and flat ``(B, D)``, the last for a
    channels-last map ``(B, H, W, C)`` (``layout`` 'nhwc'; a map without ``layout`` is read by its shape alone) and
    for tokens ``(B, T, D)``."""
    if t.dim() == 4:
        return 3 if _valid_layout("<unnamed>", layout or detect_layout(tuple(t.shape), "<unnamed>")) == "nhwc" else 1
    if t.dim() == 2:
        return 1
    if t.dim() == 3:
        return 2
    raise ValueError(f"cannot ablate units of a layer output of shape {tuple(t.shape)} (expected conv (B,C,H,W), "
                     "tokens (B,T,D) or flat (B,D))")


def _check_range(layer: str, units: Sequence[int], n: int, where: str) -> None:
    bad = [u for u in units if not 0 <= u < n]
    if bad:
        raise UnitIndexError(f"unit {bad[0]} is out of range for layer {layer!r}, which has units 0..{n - 1} "
                             f"({where}){'; also out of range: ' + str(bad[1:10]) if len(bad) > 1 else ''}")


def _mean_vector(layer: str, means: Mapping[str, Any] | None) -> torch.Tensor:
    if means is None:
        raise ValueError(f"method='mean' needs means: a per-unit mean vector for layer {layer!r} "
                         "(e.g. Recording.tensors(layer)['mean'])")
    if layer not in means:
        raise ValueError(f"method='mean': no means given for layer {layer!r}; means has layers {sorted(means)}")
    v = torch.as_tensor(means[layer]).detach().float()
    if v.dim() != 1:
        raise ValueError(f"means[{layer!r}] must be a vector [units]; got shape {tuple(v.shape)}")
    if not torch.isfinite(v).all():
        raise ValueError(f"means[{layer!r}] holds non-finite values")
    return v.cpu()


def _check_means_length(layer: str, mean: torch.Tensor | None, n: int) -> None:
    if mean is not None and mean.numel() != n:
        raise ValueError(f"means[{layer!r}] has {mean.numel()} values but layer {layer!r} has {n} units")


class UnitAblation:
    """``edit`` callable for one layer: sets ``units`` to 0 or to their means in every call's output.

    ``layout`` says where a 4-D output keeps its units: 'nchw' or 'nhwc', or a callable ``shape -> layout`` asked on
    the first 4-D call (:func:`ablation_edits` passes :func:`~neuroscribe.hooks.layer_layout` for the layer); None
    reads the shape alone. ``calls`` counts how often it ran (a layer that is never called, e.g. a module whose
    weights its parent uses directly, would otherwise go unnoticed).
    """

    def __init__(self, layer: str, units: Sequence[int], method: Method, mean: torch.Tensor | None = None,
                 layout: str | Callable[[tuple[int, ...]], str | None] | None = None):
        if method not in ("zero", "mean"):
            raise ValueError(f"method must be 'zero' or 'mean'; got {method!r}")
        if method == "mean" and mean is None:
            raise ValueError(f"method='mean' for layer {layer!r} needs its mean vector")
        self.layer, self.units, self.method = layer, list(units), method
        self.mean = mean
        self.layout = _valid_layout(layer, layout) if isinstance(layout, str) else layout
        self.calls = 0
        self._n: int | None = None  # the width seen on the last call
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _index_and_values(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (t.device, t.dtype)
        if key not in self._cache:
            idx = torch.tensor(self.units, dtype=torch.long, device=t.device)
            if self.method == "zero":
                vals = torch.zeros(len(self.units), dtype=t.dtype, device=t.device)
            else:
                assert self.mean is not None  # checked in __init__
                vals = self.mean[self.units].to(device=t.device, dtype=t.dtype)
            self._cache[key] = (idx, vals)
        return self._cache[key]

    def _axis(self, t: torch.Tensor) -> int:
        if t.dim() == 4 and not isinstance(self.layout, str):  # resolved once, on the first map
            self.layout = self.layout(tuple(t.shape)) if callable(self.layout) else detect_layout(tuple(t.shape),
                                                                                                   self.layer)
        return unit_axis(t, self.layout if isinstance(self.layout, str) else None)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        ax = self._axis(t)
        n = t.shape[ax]
        if n != self._n:
            _check_range(self.layer, self.units, n, f"output shape {tuple(t.shape)}")
            _check_means_length(self.layer, self.mean, n)
            self._n = n
        self.calls += 1
        if not self.units:
            return t
        idx, vals = self._index_and_values(t)
        out = t.clone()
        out.movedim(ax, -1)[..., idx] = vals  # a view of ``out``: writes into it
        return out

    def __repr__(self) -> str:
        return f"UnitAblation({self.layer!r}, units={self.units[:8]}{'...' if len(self.units) > 8 else ''}, " \
               f"method={self.method!r})"


def _prepare(model: nn.Module, units: Units, method: Method, means: Mapping[str, Any] | None
             ) -> tuple[dict[str, list[int]], dict[str, nn.Module], dict[str, torch.Tensor | None]]:
    if method not in ("zero", "mean"):
        raise ValueError(f"method must be 'zero' or 'mean'; got {method!r}")
    spec = {layer: us for layer, us in as_unit_dict(units).items() if us}
    modules = resolve_layers(model, list(spec))  # UnknownLayerError naming the nearest valid layers
    mean_vecs: dict[str, torch.Tensor | None] = {}
    for layer, us in spec.items():
        mean_vecs[layer] = _mean_vector(layer, means) if method == "mean" else None
        width = module_width(modules[layer])
        if width is not None:
            _check_range(layer, us, width, f"{type(modules[layer]).__name__} with {width} outputs")
            _check_means_length(layer, mean_vecs[layer], width)
    return spec, modules, mean_vecs


def _layout_of(model: nn.Module, layer: str, mod: nn.Module) -> Callable[[tuple[int, ...]], str | None]:
    """The layer's layout, decided from its first output's shape exactly as recording decides it."""
    return functools.partial(layer_layout, model, layer, module=mod)


def ablation_edits(model: nn.Module, units: Units, method: Method = "zero",
                   means: Mapping[str, Any] | None = None) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """``{layer: edit}`` for ``trace(model, edit=...)`` that ablates ``units`` (see the module docstring).

    Raises :class:`~neuroscribe.hooks.UnknownLayerError` for a layer the model lacks, :class:`UnitIndexError` for a
    negative index or one beyond the layer's width (eagerly where the module's parameters fix the width, else on the
    first call), ``ValueError`` for ``method='mean'`` without a mean vector of the right length for every layer, and
    on a layer's first call :class:`~neuroscribe.hooks.LayoutError` for a 4-D output that could be channels-first or
    channels-last (declare it with :func:`~neuroscribe.hooks.declare_layouts` or a recording's ``layouts``).
    Layers with an empty unit list are left out; no units at all gives ``{}`` (no edit).
    """
    spec, modules, mean_vecs = _prepare(model, units, method, means)
    return {layer: UnitAblation(layer, us, method, mean_vecs[layer], _layout_of(model, layer, modules[layer]))
            for layer, us in spec.items()}


@contextlib.contextmanager
def ablated(model: nn.Module, units: Units, method: Method = "zero", means: Mapping[str, Any] | None = None,
            retain: Iterable[str] = ()) -> Iterator[Trace]:
    """Run ``model`` with ``units`` ablated inside the block (hooks removed on exit); ``retain`` layers are kept in
    the yielded :class:`~neuroscribe.hooks.Trace` (after the edit)."""
    with trace(model, retain=retain, edit=ablation_edits(model, units, method, means)) as tr:
        yield tr


def _edit_weights(mod: nn.Module, units: list[int], method: Method, mean: torch.Tensor | None) -> str | None:
    """Write the ablation into ``mod``'s parameters; return None on success, else why it could not."""
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
        row, bias = mod.weight, mod.bias  # weight[out, ...]: the row that produces each output unit
        if method == "mean" and bias is None:
            return f"{type(mod).__name__} has no bias to hold the mean"
    elif isinstance(mod, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)) or (
            isinstance(mod, nn.LayerNorm) and len(mod.normalized_shape) == 1):
        row, bias = mod.weight, mod.bias  # y = normalised * weight[u] + bias[u]
        if row is None:
            return f"{type(mod).__name__} has no affine weight"
        if bias is None and method == "mean":
            return f"{type(mod).__name__} has no bias to hold the mean"
    else:
        return f"{type(mod).__name__} has no weights that produce its output units"
    idx = torch.tensor(units, dtype=torch.long, device=row.device)
    with torch.no_grad():
        row.index_fill_(0, idx, 0.0)
        if bias is not None:
            vals = torch.zeros(len(units)) if method == "zero" or mean is None else mean[units]
            bias[idx] = vals.to(device=bias.device, dtype=bias.dtype)
    return None


def permanent_edit(model: nn.Module, units: Units, method: Method = "zero",
                   means: Mapping[str, Any] | None = None) -> nn.Module:
    """A deep copy of ``model`` with ``units`` ablated for good; ``model`` itself is untouched.

    For each layer the ablation is written into the weights of the module that produces the units when it is a
    conv or linear layer (the unit's output weight row zeroed, bias set to 0 or to the mean) or an affine batch/
    group/layer norm (weight 0, bias 0 or the mean): the output is then exactly the constant the hook ablation
    writes. Any other layer (no such parameters, or a bias-less conv with ``method='mean'``) gets a permanent
    forward hook instead, with a :class:`UserWarning` saying so; such a copy cannot be saved as weights.
    The copy carries ``copy.neuroscribe_ablation = {layer: {'units', 'method', 'how': 'weights' | 'hook'}}``.
    """
    spec, _, mean_vecs = _prepare(model, units, method, means)
    edited = copy.deepcopy(model)
    modules = resolve_layers(edited, list(spec))
    record: dict[str, dict] = {}
    for layer, us in spec.items():
        why = _edit_weights(modules[layer], us, method, mean_vecs[layer])
        how = "weights"
        if why is not None:
            fn = UnitAblation(layer, us, method, mean_vecs[layer], _layout_of(edited, layer, modules[layer]))
            modules[layer].register_forward_hook(lambda _m, _i, out, fn=fn: _hook_output(out, fn))
            how = "hook"
            warnings.warn(f"permanent_edit: layer {layer!r}: {why}; ablating it with a permanent forward hook "
                          "instead (kept in this module object, but not in saved weights)", UserWarning,
                          stacklevel=2)
        record[layer] = {"units": us, "method": method, "how": how}
    setattr(edited, ABLATION_ATTR, record)
    return edited


def _hook_output(output: Any, fn: UnitAblation) -> Any:
    from ..hooks import _first_tensor, _replace_first
    return _replace_first(output, fn(_first_tensor(output)))


def save_edited(model: nn.Module, path: str | Path, spec_meta: Mapping[str, Any]) -> Path:
    """Write ``model``'s weights to ``path`` (safetensors) and ``PATH.spec.json``, the sidecar that the
    ``checkpoint:PATH`` model spec reads.

    ``spec_meta`` must hold ``arch`` (the spec that builds the architecture, e.g. ``torchvision:resnet18``) and may
    hold ``num_classes``, ``class_names`` and ``preprocess`` (a :class:`~neuroscribe.models.Preprocess` or its
    dict); other keys are kept as provenance. The ablation record of a :func:`permanent_edit` copy is added as
    ``ablation``. Refuses a model whose ablation lives in hooks (they are not weights). Both files are written
    atomically. Returns ``path``.
    """
    from .. import io
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_edited writes safetensors: the path must end in .safetensors; got {path}")
    meta = dict(spec_meta)
    if not meta.get("arch") or not isinstance(meta["arch"], str):
        raise ValueError("spec_meta needs 'arch': the model spec that builds the architecture "
                         "(e.g. 'torchvision:resnet18' or 'efficientnet-lite0')")
    record = getattr(model, ABLATION_ATTR, None) or {}
    hooked = sorted(layer for layer, r in record.items() if r.get("how") == "hook")
    if hooked:
        raise ValueError(f"cannot save layers {hooked} as weights: their ablation is a forward hook (they have no "
                         "parameters that produce their units); ablate the conv/norm layer that produces those "
                         "units instead, or apply the ablation at run time with ablated()")
    pre = meta.get("preprocess")
    if pre is not None and hasattr(pre, "to_dict"):
        meta["preprocess"] = pre.to_dict()
    if meta.get("class_names") is not None:
        meta["class_names"] = [str(c) for c in meta["class_names"]]
        meta.setdefault("num_classes", len(meta["class_names"]))
    if record:
        meta.setdefault("ablation", record)
    from safetensors.torch import save_file
    # clone: tied/shared tensors each get their own storage (safetensors refuses shared memory)
    state = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    with io.atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "neuroscribe": "ablated" if record else "model"})
    io.write_json(Path(str(path) + ".spec.json"), meta)
    return path
