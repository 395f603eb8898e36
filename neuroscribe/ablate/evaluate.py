"""Predictions on a test set (optionally with units ablated) and accuracy with bootstrap confidence intervals.

Bootstrap (percentile, 95%): the accuracy of ``n`` images is the mean of a 0/1 "correct" vector ``c``. Resampling
``n`` images with replacement gives a number of correct images distributed exactly as ``Binomial(n, mean(c))``, so
``B`` bootstrap accuracies are drawn directly as ``Binomial(n, acc, size=B) / n`` (vectorised, O(B) memory, the same
distribution as index resampling). Per group, groups are resampled separately (a stratified bootstrap); the
worst-group accuracy's interval is the percentile interval of ``min_g acc_g`` over those replicates. For a paired
difference on the same images, each image falls in one of four cells (a right & b right, a right & b wrong, ...);
resampling images draws the cell counts from ``Multinomial(n, cell frequencies)`` and the difference is
``(n_10 - n_01) / n``. The interval is ``[2.5th, 97.5th]`` percentile of the ``B`` replicates.

Class subsets: a test set whose classes are a subset of the model's (Imagenette folders vs ImageNet-1k logits) is
scored on the model's logits *restricted to those classes* (:func:`label_map` gives the columns, ``predict(...,
class_index=...)`` restricts), so a prediction is always one of the test set's classes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from ..datasets.labels import label_map
from ..hooks import trace
from ..models import channels_last, to_layout

__all__ = [
    "Predictions",
    "accuracy_report",
    "correct",
    "label_map",
    "paired_bootstrap_diff",
    "predict",
    "unpack_batch",
]


class Predictions(NamedTuple):
    """What :func:`predict` returns; unpacks as ``(outputs, labels, groups)``.

    ``outputs`` is ``float32 [N, K]`` logits (restricted to ``class_index`` when given) or ``int64 [N]``
    predictions; ``labels`` ``int64 [N]`` (-1 where a batch carried none); ``groups`` an object array of strings
    or None when no batch carried groups.
    """

    outputs: np.ndarray
    labels: np.ndarray
    groups: np.ndarray | None

    @property
    def preds(self) -> np.ndarray:
        """Predicted class per image (argmax of the logits)."""
        return self.outputs.argmax(1) if self.outputs.ndim == 2 else self.outputs


def unpack_batch(batch: Any) -> tuple[torch.Tensor | None, torch.Tensor | None, list[str] | None]:
    """``(images, labels, groups)`` from the batch forms the project's datasets produce.

    Accepted: ``(x, y)``; ``(x, y, info)`` with ``info`` a dict holding ``group`` (a collated
    :class:`~neuroscribe.datasets.shifts.CuedDataset` batch) or a list of group names; a dict with ``image``/``x``,
    ``label``/``y`` and optional ``group``. ``x`` may be None (a batch whose images all failed to load).
    """
    if isinstance(batch, Mapping):
        x = batch.get("image", batch.get("x"))
        y = batch.get("label", batch.get("y"))
        g = batch.get("group")
    elif isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
        x, y = batch[0], batch[1]
        g = batch[2] if len(batch) == 3 else None
        if isinstance(g, Mapping):
            g = g.get("group")
        elif torch.is_tensor(g):
            raise TypeError("the third element of a batch must be group names (or an info dict with 'group'); "
                            "got a tensor (is this a probe-set batch (x, ids, failed)? those carry no labels)")
    elif torch.is_tensor(batch):
        raise TypeError("a batch of bare images carries no labels: yield (images, labels[, groups])")
    else:
        raise TypeError(f"cannot read a batch of type {type(batch).__name__}: expected (images, labels[, groups]) "
                        "or a dict with image/label/group")
    if x is not None and not torch.is_tensor(x):
        raise TypeError(f"batch images must be a tensor; got {type(x).__name__}")
    if y is not None and not torch.is_tensor(y):
        y = torch.as_tensor(y)
    groups = [str(v) for v in g] if g is not None else None
    return x, y, groups


def _model_device(model: nn.Module) -> torch.device | None:
    for p in model.parameters():
        return p.device
    return None


def predict(model: nn.Module, loader: Iterable, device: str | torch.device | None = None,
            edits: Mapping[str, Callable] | None = None, *, class_index: Sequence[int] | None = None,
            keep_logits: bool = True, progress: bool = True, desc: str = "predict",
            heads: Mapping[str, nn.Module] | None = None, head: str | None = None) -> Predictions | dict:
    """Run ``model`` over every batch of ``loader`` (streaming; a tqdm bar counts images).

    ``edits`` (e.g. :func:`~neuroscribe.ablate.edit.ablation_edits`) are applied through
    :func:`neuroscribe.hooks.trace` for the whole pass. ``class_index[k]`` is the model's logit column for the test
    set's class ``k`` (:func:`label_map`): logits are restricted to those columns, so outputs and labels share the
    test set's class numbering. ``keep_logits=False`` keeps only the predicted class (less memory). The model is put
    in eval mode for the pass and its mode restored after; it must already sit on ``device``.
    ``heads`` (``{name: module}``) with ``head`` (the name of the model's last layer, whose output must be the
    logits): the same pass is also scored by each of those modules applied to ``head``'s input -- what the model with
    that module in ``head``'s place predicts (the same input, the same operation), from one pass of the body -- and
    ``{name: Predictions}`` is returned, the model's own output under ``""``.
    """
    from tqdm.auto import tqdm
    dev = torch.device(device) if device is not None else (_model_device(model) or torch.device("cpu"))
    mdev = _model_device(model)
    if mdev is not None and mdev.type != dev.type:
        raise ValueError(f"the model is on {mdev} but predict was asked to run on {dev}: move it first "
                         f"(model.to({str(dev)!r}))")
    cols = torch.as_tensor(list(class_index), dtype=torch.long, device=dev) if class_index is not None else None
    total = len(loader.dataset) if hasattr(loader, "dataset") and hasattr(loader.dataset, "__len__") else None
    if heads and head is None:
        raise ValueError("predict: heads need head, the name of the model's last layer they stand in for")
    outs: dict[str, list[np.ndarray]] = {"": [], **{k: [] for k in heads or {}}}
    labels: list[np.ndarray] = []
    groups: list[str] = []
    any_groups = False
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), channels_last(model) as layout, \
                trace(model, edit=dict(edits or {}), retain_inputs=[head] if heads else []) as tr, \
                tqdm(total=total, unit="img", desc=desc, disable=not progress, leave=False) as bar:
            for batch in loader:
                x, y, g = unpack_batch(batch)
                if x is None or x.shape[0] == 0:
                    continue
                out = model(to_layout(x.to(dev, non_blocking=True), layout))
                if not torch.is_tensor(out):
                    out = getattr(out, "logits", out[0] if isinstance(out, (tuple, list)) else out)
                for name, o in [("", out)] + [(k, m(tr.inputs[head])) for k, m in (heads or {}).items()]:
                    if o.dim() != 2:
                        raise ValueError(f"the model's output has shape {tuple(o.shape)}; expected logits "
                                         "[B, classes]")
                    if cols is not None:
                        if int(cols.max()) >= o.shape[1]:
                            raise ValueError(f"class_index names logit {int(cols.max())} but the model has "
                                             f"{o.shape[1]} outputs")
                        o = o.index_select(1, cols)
                    outs[name].append(o.float().cpu().numpy() if keep_logits else o.argmax(1).cpu().numpy())
                n = x.shape[0]
                labels.append(np.full(n, -1, np.int64) if y is None else y.reshape(-1).cpu().numpy().astype(np.int64))
                any_groups |= g is not None
                groups.extend(g if g is not None else [""] * n)
                bar.update(n)
    finally:
        model.train(was_training)
    if not outs[""]:
        raise ValueError("predict: the loader yielded no images")
    ls, gs = np.concatenate(labels), np.array(groups, dtype=object) if any_groups else None
    got = {k: Predictions(np.concatenate(v), ls, gs) for k, v in outs.items()}
    return got if heads else got[""]


def correct(outputs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Boolean ``[N]``: prediction (argmax of logits, or the given class ids) equals the label."""
    outputs, labels = np.asarray(outputs), np.asarray(labels).reshape(-1)
    preds = outputs.argmax(1) if outputs.ndim == 2 else outputs.reshape(-1)
    if preds.shape[0] != labels.shape[0]:
        raise ValueError(f"{preds.shape[0]} predictions but {labels.shape[0]} labels")
    missing = int((labels < 0).sum())
    if missing:
        raise ValueError(f"{missing} of {labels.shape[0]} images have no label (-1): accuracy needs labelled images")
    return preds == labels


def _ci(samples: np.ndarray | None) -> tuple[float | None, float | None]:
    if samples is None:
        return None, None
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return float(lo), float(hi)


def accuracy_report(preds: np.ndarray, labels: np.ndarray, groups: Sequence[str] | None = None,
                    bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Accuracy with a percentile-bootstrap 95% CI, per group and for the worst group (see the module docstring).

    ``preds`` are predicted classes ``[N]`` or logits ``[N, K]``. Returns ``{acc, ci_low, ci_high, n, bootstrap,
    per_group: {g: {acc, ci_low, ci_high, n}}, worst_group: {group, acc, ci_low, ci_high, n} | None,
    average_group: {acc, ci_low, ci_high, n} | None}`` (the unweighted mean of the group accuracies, GroupDRO's
    and DFR's "average-group accuracy"; its CI the percentile interval of that mean over the stratified replicates);
    CIs are None with ``bootstrap=0``; per_group is empty, worst_group and average_group None without groups.
    """
    if bootstrap < 0:
        raise ValueError(f"bootstrap must be >= 0; got {bootstrap}")
    c = correct(preds, labels)
    n = int(c.shape[0])
    if n == 0:
        raise ValueError("accuracy of an empty set")
    rng = np.random.default_rng(seed)
    acc = float(c.mean())
    boot = rng.binomial(n, acc, size=bootstrap) / n if bootstrap else None
    lo, hi = _ci(boot)
    report: dict[str, Any] = {"acc": acc, "ci_low": lo, "ci_high": hi, "n": n, "bootstrap": int(bootstrap),
                              "per_group": {}, "worst_group": None, "average_group": None}
    if groups is None:
        return report
    g = np.asarray([str(v) for v in groups], dtype=object)
    if g.shape[0] != n:
        raise ValueError(f"{g.shape[0]} group names but {n} predictions")
    names = sorted(set(g.tolist()))
    group_boot: list[np.ndarray] = []
    for name in names:
        cg = c[g == name]
        ng, ag = int(cg.shape[0]), float(cg.mean())
        bg = rng.binomial(ng, ag, size=bootstrap) / ng if bootstrap else None
        if bg is not None:
            group_boot.append(bg)
        glo, ghi = _ci(bg)
        report["per_group"][name] = {"acc": ag, "ci_low": glo, "ci_high": ghi, "n": ng}
    worst = min(names, key=lambda k: (report["per_group"][k]["acc"], k))
    wlo, whi = _ci(np.min(np.stack(group_boot), axis=0) if group_boot else None)
    report["worst_group"] = {"group": worst, "acc": report["per_group"][worst]["acc"], "ci_low": wlo,
                             "ci_high": whi, "n": report["per_group"][worst]["n"]}
    alo, ahi = _ci(np.mean(np.stack(group_boot), axis=0) if group_boot else None)
    report["average_group"] = {"acc": float(np.mean([report["per_group"][k]["acc"] for k in names])),
                               "ci_low": alo, "ci_high": ahi, "n": n}
    return report


def paired_bootstrap_diff(correct_a: np.ndarray, correct_b: np.ndarray, bootstrap: int = 1000, seed: int = 0,
                          groups: Sequence[str] | None = None) -> dict[str, Any]:
    """``acc(a) - acc(b)`` on the same images with a paired percentile-bootstrap 95% CI.

    Pass the ablated model's correctness as ``a`` and the base model's as ``b`` (so a positive diff means ablation
    helped). Returns ``{diff, ci_low, ci_high, n, acc_a, acc_b, n_a_only, n_b_only, per_group}``; ``n_a_only``
    counts images only ``a`` gets right. With ``groups``, ``per_group[g]`` holds the same for each group.
    """
    a = np.asarray(correct_a).astype(bool).reshape(-1)
    b = np.asarray(correct_b).astype(bool).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"paired comparison needs the same images: {a.shape[0]} vs {b.shape[0]} results")
    if a.shape[0] == 0:
        raise ValueError("paired comparison of an empty set")
    if bootstrap < 0:
        raise ValueError(f"bootstrap must be >= 0; got {bootstrap}")
    rng = np.random.default_rng(seed)

    def one(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
        n = int(a.shape[0])
        cells = np.array([(a & b).sum(), (a & ~b).sum(), (~a & b).sum(), (~a & ~b).sum()], dtype=np.int64)
        diff = float(cells[1] - cells[2]) / n
        boot = None
        if bootstrap:
            counts = rng.multinomial(n, cells / n, size=bootstrap)
            boot = (counts[:, 1] - counts[:, 2]) / n
        lo, hi = _ci(boot)
        return {"diff": diff, "ci_low": lo, "ci_high": hi, "n": n, "acc_a": float(a.mean()),
                "acc_b": float(b.mean()), "n_a_only": int(cells[1]), "n_b_only": int(cells[2])}

    out = one(a, b)
    out["bootstrap"] = int(bootstrap)
    out["per_group"] = {}
    if groups is not None:
        g = np.asarray([str(v) for v in groups], dtype=object)
        if g.shape[0] != a.shape[0]:
            raise ValueError(f"{g.shape[0]} group names but {a.shape[0]} results")
        for name in sorted(set(g.tolist())):
            m = g == name
            out["per_group"][name] = one(a[m], b[m])
    return out
