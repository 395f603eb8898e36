"""Last-layer re-fits, reported separately from the ablation: MILAN's stronger edit (:func:`refit_last_layer`: after
ablating units, a multinomial logistic regression on the ablated model's penultimate features over training data,
as MAIA does on the kept units) and DFR (:func:`dfr_last_layer`, deep feature re-weighting, Kirichenko et al. 2023:
the same regression on a group-balanced held-out slice where the cue is independent of the label, its
regularisation chosen on a disjoint slice by worst-group accuracy). The ablation stays in place; only the last
layer's weights and bias change."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..hooks import run, trace
from .edit import ablation_edits, as_unit_dict


def last_linear(model: nn.Module) -> str:
    """The name of the model's last ``nn.Linear`` (the classifier head)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError("refit needs a final nn.Linear classifier layer; this model has none")
    return names[-1]


@torch.no_grad()
def features(model: nn.Module, loader: Iterable, edits: Mapping[str, Any] | None, head: str,
             device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Inputs of ``head`` (penultimate features) under ``edits``, with their labels."""
    xs, ys = [], []
    model.eval()
    for batch in loader:
        x, y = batch[0], batch[1]
        with trace(model, edit=edits, retain_inputs=[head]) as tr:
            run(model, x.to(device))
        xs.append(tr.inputs[head].flatten(1).float().cpu().numpy())
        ys.append(np.asarray(y))
    return np.concatenate(xs), np.concatenate(ys)


@torch.no_grad()
def refit_last_layer(model: nn.Module, units: Any, loader: Iterable, method: str = "zero",
                     means: Mapping[str, Any] | None = None, *, device: torch.device | str = "cpu",
                     c: float = 1.0, seed: int = 0) -> nn.Module:
    """A copy of ``model`` whose last linear layer is re-fitted on ``loader`` with ``units`` ablated.

    The copy still needs the same ablation edits at inference (``ablation_edits(copy, units, ...)``).
    """
    from sklearn.linear_model import LogisticRegression
    device = torch.device(device)
    head = last_linear(model)
    edits = ablation_edits(model, as_unit_dict(units), method, means) if units else None
    x, y = features(model, loader, edits, head, device)
    lin: nn.Linear = dict(model.named_modules())[head]
    if int(y.max()) >= lin.out_features:
        raise ValueError(f"labels go up to {int(y.max())} but {head!r} has {lin.out_features} outputs")
    clf = LogisticRegression(C=c, max_iter=2000, random_state=seed)
    clf.fit(x, y)
    return _with_head(model, head, clf)


def _with_head(model: nn.Module, head: str, clf) -> nn.Module:
    """A copy of ``model`` whose ``head`` (nn.Linear) computes the fitted logistic regression ``clf``."""
    out = copy.deepcopy(model)
    new = dict(out.named_modules())[head]
    w = torch.zeros_like(new.weight)
    b = torch.full_like(new.bias, -1e4) if new.bias is not None else None  # classes absent from the data
    cls = torch.as_tensor(clf.classes_, dtype=torch.long)
    coef = torch.as_tensor(clf.coef_, dtype=w.dtype)
    inter = torch.as_tensor(clf.intercept_, dtype=w.dtype)
    if len(cls) == 2:  # sklearn's binary form: one row for class 1
        coef = torch.cat([-coef / 2, coef / 2])
        inter = torch.cat([-inter / 2, inter / 2])
    w[cls.to(w.device)] = coef.to(w.device)
    new.weight.copy_(w)
    if b is not None:
        b[cls.to(b.device)] = inter.to(b.device)
        new.bias.copy_(b)
    return out


DFR_C = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)  # inverse L2 strengths tried; the strongest of the best-scoring ones wins


def labels_and_groups(ds) -> tuple[list[int], list[str]]:
    """Per item of a labelled dataset (:mod:`neuroscribe.datasets.sets` or a cued shift): its label and group."""
    if hasattr(ds, "pair"):  # a cued shift: (path, label) samples, groups from its draw (clean / cue-agrees / ...)
        return [int(s[1]) for s in ds.samples], [ds.group(i) for i in range(len(ds))]
    return [int(s.label) for s in ds.samples], [s.group or "" for s in ds.samples]


@torch.no_grad()
def dfr_last_layer(model: nn.Module, units: Any, ds, make_loader, method: str = "zero",
                   means: Mapping[str, Any] | None = None, *, device: torch.device | str = "cpu",
                   seed: int = 0, cs: Sequence[float] = DFR_C) -> tuple[nn.Module, dict]:
    """DFR: a copy of ``model`` whose last linear layer is re-fitted on a group-balanced half of ``ds``.

    ``ds`` (items ``(x, y, info)``) is split, every (class, group) cell in two halves (seeded), into a fit half
    and a choose half (disjoint); every cell of the fit half is cut to the size of its smallest cell
    (group-balanced, as DFR does; a cell of one image has nothing to fit); for each C in ``cs`` a logistic
    regression is fitted there on the penultimate features (``units`` ablated) and scored on the choose half by
    worst-(class, group) accuracy; the best C (ties: the smaller C) is kept.
    ``make_loader(dataset)`` batches a subset. Returns ``(model copy, info)`` with the cells, sizes and scores.
    """
    from sklearn.linear_model import LogisticRegression
    from ..datasets.splits import _rng
    device = torch.device(device)
    labels, groups = labels_and_groups(ds)
    names = sorted(set(zip(labels, groups)))
    cell = [names.index(c) for c in zip(labels, groups)]
    members: dict[int, list[int]] = {}
    for i, c in enumerate(cell):
        members.setdefault(c, []).append(i)
    by_cell, choose = {}, []  # half of every cell to fit, the other half to choose C
    for c, ids in sorted(members.items()):
        ids = list(ids)
        # seeded by the class and the cell's size, not the group: cells of one class listing the same photos in the
        # same order (a holdout's clean and cued copies) are cut alike, so no photo is fitted in one group and
        # scored in the other
        _rng(seed, "dfr split", names[c][0], len(ids)).shuffle(ids)
        if len(ids) // 2:
            by_cell[c] = sorted(ids[:len(ids) // 2])
        choose += ids[len(ids) // 2:]
    choose.sort()
    if len(by_cell) < 2 or not choose:
        raise ValueError(f"DFR needs at least two (class, group) cells with images in both halves; got cells "
                         f"{[f'{y}/{g}' for y, g in names]} over {len(cell)} images")
    size = min(len(v) for v in by_cell.values())
    balanced = sorted(i for c, ids in by_cell.items()
                      for i in _rng(seed, "dfr balance", names[c][0], len(ids)).sample(ids, size))  # alike, too
    head = last_linear(model)
    edits = ablation_edits(model, as_unit_dict(units), method, means) if units else None
    xf, yf = features(model, make_loader(torch.utils.data.Subset(ds, balanced)), edits, head, device)
    xc, yc = features(model, make_loader(torch.utils.data.Subset(ds, choose)), edits, head, device)
    cc = np.array([cell[i] for i in choose])
    scores, best = {}, None
    for c in cs:
        clf = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(xf, yf)
        hit = clf.predict(xc) == yc
        scores[c] = float(min(hit[cc == k].mean() for k in np.unique(cc)))
        if best is None or scores[c] > scores[best[0]]:
            best = (c, clf)
    info = {"C": best[0], "worst_group_by_C": {str(c): v for c, v in scores.items()},
            "cells": [f"{y}/{g}" for y, g in names], "fit_cells": ["/".join(map(str, names[c])) for c in by_cell],
            "fit_per_cell": size, "fit": len(balanced),
            "choose": len(choose), "images": len(cell)}
    return _with_head(model, head, best[1]), info
