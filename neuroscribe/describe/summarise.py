"""Summarise a unit's tagged views into a short description (MILAN's idea, without its trained captioner).

MILAN (Hernandez et al., ICLR 2022) picks the description ``d`` of a unit's exemplar set ``E`` that maximises the
pointwise mutual information ``log p(d | E) - lambda * log p(d)``: typical of *this* unit, not of images in
general. Here ``p(d | E)`` and ``p(d)`` are estimated from tagger candidates (:class:`~neuroscribe.describe.tagger.
Candidate`) with a sentence-embedding kernel instead of MILAN's captioning and language models; see
:func:`summarise` for the exact formula. The captioner backend uses it; the offline tagger's descriptions are chosen
against a fixed ImageNet background instead (:mod:`neuroscribe.describe.contrast`). Both embed phrases with
:class:`neuroscribe.text.SentenceEmbedder`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from neuroscribe.describe.tagger import Candidate
from neuroscribe.text import DEFAULT_EMBEDDER, SentenceEmbedder  # noqa: F401 (re-exported)

__all__ = ["DEFAULT_EMBEDDER", "Scored", "SentenceEmbedder", "summarise"]

#: Scores closer than this count as tied (then the phrase decides): far above float noise, far below any real gap.
TIE_TOLERANCE = 1e-6


def _tie_key(score: float) -> float:
    """The score on a grid of :data:`TIE_TOLERANCE`, so float noise cannot reorder tied phrases."""
    return round(float(score) / TIE_TOLERANCE) * TIE_TOLERANCE


def _cosines(emb: np.ndarray) -> np.ndarray:
    """Cosine matrix of unit-norm embeddings, exactly symmetric with exactly 1 on the diagonal.

    BLAS gives ``a.b`` and ``b.a`` (and ``a.a`` vs 1) different last bits; a phrase's score must not depend on
    which side of a product it sat, or ties between symmetric candidates break by float noise."""
    emb = np.asarray(emb, dtype=np.float64)
    cos = emb @ emb.T
    cos = np.clip((cos + cos.T) / 2.0, -1.0, 1.0)
    np.fill_diagonal(cos, 1.0)
    return cos


@dataclass(frozen=True)
class Scored:
    """A description with its contrastive score (higher is better) and in how many of the unit's views it occurs."""

    description: str
    score: float
    support: int


def _unique(candidates: Sequence[Candidate]) -> dict[str, float]:
    """Phrase -> weight (clipped to [0, 1]; a repeated phrase keeps its largest weight)."""
    out: dict[str, float] = {}
    for c in candidates:
        w = float(min(max(c.weight, 0.0), 1.0))
        out[c.phrase] = max(out.get(c.phrase, 0.0), w)
    return out


def summarise(
    candidates: Sequence[Sequence[Candidate]],
    background: Sequence[Candidate] | Sequence[Sequence[Candidate]],
    embedder: SentenceEmbedder,
    top: int = 5,
    alpha: float = 1.0,
    tau: float = 0.1,
    duplicate_cosine: float = 0.8,
) -> list[Scored]:
    """Rank the unit's candidate phrases by how typical they are of its views and atypical of the background.

    Let ``e(x)`` be the unit-norm embedding of phrase ``x`` and ``k(c, x) = exp((cos(e(c), e(x)) - 1) / tau)``
    a similarity kernel (1 for the same phrase, ~e^-2 at cosine 0.8 with the default ``tau=0.1``). Each candidate
    ``x`` of weight ``w_x`` (clipped to [0, 1]) is evidence of strength ``w_x * k(c, x)`` that ``c`` applies.

    * Typicality, a soft "fraction of the unit's V views that show c" (noisy-OR over each view's candidates)::

          T(c) = 1/V * sum_v [1 - prod_{x in view v} (1 - w_x * k(c, x))]

    * Background rate, the weighted mean match to the background candidates, add-one smoothed (one pseudo-candidate
      that matches every phrase, so a phrase unseen in the background is not infinitely surprising and rare
      one-off phrases cannot beat consistent ones; ``W = sum_b w_b``)::

          A(c) = (sum_b w_b * k(c, b) + 1) / (W + 1)

    * Score (PMI-like; ``alpha`` = MILAN's lambda weighs the penalty on generic phrases)::

          score(c) = log T(c) - alpha * log A(c)

    * Per-view background (``background`` given as one candidate list per view -- views of random images or
      units): the rate is on the same scale as ``T``, the smoothed noisy-OR fraction of background views showing
      ``c``, ``A(c) = (sum_b [1 - prod_{x in b} (1 - w_x k(c, x))] + 1) / (B + 2)``, so ``score`` is a PMI
      between "this unit's views" and "any views". Recommended: a flat pool under-rates phrases that occur in
      nearly every view (colours), which then look unit-specific.

    Only phrases occurring among the unit's own candidates are scored. ``support`` counts the views holding ``c``
    or a near-duplicate (cosine > ``duplicate_cosine``). The ``top`` best are returned, skipping any near-duplicate
    of a better one (so "ball" and "balls" do not both appear). Ties break by phrase, so the result is deterministic.
    An empty unit (no candidates at all) gives ``[]``.
    """
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    views = [_unique(v) for v in candidates]
    pool = sorted({p for v in views for p in v})
    if not pool:
        return []
    bg_views = None
    if background and not isinstance(background[0], Candidate):  # one candidate list per background view
        bg_views = [_unique(v) for v in background]
        background = [c for v in background for c in v]
    bg = _unique(background)
    bg_phrases = sorted(bg)
    view_phrases = [sorted(v) for v in views]
    all_phrases = sorted(set(pool) | set(bg_phrases))
    cosine = _cosines(embedder.encode(all_phrases))
    row = {p: i for i, p in enumerate(all_phrases)}
    pool_rows = [row[p] for p in pool]

    def kernel(phrases: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(cosines [len(pool), len(phrases)], kernel values)."""
        if not phrases:
            empty = np.zeros((len(pool), 0))
            return empty, empty
        cos = cosine[np.ix_(pool_rows, [row[p] for p in phrases])]
        return cos, np.exp((cos - 1.0) / tau)

    typical = np.zeros(len(pool))
    support = np.zeros(len(pool), dtype=int)
    for phrases, weights in zip(view_phrases, views):
        if not phrases:
            continue
        cos, k = kernel(phrases)
        w = np.array([weights[p] for p in phrases])
        typical += 1.0 - np.prod(1.0 - np.clip(w[None, :] * k, 0.0, 1.0), axis=1)
        support += (cos.max(axis=1) > duplicate_cosine) | np.isin(pool, phrases)
    typical /= len(views)

    if bg_views is not None:
        # background given per view: the same noisy-OR "fraction of views showing c" as T, add-one smoothed
        hits = np.zeros(len(pool))
        for v in bg_views:
            phrases = sorted(v)
            if phrases:
                _, k = kernel(phrases)
                w = np.array([v[p] for p in phrases])
                hits += 1.0 - np.prod(1.0 - np.clip(w[None, :] * k, 0.0, 1.0), axis=1)
        rate = (hits + 1.0) / (len(bg_views) + 2.0)
    else:
        total = float(sum(bg.values()))
        _, kb = kernel(bg_phrases)
        wb = np.array([bg[p] for p in bg_phrases]) if bg_phrases else np.zeros(0)
        rate = (kb @ wb + 1.0) / (total + 1.0)

    scores = np.log(np.maximum(typical, 1e-12)) - alpha * np.log(rate)
    order = sorted(range(len(pool)), key=lambda i: (-_tie_key(scores[i]), pool[i]))
    chosen: list[int] = []
    for i in order:
        if len(chosen) == top:
            break
        if any(float(cosine[pool_rows[i], pool_rows[j]]) > duplicate_cosine for j in chosen):
            continue
        chosen.append(i)
    return [Scored(pool[i], float(scores[i]), int(support[i])) for i in chosen]
