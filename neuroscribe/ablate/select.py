"""Choosing which flagged units to ablate, on validation data only (MILAN, Hernandez et al. ICLR 2022, section 7).

The procedure:

1. :func:`order_units`: ablate each flagged unit *alone* and measure validation accuracy; order the units by that
   accuracy, **highest first** (the unit whose removal leaves validation accuracy highest, i.e. hurts least or helps
   most, comes first). One ordering across all layers; ties keep the input order.
2. :func:`accuracy_curve`: ablate the first ``n`` units of that ordering together, for ``n = 0..N``.
3. :func:`choose_n`: the ``n`` of the highest validation accuracy (ties go to the smaller ``n``); with a clean
   tolerance, among the ``n`` whose accuracy on validation's clean images is at most that far below the unablated
   model's (an ablation that buys shifted accuracy with clean accuracy is then not chosen).

Controls of the same size: :func:`random_units` (uniform random units, several seeded draws) and :func:`sort_all`
(the same ordering applied to *all* units of the recorded layers, then the top ``n``).

The test set is not an argument of any function here: each takes a ``val_loader`` (or, for :func:`choose_n`, only
the validation curve), so nothing chosen here can have seen test data. Evaluate the chosen ablation on test sets
afterwards with :mod:`neuroscribe.ablate.evaluate`.

Cost: each scored unit and each curve point is one pass over the validation set from its first ablated layer on:
the model up to that layer runs once a batch for all units of the layer (:mod:`.cut`; full passes where torch.fx
cannot cut the model). Validation batches are kept in memory between passes when they fit in ``cache_mb`` (else the
loader is re-read each time).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..hooks import trace
from ..models import channels_last, to_layout
from .cut import LayerGraph, cut_correct
from .edit import Method, ablation_edits, as_unit_dict
from .evaluate import _model_device, unpack_batch

__all__ = [
    "MIN_RANDOM_DRAWS",
    "Unit",
    "ValBatches",
    "accuracy_curve",
    "all_unit_list",
    "choose_n",
    "order_units",
    "random_units",
    "sort_all",
    "val_accuracy",
    "val_correct",
]

Unit = tuple[str, int]
#: The random-unit control needs several draws to show its spread.
MIN_RANDOM_DRAWS = 5


class ValBatches:
    """Re-iterable validation batches ``(x, y)``: cached in memory while they fit in ``cache_mb``, else re-read.

    ``class_index`` (see :func:`neuroscribe.ablate.evaluate.label_map`) is applied when scoring, not here.
    """

    def __init__(self, loader: Iterable, cache_mb: float = 1024.0):
        self._cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.loader: Iterable = loader
        self.cache_mb = float(cache_mb)
        if isinstance(loader, ValBatches):  # share the other's cache
            self.loader, self.cache_mb, self._cache = loader.loader, loader.cache_mb, loader._cache

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._cache is not None:
            yield from self._cache
            return
        kept: list[tuple[torch.Tensor, torch.Tensor]] | None = []
        size = 0.0
        for batch in self.loader:
            x, y, _ = unpack_batch(batch)
            if x is None or x.shape[0] == 0:
                continue
            if y is None or bool((y < 0).any()):
                raise ValueError("validation batches need a label for every image (got none or -1)")
            if kept is not None:
                size += x.numel() * x.element_size() / 2**20
                if size <= self.cache_mb:
                    kept.append((x, y))
                else:
                    kept = None  # too big to keep: re-read the loader next time
            yield x, y
        if kept is not None:
            if not kept:
                raise ValueError("the validation loader yielded no images")
            self._cache = kept


def val_correct(model: nn.Module, val: Iterable, edits: Mapping[str, Any] | None = None,
                device: str | torch.device | None = None, class_index: Sequence[int] | None = None) -> torch.Tensor:
    """Per validation image (in loader order), whether the top-1 prediction with ``edits`` applied is right."""
    dev = _device(model, device)
    cols = torch.as_tensor(list(class_index), dtype=torch.long, device=dev) if class_index is not None else None
    right = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), channels_last(model) as layout, trace(model, edit=dict(edits or {})):
            for x, y in val if isinstance(val, ValBatches) else ValBatches(val, cache_mb=0):
                out = model(to_layout(x.to(dev, non_blocking=True), layout))
                if cols is not None:
                    out = out.index_select(1, cols)
                right.append(out.argmax(1).cpu() == y.reshape(-1).cpu())
    finally:
        model.train(was_training)
    if not right or sum(len(r) for r in right) == 0:
        raise ValueError("the validation loader yielded no images")
    return torch.cat(right)


def val_accuracy(model: nn.Module, val: Iterable, edits: Mapping[str, Any] | None = None,
                 device: str | torch.device | None = None, class_index: Sequence[int] | None = None) -> float:
    """Top-1 accuracy on validation batches with ``edits`` applied (through :func:`neuroscribe.hooks.trace`)."""
    right = val_correct(model, val, edits, device, class_index)
    return int(right.sum()) / len(right)


def _unit_list(units: Iterable[Any], what: str) -> list[Unit]:
    """``(layer, unit)`` pairs from pairs, ``((layer, unit), score)`` rows or objects with ``.layer``/``.unit``
    (e.g. :class:`~neuroscribe.ablate.flag.Flag`); a unit listed twice (flagged for two cues) is kept once."""
    out: list[Unit] = []
    for row in units:
        if hasattr(row, "layer") and hasattr(row, "unit"):
            row = (row.layer, row.unit)
        if isinstance(row, (tuple, list)) and len(row) == 2 and isinstance(row[0], (tuple, list)):
            row = row[0]  # ((layer, unit), score) rows from order_units
        if not (isinstance(row, (tuple, list)) and len(row) == 2 and isinstance(row[0], str)):
            raise TypeError(f"{what}: expected (layer, unit) pairs; got {row!r}")
        out.append((row[0], int(row[1])))
    return list(dict.fromkeys(out))


def _bar(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="unit", disable=not progress, leave=False)


def order_units(model: nn.Module, flagged: Iterable[Any], val_loader: Iterable, method: Method = "zero",
                means: Mapping[str, Any] | None = None, *, device: str | torch.device | None = None,
                class_index: Sequence[int] | None = None, cache_mb: float = 1024.0,
                progress: bool = True, scores: dict[Unit, float] | None = None,
                cut: bool = True) -> list[tuple[Unit, float]]:
    """``[((layer, unit), val_acc_alone), ...]``: each flagged unit's validation accuracy when it alone is ablated,
    highest first (best for validation first), one ordering across layers; ties keep the order of ``flagged``.

    ``scores``: a dict shared between calls on the SAME model, validation data, method and means (e.g. the orderings
    of several flag sets and the sort-all control): units already scored there are not scored again, new scores are
    added. A unit's score does not depend on the set it is ordered in, so results are the same, with fewer passes.

    ``cut``: score a layer's units from one pass up to the layer a batch (:mod:`.cut`; the same accuracies as full
    passes, which models torch.fx cannot trace get instead); False: one full pass a unit.

    Raises ``ValueError`` for an empty flag set, and the errors of :func:`~neuroscribe.ablate.edit.ablation_edits`
    (unknown layer, unit out of range, missing means) before any pass.
    """
    units = _unit_list(flagged, "order_units")
    if not units:
        raise ValueError("order_units: no flagged units to order (the flag set is empty: check flag.cues, "
                         "flag.use and the descriptions)")
    ablation_edits(model, as_unit_dict(units), method, means)  # validate everything before the first pass
    val = ValBatches(val_loader, cache_mb)
    scores = {} if scores is None else scores
    todo: dict[str, list[int]] = {}
    for layer, u in units:
        if (layer, u) not in scores:
            todo.setdefault(layer, []).append(u)
    dev = _device(model, device)
    graph = LayerGraph.trace(model, todo) if cut and todo else None
    with _bar(len(units), "order units", progress) as bar:
        bar.update(len(units) - sum(map(len, todo.values())))
        for layer, us in todo.items():  # one prefix pass a batch scores all of a layer's units (cut.py)
            edit_sets = [ablation_edits(model, {layer: [u]}, method, means) for u in us]
            right = cut_correct(model, graph, layer, val, edit_sets, dev, class_index)
            for j, u in enumerate(us):
                r = right[j] if right is not None else val_correct(model, val, edit_sets[j], dev, class_index)
                scores[(layer, u)] = int(r.sum()) / len(r)
                bar.update(1)
    scored = sorted(((i, unit, scores[unit]) for i, unit in enumerate(units)), key=lambda r: (-r[2], r[0]))
    return [(unit, acc) for _, unit, acc in scored]


def _device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    return torch.device(device) if device is not None else (_model_device(model) or torch.device("cpu"))


def accuracy_curve(model: nn.Module, ordered_units: Sequence[Any], val_loader: Iterable, max_n: int | None = None,
                   method: Method = "zero", means: Mapping[str, Any] | None = None, *,
                   device: str | torch.device | None = None, class_index: Sequence[int] | None = None,
                   cache_mb: float = 1024.0, progress: bool = True,
                   clean: Sequence[bool] | None = None, cut: bool = True) -> list[tuple]:
    """``[(n, val_acc), ...]`` for ``n = 0..min(max_n, len(ordered_units))``, ablating the first ``n`` units together
    (``n = 0`` is the unablated model). ``ordered_units`` are ``(layer, unit)`` pairs or :func:`order_units` rows.

    ``clean``: which validation images (in loader order) are clean; each row is then ``(n, val_acc, clean_acc)``,
    ``clean_acc`` the accuracy on those images alone (from the same pass), for :func:`choose_n`'s tolerance.
    ``cut``: as in :func:`order_units` (the points whose first layer is the same share one pass up to it)."""
    units = _unit_list(ordered_units, "accuracy_curve")
    top = len(units) if max_n is None else min(int(max_n), len(units))
    if max_n is not None and max_n < 0:
        raise ValueError(f"max_n must be >= 0; got {max_n}")
    mask = None
    if clean is not None:
        mask = torch.as_tensor([bool(c) for c in clean], dtype=torch.bool)
        if not bool(mask.any()):
            raise ValueError("accuracy_curve: `clean` marks no validation image as clean")
    ablation_edits(model, as_unit_dict(units[:top]), method, means)  # validate before the first pass
    val = ValBatches(val_loader, cache_mb)
    dev = _device(model, device)
    graph = LayerGraph.trace(model, {layer for layer, _ in units[:top]}) if cut and top else None
    by_cut: dict[str | None, list[int]] = {None: [0]}  # each n from a cut at the first of its layers in the graph
    for n in range(1, top + 1):
        by_cut.setdefault(min((l for l, _ in units[:n]), key=graph.order) if graph else None, []).append(n)
    rights: dict[int, torch.Tensor] = {}
    curve = []
    with _bar(top + 1, "accuracy curve", progress) as bar:
        for layer, ns in by_cut.items():
            edit_sets = [ablation_edits(model, as_unit_dict(units[:n]), method, means) if n else {} for n in ns]
            right = cut_correct(model, graph, layer, val, edit_sets, dev, class_index) if layer else None
            for j, n in enumerate(ns):
                rights[n] = right[j] if right is not None else val_correct(model, val, edit_sets[j], dev,
                                                                           class_index)
                bar.update(1)
        for n in range(top + 1):
            right = rights[n]
            row = (n, int(right.sum()) / len(right))
            if mask is not None:
                if len(mask) != len(right):
                    raise ValueError(f"accuracy_curve: `clean` has {len(mask)} entries for {len(right)} validation "
                                     f"images")
                row += (int(right[mask].sum()) / int(mask.sum()),)
            curve.append(row)
    return curve


def choose_n(curve: Sequence[tuple], tolerance: float | None = None) -> int:
    """The ``n`` of the highest validation accuracy on ``curve``; ties go to the smaller ``n``.

    ``tolerance`` (a fraction, e.g. 0.01 for one point): only the ``n`` whose clean validation accuracy (the third
    entry of each row: :func:`accuracy_curve` with ``clean``) is at least the unablated model's (``n = 0``) minus
    ``tolerance`` are candidates; ``n = 0`` always is. Takes only the validation curve: the choice cannot depend on
    test data.
    """
    if not curve:
        raise ValueError("choose_n: the validation curve is empty")
    if tolerance is not None and (tolerance < 0 or not np.isfinite(tolerance)):
        raise ValueError(f"choose_n: tolerance must be a finite number >= 0; got {tolerance}")
    if tolerance is not None and any(len(r) < 3 for r in curve):
        raise ValueError("choose_n: a clean tolerance needs each row's clean accuracy: build the curve with "
                         "accuracy_curve(..., clean=...)")
    rows = [(int(r[0]), float(r[1]), float(r[2]) if len(r) > 2 else math.nan) for r in curve]
    if any(not np.isfinite(acc) for _, acc, _ in rows):
        raise ValueError("choose_n: the validation curve holds non-finite accuracies")
    if tolerance is not None:
        base = next((c for n, _, c in rows if n == 0), None)
        if base is None:
            raise ValueError("choose_n: a clean tolerance needs the unablated model's row (n = 0)")
        rows = [r for r in rows if r[0] == 0 or r[2] >= base - tolerance - 1e-12]
    best = max(acc for _, acc, _ in rows)
    return min(n for n, acc, _ in rows if acc == best)


def all_unit_list(all_units: Mapping[str, int]) -> list[Unit]:
    """Every ``(layer, unit)`` of ``{layer: number of units}`` in layer order, then unit order."""
    out: list[Unit] = []
    for layer, count in all_units.items():
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
            raise ValueError(f"all_units[{layer!r}] must be the layer's number of units (an int >= 1); got {count!r}")
        out += [(str(layer), u) for u in range(int(count))]
    if not out:
        raise ValueError("all_units is empty: give {layer: number of units} for the recorded layers")
    return out


def random_units(all_units: Mapping[str, int], n: int, draws: int = MIN_RANDOM_DRAWS, seed: int = 0,
                 exclude: Iterable[Any] = ()) -> list[list[Unit]]:
    """``draws`` random sets of ``n`` distinct units, each drawn uniformly from all units of ``all_units``
    (``{layer: number of units}``) minus ``exclude`` (e.g. the flagged units); seeded, so reproducible.

    ``draws`` must be at least :data:`MIN_RANDOM_DRAWS` (one random draw says nothing about the spread).
    """
    if draws < MIN_RANDOM_DRAWS:
        raise ValueError(f"random_units: draws must be >= {MIN_RANDOM_DRAWS} (ablate.random_draws); got {draws}")
    if n < 0:
        raise ValueError(f"random_units: n must be >= 0; got {n}")
    skip = set(_unit_list(exclude, "random_units exclude"))
    pool = [u for u in all_unit_list(all_units) if u not in skip]
    if n > len(pool):
        raise ValueError(f"random_units: cannot draw {n} distinct units from {len(pool)} candidates "
                         f"({len(skip)} excluded)")
    rng = random.Random(seed)
    return [[pool[i] for i in sorted(rng.sample(range(len(pool)), n))] for _ in range(draws)]


def sort_all(model: nn.Module, all_units: Mapping[str, int], val_loader: Iterable, n: int, method: Method = "zero",
             means: Mapping[str, Any] | None = None, *, max_candidates: int | None = None, seed: int = 0,
             device: str | torch.device | None = None, class_index: Sequence[int] | None = None,
             cache_mb: float = 1024.0, progress: bool = True,
             scores: dict[Unit, float] | None = None) -> list[Unit]:
    """The "sort all units" control: :func:`order_units` over every unit of ``all_units`` (``{layer: number of
    units}``), then the first ``n``.

    Scoring a unit costs one validation pass, so ``max_candidates`` caps how many are scored: when there are more
    units, a seeded uniform random subset of ``max_candidates`` units (over all layers) is scored and the top ``n``
    of those are returned (``n <= max_candidates`` is required). ``None`` scores every unit.
    """
    if n < 0:
        raise ValueError(f"sort_all: n must be >= 0; got {n}")
    pool = all_unit_list(all_units)
    if max_candidates is not None:
        if max_candidates < max(n, 1):
            raise ValueError(f"sort_all: max_candidates ({max_candidates}) must be >= n ({n}) and >= 1")
        if len(pool) > max_candidates:
            picked = set(random.Random(seed).sample(range(len(pool)), max_candidates))
            pool = [u for i, u in enumerate(pool) if i in picked]
    if n > len(pool):
        raise ValueError(f"sort_all: asked for {n} units but only {len(pool)} exist in {list(all_units)}")
    if n == 0:
        return []
    ordered = order_units(model, pool, val_loader, method, means, device=device, class_index=class_index,
                          cache_mb=cache_mb, progress=progress, scores=scores)
    return [unit for unit, _ in ordered[:n]]
