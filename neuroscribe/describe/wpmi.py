"""CLIP-Dissect's arithmetic (Oikarinen & Weng, ICLR 2023): the concept vocabulary and soft-WPMI, the score of a
concept for a unit from the image-text similarities of the probe images, weighted by the unit's activation ranks."""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

__all__ = ["SoftWPMI", "default_vocabulary", "load_vocabulary", "rank_weights", "soft_wpmi"]


def default_vocabulary(n: int = 20000) -> list[str]:
    """The ``n`` most common English words (``wordfreq``), kept when alphabetic and >= 3 letters, deduplicated."""
    try:
        from wordfreq import top_n_list
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the default CLIP-Dissect vocabulary needs wordfreq: pip install wordfreq "
                          "(or neuroscribe[offline]), or pass vocabulary=PATH or a list of concepts") from e
    return _dedupe(w for w in top_n_list("en", n) if w.isalpha() and len(w) >= 3)


def _dedupe(words) -> list[str]:
    seen: set[str] = set()
    out = []
    for w in words:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def load_vocabulary(vocabulary: list[str] | str | Path | None = None) -> list[str]:
    """Concepts: ``None`` -> :func:`default_vocabulary`; a path -> one concept per line (blank lines and lines
    starting with ``#`` skipped); a list -> itself. Whitespace is stripped and duplicates dropped (first kept)."""
    if vocabulary is None:
        return default_vocabulary()
    if isinstance(vocabulary, (str, Path)):
        path = Path(vocabulary).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"vocabulary file not found: {path} (expected one concept per line)")
        lines = path.read_text(encoding="utf-8").splitlines()
        words = [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]
    else:
        words = [str(s).strip() for s in vocabulary if str(s).strip()]
    words = _dedupe(words)
    if not words:
        raise ValueError(f"the vocabulary {vocabulary if isinstance(vocabulary, (str, Path)) else '(list)'} "
                         "holds no concepts")
    return words


# ------------------------------------------------------------------------------------------------ the math
class SoftWPMI(NamedTuple):
    """:func:`soft_wpmi`'s result: ``score [U, C]``, ``log_p_given_e [U, C]``, ``log_p [C]``."""

    score: torch.Tensor
    log_p_given_e: torch.Tensor
    log_p: torch.Tensor


def rank_weights(k: int, p_start: float = 0.998, p_end: float = 0.97, dtype=torch.float64) -> torch.Tensor:
    """``w_r = p_start - (r / k) * (p_start - p_end)`` for ``r = 0..k-1``: rank ``r``'s soft membership."""
    return p_start - torch.arange(k, dtype=dtype) / k * (p_start - p_end)


def soft_wpmi(sim: torch.Tensor | np.ndarray, top_ids: torch.Tensor | np.ndarray, *, scale: float = 100.0,
              lam: float = 1.0, a: float = 10.0, p_start: float = 0.998, p_end: float = 0.97,
              min_prob: float = 1e-7, top_k: int | None = None, chunk_elems: int = 2**25) -> SoftWPMI:
    """CLIP-Dissect's soft-WPMI (see the module docstring for the formula).

    ``sim [N, C]``: image-concept cosine similarities; ``top_ids [U, k]``: each unit's top images as rows of
    ``sim``, best first, ``-1`` for none. ``log p(c)`` is taken over all ``U`` rows, so pass every unit of a layer.
    ``top_k`` keeps the first ``top_k`` columns of ``top_ids``. Computed in ``sim``'s dtype on its device,
    ``chunk_elems`` bounding the ``[units, k, C]`` intermediate.
    """
    sim = torch.as_tensor(sim)
    if not torch.is_floating_point(sim):
        sim = sim.float()
    ids = torch.as_tensor(top_ids, dtype=torch.long, device=sim.device)
    if sim.dim() != 2 or ids.dim() != 2:
        raise ValueError(f"sim must be [N, C] and top_ids [U, k]; got {tuple(sim.shape)} and {tuple(ids.shape)}")
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1; got {top_k}")
        ids = ids[:, :top_k]
    n, c = sim.shape
    u, k = ids.shape
    if u == 0 or k == 0:
        raise ValueError(f"soft_wpmi needs at least one unit and one rank; got top_ids of shape {tuple(ids.shape)}")
    if ids.numel() and (int(ids.max()) >= n or int(ids.min()) < -1):
        raise ValueError(f"top_ids must index the {n} rows of sim (or be -1); got values in "
                         f"[{int(ids.min())}, {int(ids.max())}]")
    if not 0.0 <= p_end <= p_start <= 1.0:
        raise ValueError(f"need 0 <= p_end <= p_start <= 1; got p_start={p_start}, p_end={p_end}")
    probs = torch.softmax(scale * sim, dim=1)                               # P [N, C]
    w = rank_weights(k, p_start, p_end, sim.dtype).to(sim.device)           # [k]
    valid = ids >= 0
    wu = torch.where(valid, w[None, :], torch.zeros((), dtype=sim.dtype, device=sim.device))  # [U, k]
    safe = ids.clamp(min=0)
    log_pe = torch.empty(u, c, dtype=sim.dtype, device=sim.device)
    step = max(1, chunk_elems // max(1, k * c))
    for s in range(0, u, step):
        p = probs[safe[s:s + step]]                                          # [b, k, C]
        wb = wu[s:s + step, :, None]
        log_pe[s:s + step] = torch.log(1.0 - wb + wb * p + min_prob).sum(1)
    log_p = (torch.logsumexp(a * log_pe, dim=0) - math.log(u)) / a
    return SoftWPMI(log_pe - lam * log_p[None, :], log_pe, log_p)


# ------------------------------------------------------------------------------------------------ loading
