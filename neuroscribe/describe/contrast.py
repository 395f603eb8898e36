"""Pick a unit's description from its tagged views by contrast with a fixed background (the offline describer).

Every score here is on one scale, comparable across units, layers and models: **nats of evidence per view against
a random ImageNet photo**. For a phrase ``c`` (after OCR fragments are merged, :func:`merge_fragments`):

* typicality ``T(c)`` = the mean over the unit's ``V`` views of the tagger's weight for ``c`` (0 where a view lacks
  it): a soft "fraction of the unit's views that show ``c``";
* background rate ``P0(c)`` = the same quantity on a view of a random ImageNet photo
  (:meth:`~neuroscribe.describe.background.Background.rate`: 1/1000 for a class, the share of classes under a
  hypernym, measured rates for text and colours). It is fixed: it never depends on the probe set, the layer or
  the other units;
* ``pmi(c) = log T(c) - log P0(c)``: how many nats more often the unit's views show ``c`` than photos in general;
* **score** ``s(c) = T(c) * (log T(c) - alpha * log P0(c))`` (``alpha = 1``: ``T * pmi``), the evidence for ``c``
  per view. Weighing the PMI by typicality keeps a word read once in fifteen views (huge PMI, tiny ``T``) and a
  breed seen in a fifth of a dog unit's views below what holds in most views.

Scale: 0 = no more typical of the unit than of photos in general, negative = rarer. A class seen with certainty
in every view scores ``log 1000 = 6.9``; "dog" in every view 2.4; "text" in every view ``-log 0.059 = 2.8``; a
class in half the views 3.1; one word read in every view at OCR confidence 0.9 10.9, read once in 15 views 0.6.

Specific before general, explicitly: a phrase ``d`` more specific than ``c`` (a class under a WordNet hypernym, a
word under "letters"/"text", see :meth:`~neuroscribe.describe.background.Background.ancestors`) that carries at
least :data:`SPECIFIC_SHARE` (half) of ``c``'s typicality, ``T(d) >= SPECIFIC_SHARE * T(c)``, ranks ahead of ``c``
whatever their scores: the unit's views show mostly that kind of ``c``, so golf balls are "golf ball", not "ball".
Half, not "all but a little", because the tagger's hypernym weight is the summed probability of every class under
it, so the classifier's confusions among sibling classes (English springer / Welsh springer / cocker spaniel; garbage
truck / trailer truck / moving van) lower the specific word's typicality though the unit is specific. A phrase that
is a minority of its hypernym does not win this way (a unit for all dogs, a breed in each fifth of its views, stays
"dog"). The reported score stays the phrase's own ``s(d)``.

One view is not a pattern: a phrase seen in a single view of a unit with more views ranks after every phrase seen
in two or more (with few exemplars, ``record.k = 5``, one confident class in one view is a fifth of the unit and
would otherwise beat what all views share). Ties break by specificity, then phrase, so the result is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from ..text import SentenceEmbedder
from .summarise import TIE_TOLERANCE, _cosines, _tie_key
from .tagger import Candidate

__all__ = ["FRAGMENT_MIN_LETTERS", "SPECIFIC_SHARE", "Contrasted", "contrast", "merge_fragments"]

#: A phrase at least this share as typical as a more general one it falls under ranks ahead of it: with 0.5, when
#: it carries the majority of the general phrase's weight in the unit's views (see the module docstring).
SPECIFIC_SHARE: float = 0.5

#: OCR fragments shorter than this stay separate words ("on" is inside half of all words).
FRAGMENT_MIN_LETTERS: int = 3

_WORD = "the word "


class BackgroundRates(Protocol):
    def rate(self, phrase: str) -> float: ...

    def ancestors(self, phrase: str) -> frozenset[str]: ...


@dataclass(frozen=True)
class Contrasted:
    """A description with its score (nats per view, see the module docstring), typicality ``T``, ``pmi`` (nats)
    and ``support`` (how many of the unit's views show it)."""

    description: str
    score: float
    support: int
    typicality: float
    pmi: float


def merge_fragments(views: Sequence[Sequence[Candidate]]) -> list[list[Candidate]]:
    """One unit's views with OCR fragments counted towards the longer word they are part of.

    "the word X" becomes "the word Y" when X (at least :data:`FRAGMENT_MIN_LETTERS` letters) is a substring of a
    longer word Y read in any of the unit's views ("eng", "engl" -> "english"), so one word read in pieces across
    exemplars adds up instead of competing. Y is the longest word containing X, ties by the number of views
    reading it, then alphabetically. A view keeps the largest weight of the phrases merged into one."""
    counts: dict[str, int] = {}
    for v in views:  # single words only: a phrase of several ("the word french horn") is not a longer spelling
        for w in {c.phrase[len(_WORD):] for c in v if c.phrase.startswith(_WORD)}:
            if " " not in w:
                counts[w] = counts.get(w, 0) + 1
    target = {}
    for w in counts:
        longer = [y for y in counts if len(y) > len(w) and w in y] if len(w) >= FRAGMENT_MIN_LETTERS else []
        target[w] = min(longer, key=lambda y: (-len(y), -counts[y], y)) if longer else w
    out = []
    for v in views:
        best: dict[str, Candidate] = {}
        for c in v:
            if c.phrase[len(_WORD):] in target and c.phrase.startswith(_WORD):
                c = Candidate(_WORD + target[c.phrase[len(_WORD):]], c.source, c.weight)
            if c.phrase not in best or c.weight > best[c.phrase].weight:
                best[c.phrase] = c
        out.append(sorted(best.values(), key=lambda c: (-c.weight, c.phrase)))
    return out


def _typicality(views: Sequence[Sequence[Candidate]]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(phrases sorted, T per phrase, support per phrase); weights clipped to [0, 1], a view's repeats keep the max."""
    per_view = []
    for v in views:
        w: dict[str, float] = {}
        for c in v:
            w[c.phrase] = max(w.get(c.phrase, 0.0), float(min(max(c.weight, 0.0), 1.0)))
        per_view.append(w)
    pool = sorted({p for w in per_view for p in w if w[p] > 0})
    total = np.array([sum(w.get(p, 0.0) for w in per_view) for p in pool])
    support = np.array([sum(w.get(p, 0.0) > 0 for w in per_view) for p in pool], dtype=int)
    return pool, total / max(len(views), 1), support


def _rank(pool: list[str], typical: np.ndarray, scores: np.ndarray, repeated: np.ndarray,
          background: BackgroundRates) -> list[int]:
    """Indices of ``pool`` best first: phrases seen in more than one view (``repeated``) first, then by score, except
    that a phrase at least :data:`SPECIFIC_SHARE` as typical as a more general phrase (``T(d) >= SPECIFIC_SHARE *
    T(c)``) takes that phrase's score for ranking and goes ahead of it on the tie (more ancestors first)."""
    at = {p: i for i, p in enumerate(pool)}
    above = [background.ancestors(p) for p in pool]
    key = scores.copy()
    for i, anc in enumerate(above):
        for c in anc & at.keys():
            j = at[c]
            if typical[i] >= SPECIFIC_SHARE * typical[j] - TIE_TOLERANCE:
                key[i] = max(key[i], scores[j])
    return sorted(range(len(pool)), key=lambda i: (not repeated[i], -_tie_key(key[i]), -len(above[i]), pool[i]))


def contrast(
    candidates: Sequence[Sequence[Candidate]],
    background: BackgroundRates,
    embedder: SentenceEmbedder | None = None,
    top: int = 5,
    alpha: float = 1.0,
    duplicate_cosine: float = 0.8,
) -> list[Contrasted]:
    """Rank the unit's phrases (one candidate list per view) by their score against the fixed ``background``.

    Returns the ``top`` best (see the module docstring for the score and the ranking); with an ``embedder``, a
    phrase whose sentence embedding is within ``duplicate_cosine`` of a better-ranked one is skipped ("stop sign"
    after "street sign"). An empty unit (no candidates at all) gives ``[]``."""
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    pool, typical, support = _typicality(merge_fragments(candidates))
    if not pool:
        return []
    rate = np.array([background.rate(p) for p in pool])
    pmi = np.log(typical) - np.log(rate)
    scores = typical * (np.log(typical) - alpha * np.log(rate))
    order = _rank(pool, typical, scores, support >= min(2, len(candidates)), background)
    cosine = _cosines(embedder.encode(pool)) if embedder is not None and len(pool) > 1 else None
    chosen: list[int] = []
    for i in order:
        if len(chosen) == top:
            break
        if cosine is not None and any(cosine[i, j] > duplicate_cosine for j in chosen):
            continue
        chosen.append(i)
    return [Contrasted(pool[i], float(scores[i]), int(support[i]), float(typical[i]), float(pmi[i])) for i in chosen]
