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

from ..datasets.splits import _rng
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


def with_head_weights(model: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A copy of ``model`` whose last linear layer holds ``weight`` and ``bias`` (a stored re-fit's head)."""
    out = copy.deepcopy(model)
    lin = dict(out.named_modules())[last_linear(out)]
    if tuple(lin.weight.shape) != tuple(weight.shape) or (lin.bias is None) != (bias is None):
        raise ValueError(f"a stored head of shape {tuple(weight.shape)} does not fit the model's last linear layer "
                         f"{tuple(lin.weight.shape)}")
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return out


def _with_head(model: nn.Module, head: str, clf) -> nn.Module:
    """A copy of ``model`` whose ``head`` (nn.Linear, the last one) computes the fitted logistic regression ``clf``."""
    new = dict(model.named_modules())[head]
    w = torch.zeros_like(new.weight)
    b = torch.full_like(new.bias, -1e4) if new.bias is not None else None  # classes absent from the data
    cls = torch.as_tensor(clf.classes_, dtype=torch.long)
    coef = torch.as_tensor(clf.coef_, dtype=w.dtype)
    inter = torch.as_tensor(clf.intercept_, dtype=w.dtype)
    if len(cls) == 2 and coef.shape[0] == 1:  # sklearn's binary form: one row for class 1
        coef = torch.cat([-coef / 2, coef / 2])
        inter = torch.cat([-inter / 2, inter / 2])
    w[cls.to(w.device)] = coef.to(w.device)
    if b is not None:
        b[cls.to(b.device)] = inter.to(b.device)
    return with_head_weights(model, w, b)


#: inverse L2 strengths tried, on standardised features, smallest first (each fit warm-starts from the one before);
#: 1.0 and 3.0 were dropped on 2026-12-05: never chosen in the corner study's fits (C <= 0.1), they took most of the
#: solver's iterations, and a fit whose chosen C is below them is bit-identical without them (README, study)
DFR_C = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3)
DFR_C_L1 = (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)  # penalty="l1": the grid of DFR's own script
DFR_RULE = (f"dfr v3: standardised features, C by worst cue group (L2 over {DFR_C}), "  # in cache keys
            "final fit on the whole slice")
DFR_WARM_RULE = "with dfr_train images every L2 fit starts from the previous solution (sklearn warm_start)"
DFR_RETRAINS = 10  # final fits on seeded group-balanced subsets of the whole slice, coefficients averaged (DFR: 20)


def dfr_rule(cfg) -> str:
    """DFR's rule as it applies to ``cfg``'s fits, for cache keys: :data:`DFR_RULE`, plus :data:`DFR_WARM_RULE` where
    ``ablate.dfr_train`` adds training photos (those fits are warm-started: the same optimum to the solver's
    tolerance, not bit for bit -- one clean photo moved on study seed 0); jobs without them keep their keys."""
    return DFR_RULE + (f"; {DFR_WARM_RULE}" if cfg.ablate.dfr_train else "")


def labels_and_groups(ds) -> tuple[list[int], list[str]]:
    """Per item of a labelled dataset (:mod:`neuroscribe.datasets.sets` or a cued shift): its label and group."""
    if hasattr(ds, "pair"):  # a cued shift: (path, label) samples, groups from its draw (clean / cue-agrees / ...)
        return [int(s[1]) for s in ds.samples], [ds.group(i) for i in range(len(ds))]
    return [int(s.label) for s in ds.samples], [s.group or "" for s in ds.samples]


def _cells(labels: Sequence[int], groups: Sequence[str]) -> tuple[list, list[int], dict[int, list[int]]]:
    names = sorted(set(zip(labels, groups)))
    cell = [names.index(c) for c in zip(labels, groups)]
    members: dict[int, list[int]] = {}
    for i, c in enumerate(cell):
        members.setdefault(c, []).append(i)
    return names, cell, members


def _balanced(members: Mapping[int, Sequence[int]], names: Sequence, seed: int, tag: str) -> list[int]:
    """Every cell cut to the size of the smallest, by a seeded draw that depends on the class and the cell's size
    only (cells of one class listing the same photos in the same order -- a holdout's clean and cued copies -- are
    cut alike)."""
    size = min(len(v) for v in members.values())
    return sorted(i for c, ids in members.items()
                  for i in _rng(seed, tag, names[c][0], len(ids)).sample(list(ids), size))


def dfr_split(labels: Sequence[int], groups: Sequence[str], seed: int) -> tuple[list[int], list[int]]:
    """``(fit, choose)`` indices for tuning C: every (class, group) cell cut in two seeded halves (alike for the
    two copies of the same photos); the fit half is group-balanced (every cell cut to the smallest)."""
    names, cell, members = _cells(labels, groups)
    by_cell, choose = {}, []
    for c, ids in sorted(members.items()):
        ids = list(ids)
        # seeded by the class and the cell's size, not the group: no photo is fitted in one group and scored in the
        # other
        _rng(seed, "dfr split", names[c][0], len(ids)).shuffle(ids)
        if len(ids) // 2:
            by_cell[c] = sorted(ids[:len(ids) // 2])
        choose += ids[len(ids) // 2:]
    if len(by_cell) < 2 or not choose:
        raise ValueError(f"DFR needs at least two (class, group) cells with images in both halves; got cells "
                         f"{[f'{y}/{g}' for y, g in names]} over {len(cell)} images")
    return _balanced(by_cell, names, seed, "dfr balance"), sorted(choose)


class _TowardHead:
    """A multinomial logistic regression whose L2 penalty pulls its weights toward a prior ``(coef, intercept)``
    instead of zero (L2-SP, Li et al. 2018): ``sum CE + ||W - W0||^2 / (2 C)``, the intercept free -- sklearn's
    objective (divided by C) with another centre. Fitted by L-BFGS in float64 from the prior; one row per logit."""

    def __init__(self, prior: tuple[np.ndarray, np.ndarray], c: float):
        self.prior, self.c = prior, c

    def fit(self, x: np.ndarray, y: np.ndarray) -> "_TowardHead":
        w0 = torch.as_tensor(self.prior[0], dtype=torch.float64)
        w = w0.clone().requires_grad_(True)
        b = torch.as_tensor(self.prior[1], dtype=torch.float64).clone().requires_grad_(True)
        xt, yt = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.long)
        opt = torch.optim.LBFGS([w, b], max_iter=1000, tolerance_grad=1e-9, tolerance_change=1e-12,
                                line_search_fn="strong_wolfe")

        def loss():
            opt.zero_grad()
            out = nn.functional.cross_entropy(xt @ w.T + b, yt, reduction="sum") + ((w - w0) ** 2).sum() / (2 * self.c)
            out.backward()
            return out
        with torch.enable_grad():
            opt.step(loss)
        self.coef_, self.intercept_ = w.detach().numpy(), b.detach().numpy()
        self.classes_ = np.arange(len(self.intercept_))
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return (x @ self.coef_.T + self.intercept_).argmax(1)


class _L1OneVsRest:
    """DFR's own fit (``dfr_evaluate_spurious.py``: liblinear, L1, one-vs-rest for several classes, as sklearn < 1.8
    did for a multiclass liblinear fit): one L1 logistic regression per class; the logit of a class is its score."""

    def __init__(self, c: float, seed: int):
        self.c, self.seed = c, seed

    def fit(self, x: np.ndarray, y: np.ndarray) -> "_L1OneVsRest":
        from sklearn.linear_model import LogisticRegression
        from sklearn.multiclass import OneVsRestClassifier
        m = OneVsRestClassifier(LogisticRegression(C=self.c, l1_ratio=1.0, solver="liblinear",
                                                   random_state=self.seed)).fit(x, y)
        self.classes_ = m.classes_
        self.coef_ = np.vstack([e.coef_ for e in m.estimators_])
        self.intercept_ = np.concatenate([e.intercept_ for e in m.estimators_])
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        score = x @ self.coef_.T + self.intercept_
        return self.classes_[(score[:, 0] > 0).astype(int) if len(self.coef_) == 1 else score.argmax(1)]


def _fit(x: np.ndarray, y: np.ndarray, c: float, seed: int, prior: tuple[np.ndarray, np.ndarray] | None = None,
         penalty: str = "l2", start=None):
    """One regression. ``start``: an earlier L2 fit on the same classes whose coefficients L-BFGS starts from
    (sklearn's ``warm_start``; the same convex objective, so the same optimum to the solver's tolerance)."""
    if prior is not None:
        return _TowardHead(prior, c).fit(x, y)
    if penalty == "l1":
        return _L1OneVsRest(c, seed).fit(x, y)
    from sklearn.linear_model import LogisticRegression
    clf = LogisticRegression(C=c, max_iter=2000, random_state=seed)
    if isinstance(start, LogisticRegression) and np.array_equal(start.classes_, np.unique(y)):
        clf.set_params(warm_start=True)
        clf.coef_, clf.intercept_ = start.coef_.copy(), start.intercept_.copy()
    return clf.fit(x, y)


@torch.no_grad()
def dfr_last_layer(model: nn.Module, units: Any, ds, make_loader, method: str = "zero",
                   means: Mapping[str, Any] | None = None, *, device: torch.device | str = "cpu",
                   seed: int = 0, cs: Sequence[float] | None = None, retrains: int = DFR_RETRAINS,
                   toward: str = "zero", penalty: str = "l2", extra=None,
                   warm_start: bool | None = None) -> tuple[nn.Module, dict]:
    """DFR: a copy of ``model`` whose last linear layer is re-fitted on group-balanced subsets of ``ds``, as in
    Kirichenko et al. (2023), ``dfr_evaluate_spurious.py``.

    Penultimate features (``units`` ablated) are standardised. C is tuned on two halves (:func:`dfr_split`): for
    each C in ``cs`` a logistic regression fitted on the group-balanced half is scored on the other half by its
    worst group, each group's accuracy the mean over its classes (ties: the smaller C). The groups are the cue
    conditions (e.g. clean / cue-conflicts): the worst (class, group) cell, DFR's criterion for its 2-class sets, is
    0-21 % on cells of ~14 images here and ties over most of the grid (reported as ``worst_cell_by_C``). The
    chosen C is then fitted ``retrains`` times on seeded group-balanced subsets of the WHOLE of ``ds`` and the
    coefficients averaged (DFR's final fit). ``make_loader(dataset)`` batches a subset. ``toward="head"`` pulls
    the weights toward the trained head's instead of toward zero (:class:`_TowardHead`; C then sets how far the re-fit
    may move from it, and the grid's large C is DFR again).
    ``extra``: more images added to every fit, never scored (:func:`~neuroscribe.datasets.sets.dfr_train_set`:
    training photos, each clean and with the cue naming a random class, so its groups are balanced by construction).
    C is still chosen on the held-out half of ``ds`` alone -- photos the model never trained on, whose features
    show how much it leans on the cue -- and the features are standardised over both. With extra images every
    fit shares most of its data with the one before, so each L2 fit starts from the previous solution (the C grid
    in its order, then the final fits; ``warm_start=False``: each from zero, as without ``extra``): the same
    optimum to the solver's tolerance in a fraction of the iterations.
    The fit is a multinomial L2 logistic regression (``penalty="l2"``, C over :data:`DFR_C`). DFR's own script fits
    L1 one-vs-rest (liblinear, C over :data:`DFR_C_L1`; ``penalty="l1"``): on the five 64 px study seeds, with the
    slice's cue naming a random class, that gave 2.2 points less wrong-text accuracy alone and 1.9 less after the
    description units, in every seed, and 1.3 (every seed) / 0.5 (4 of 5) clean points less
    (``tools/clean_budget.py --penalty``).
    Returns ``(model copy, info)`` with the cells, sizes and scores.
    """
    if penalty not in ("l1", "l2") or (penalty == "l1" and toward != "zero"):
        raise ValueError(f"dfr penalty={penalty!r} with toward={toward!r}: use 'l2' (any centre) or 'l1' (toward "
                         "zero, DFR's own fit)")
    cs = cs if cs is not None else DFR_C_L1 if penalty == "l1" else DFR_C
    device = torch.device(device)
    labels, groups = labels_and_groups(ds)
    names, cell, members = _cells(labels, groups)
    fit_ids, choose = dfr_split(labels, groups, seed)
    fit_cells = sorted({names[cell[i]] for i in fit_ids})
    head = last_linear(model)
    edits = ablation_edits(model, as_unit_dict(units), method, means) if units else None
    x, y = features(model, make_loader(torch.utils.data.Subset(ds, list(range(len(ds))))), edits, head, device)
    xe, ye = x[:0], y[:0]
    if extra is not None and len(extra):
        xe, ye = features(model, make_loader(torch.utils.data.Subset(extra, list(range(len(extra))))), edits, head,
                          device)
    both = np.concatenate([x, xe])
    mu, sd = both.mean(0), both.std(0) + 1e-6
    z, ze = (x - mu) / sd, (xe - mu) / sd
    prior = None
    if toward == "head":  # the trained head in standardised coordinates: W x + b = (W sd) z + (W mu + b)
        lin = dict(model.named_modules())[head]
        w0 = lin.weight.detach().double().cpu().numpy()
        b0 = lin.bias.detach().double().cpu().numpy() if lin.bias is not None else np.zeros(len(w0))
        if int(y.max()) >= len(w0):
            raise ValueError(f"labels go up to {int(y.max())} but {head!r} has {len(w0)} outputs")
        prior = (w0 * sd, w0 @ mu + b0)
    elif toward != "zero":
        raise ValueError(f"dfr toward={toward!r}: use 'zero' (DFR) or 'head' (toward the trained head)")

    warm = (bool(len(ye)) if warm_start is None else warm_start) and penalty == "l2" and prior is None
    last, iters = [None], []  # warm: each sklearn L2 fit starts from the one before

    def fit(ids, c):  # the slice's ``ids`` and every extra image
        clf = _fit(np.concatenate([z[ids], ze]), np.concatenate([y[ids], ye]), c, seed, prior, penalty,
                   start=last[0] if warm else None)
        last[0] = clf
        iters.append(int(np.max(getattr(clf, "n_iter_", 0))))
        return clf
    cells = np.asarray(cell)
    cc, gc = cells[choose], np.asarray(groups)[choose]
    by_c, cell_by_c, best, fitted = {}, {}, None, {}
    for c in cs:
        fitted[c] = fit(fit_ids, c)
        hit = fitted[c].predict(z[choose]) == y[choose]
        per_cell = {k: float(hit[cc == k].mean()) for k in np.unique(cc)}
        per_group = {g: float(np.mean([v for k, v in per_cell.items() if names[k][1] == g])) for g in np.unique(gc)}
        by_c[c], cell_by_c[c] = per_group, min(per_cell.values())
        if best is None or min(per_group.values()) > min(by_c[best].values()):
            best = c
    coef, inter, last[0] = [], [], fitted[best]  # the final fits start from the chosen C's
    for r in range(retrains):
        sub = _balanced(members, names, seed + 1000 * r, "dfr final")
        clf = fit(sub, best)
        coef.append(clf.coef_)
        inter.append(clf.intercept_)
    clf.coef_, clf.intercept_ = np.mean(coef, 0) / sd, np.mean(inter, 0) - (np.mean(coef, 0) / sd) @ mu
    per_cell_final = min(len(v) for v in members.values())
    info = {"C": best, "toward": toward, "penalty": penalty,
            "worst_group_by_C": {str(c): min(v.values()) for c, v in by_c.items()},
            "group_acc_by_C": {str(c): v for c, v in by_c.items()},
            "worst_cell_by_C": {str(c): v for c, v in cell_by_c.items()},
            "cells": [f"{y}/{g}" for y, g in names], "fit_cells": [f"{y}/{g}" for y, g in fit_cells],
            "fit_per_cell": len(fit_ids) // len(fit_cells), "fit": len(fit_ids), "extra": len(ye),
            "choose": len(choose), "images": len(cell), "standardised": True, "warm_start": warm,
            "solver_iterations": sum(iters),
            "final": {"retrains": retrains, "per_cell": per_cell_final, "images": per_cell_final * len(members)}}
    return _with_head(model, head, clf), info
