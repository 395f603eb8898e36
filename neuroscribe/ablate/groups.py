"""Group evidence, for data whose cue is known only through group labels (no clean/cued pairs of one photo): within
each class, how well a unit's activation separates the images of the cue group from the rest of the class.

For a unit ``u`` with ``a_u(x)`` its spatial-max activation (as :func:`~neuroscribe.ablate.flag.cue_effect` reads
it), class ``c`` with ``n1_c`` cue-group images and ``n0_c`` others, and ``U_c`` the Mann-Whitney count of
(cue, other) pairs of class ``c`` where the cue image activates the unit more (ties count a half)::

    AUC_u = sum_c U_c / sum_c n1_c * n0_c

the class-stratified AUC: the probability that, within a class, a cue-group image activates the unit more than an
image of the same class without it. Comparing only within a class keeps the label out: on Waterbirds, where water
goes with waterbirds, a "waterbird" unit separates water from land over the whole set but not within each class.
0.5 = no separation; classes with no image on one side do not count. The 95% interval is the percentile interval of
``B`` bootstrap replicates that resample images within each class x group cell (seeded).

A unit is flagged by group evidence (:func:`group_flags`) when its AUC is among the top ``top`` share of its layer
and the interval's lower end is above 0.5. These flags are a variant of their own (``group`` in ``flags.json``),
beside the description flags and never mixed into them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from scipy.stats import rankdata
from torch import nn

from ..hooks import layer_layout, run, trace
from .flag import _spatial_max

__all__ = ["group_activations", "group_flags", "stratified_auc"]

Unit = tuple[str, int]


def _u_counts(acts: np.ndarray, cue: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, float]:
    """``(sum_c U_c per unit, sum_c n1_c n0_c)`` for ``acts [N, units]``."""
    u_sum = np.zeros(acts.shape[1])
    pairs = 0.0
    for c in np.unique(labels):
        m = labels == c
        n1, n0 = int(cue[m].sum()), int((~cue[m]).sum())
        if n1 == 0 or n0 == 0:
            continue
        ranks = rankdata(acts[m], axis=0)  # average ranks: ties count a half
        u_sum += ranks[cue[m]].sum(0) - n1 * (n1 + 1) / 2
        pairs += n1 * n0
    return u_sum, pairs


def stratified_auc(acts: np.ndarray, labels: Sequence[int], cue: Sequence[bool], bootstrap: int = 1000,
                   seed: int = 0) -> dict[str, np.ndarray | dict]:
    """Class-stratified AUC of each unit (column of ``acts``) for ``cue`` images vs the rest, with a 95% bootstrap
    interval (``lo``/``hi`` are None with ``bootstrap=0``); see the module docstring. ``per_class``: ``{class:
    {"cue": n1, "rest": n0}}``. Raises ``ValueError`` when no class has images on both sides."""
    acts = np.asarray(acts, dtype=np.float64)
    labels, cue = np.asarray(labels).reshape(-1), np.asarray(cue, dtype=bool).reshape(-1)
    if acts.ndim != 2 or not acts.shape[0] == labels.shape[0] == cue.shape[0]:
        raise ValueError(f"acts [N, units], labels [N] and cue [N] must agree; got {acts.shape}, {labels.shape}, "
                         f"{cue.shape}")
    per_class = {int(c): {"cue": int(cue[labels == c].sum()), "rest": int((~cue[labels == c]).sum())}
                 for c in np.unique(labels)}
    u_sum, pairs = _u_counts(acts, cue, labels)
    if pairs == 0:
        raise ValueError(f"group evidence needs a class with images both in and out of the cue group; per class "
                         f"(cue, rest): {per_class}")
    out: dict = {"auc": u_sum / pairs, "lo": None, "hi": None, "per_class": per_class}
    if bootstrap:
        rng = np.random.default_rng(seed)
        cells = [np.flatnonzero((labels == c) & (cue == k)) for c in np.unique(labels) for k in (True, False)]
        cells = [c for c in cells if len(c)]
        reps = np.empty((bootstrap, acts.shape[1]))
        for b in range(bootstrap):
            idx = np.concatenate([rng.choice(c, size=len(c), replace=True) for c in cells])
            u, p = _u_counts(acts[idx], cue[idx], labels[idx])
            reps[b] = u / p
        out["lo"], out["hi"] = np.percentile(reps, [2.5, 97.5], axis=0)
    return out


@torch.no_grad()
def group_activations(model: nn.Module, layers: Sequence[str], batches: Iterable, *,
                      device: str | torch.device = "cpu") -> tuple[dict[str, np.ndarray], np.ndarray, list[str]]:
    """``({layer: [N, units] spatial-max activations}, labels [N], groups [N])`` over ``batches`` of
    ``(x, y, {'group': [...]})`` (the items of :mod:`neuroscribe.datasets.sets`)."""
    acts: dict[str, list[np.ndarray]] = {l: [] for l in layers}
    labels, groups, layouts = [], [], {}
    was_training = model.training
    model.eval()
    try:
        for x, y, info in batches:
            with trace(model, retain=list(layers)) as tr:
                run(model, x.to(device))
            for l in layers:
                if l not in layouts:
                    layouts[l] = layer_layout(model, l, tuple(tr[l].shape))
                acts[l].append(_spatial_max(tr[l], model, layouts[l]).double().cpu().numpy())
            labels.append(np.asarray(y).reshape(-1))
            groups += [str(g) for g in (info["group"] if isinstance(info, Mapping) else info)]
    finally:
        model.train(was_training)
    if not labels:
        raise ValueError("group evidence: the group shift yielded no images")
    return {l: np.concatenate(a) for l, a in acts.items()}, np.concatenate(labels), groups


def group_flags(auc: Mapping[Unit, tuple[float, float | None, float | None]], top: float) -> dict[Unit, str]:
    """Units flagged by group evidence -> the reason: among the top ``top`` share of their layer by AUC, with the
    interval's lower end above 0.5 (without an interval, the AUC itself above 0.5)."""
    by_layer: dict[str, list[Unit]] = {}
    for k in auc:
        by_layer.setdefault(k[0], []).append(k)
    out = {}
    for layer, keys in by_layer.items():
        keys.sort(key=lambda k: (-auc[k][0], k))
        n = max(1, math.ceil(top * len(keys)))
        for rank, k in enumerate(keys[:n], 1):
            a, lo, hi = auc[k]
            if (lo if lo is not None else a) > 0.5:
                ci = f" [{lo:.3f}, {hi:.3f}]" if lo is not None else ""
                out[k] = (f"group AUC {a:.3f}{ci} (cue group vs the rest, within each class) ranks {rank} of "
                          f"{len(keys)} in layer {layer!r} (top {top:.3g} share, interval above 0.5)")
    return out
