"""MILAN's stronger edit, reported separately: after ablating units, re-fit only the final linear layer on
training data (a multinomial logistic regression on the ablated model's penultimate features, as MAIA does on
the kept units). The ablation stays in place; only the last layer's weights and bias change."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
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
