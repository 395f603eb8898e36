"""Offline "tagger": turn one exemplar view of a unit into weighted candidate phrases.

The tagger is the perception half of neuroscribe's offline describer (choosing the words, against the fixed
background of :mod:`neuroscribe.describe.background`, is :mod:`neuroscribe.describe.contrast`'s half). For each
view (a top-activating image, optionally with a mask of the region the unit fires on) it emits :class:`Candidate`
phrases from three fixed sources:

* **ImageNet objects** (``source="label"``/``"hypernym"``): a caller-supplied ImageNet-1k classifier's top labels,
  plus their WordNet hypernyms (golf ball -> "ball", "game equipment"), whose weight is the total probability of
  all classes under that hypernym, so ten terrier breeds at 4% each still give "terrier" at 40%.
* **Text** (``source="text"``): RapidOCR (Latin letters and digits; its recogniser also reads Chinese) -> "text",
  "letters", "the word stop", "digits", "number".
* **Colour** (``source="colour"``): the 11 Berlin-Kay basic colour terms, by nearest centroid in CIELAB
  (:mod:`neuroscribe.describe.colours`); given a probe baseline, only colours unusual for the unit.

What it can see: the 1000 ImageNet-1k object classes and their WordNet ancestors, printed/overlaid text, and coarse
colour. What it cannot see, so never says: textures and patterns (stripes, fur, dots), object parts (eyes, wheels,
legs), scenes and places beyond the few ImageNet scene-like classes, materials (wood, metal), spatial relations
(above, next to), counts, actions and poses, people (ImageNet has almost no person classes), shapes, style, or
anything the classifier confuses. A unit tuned to such a concept gets the nearest ImageNet object/colour instead;
read its descriptions with that in mind (the summariser's scores and support counts help flag weak matches).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import numpy as np
from PIL import Image

from .background import Background
from .colours import (  # noqa: F401 - re-exported: the colour half of the tagger lives in colours.py
    BASIC_COLOURS, colour_baseline, colour_shares, dominant_colours, ranked_colours, srgb_to_lab, unusual_colours,
)
from .ocr import OCRHit, OCRReader, _binary_mask, _polygon_fraction, normalise_text, text_phrases  # noqa: F401
from .wordnet import HYPERNYM_MIN_ZIPF, HYPERNYM_STOP, ImageNetVocabulary, default_vocabulary

__all__ = [
    "BASIC_COLOURS", "HYPERNYM_MIN_ZIPF", "HYPERNYM_STOP", "Candidate", "CandidateSource", "ImageNetVocabulary",
    "OCRHit", "OCRReader", "Tagger", "colour_baseline", "colour_shares", "dominant_colours", "normalise_text",
    "srgb_to_lab", "text_phrases", "unusual_colours",
]

#: The tagger emits label/hypernym/text/colour; "caption" and "phrase" are used by the captioner backend.
CandidateSource = Literal["label", "hypernym", "text", "colour", "caption", "phrase"]


@dataclass(frozen=True)
class Candidate:
    """One phrase a view might be described by; ``weight`` in [0, 1] is how strongly it applies."""

    phrase: str
    source: CandidateSource
    weight: float


# --------------------------------------------------------------------------------------------------- tagger

Classifier = Callable[[list[Image.Image]], Any]


def _to_numpy(x: Any) -> np.ndarray:
    """float64 array from a numpy array or a torch tensor (on any device)."""
    if hasattr(x, "detach"):  # torch.Tensor without importing torch here
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


class Tagger:
    """Candidate phrases for exemplar views from an ImageNet classifier, OCR and colour.

    ``classify(views) -> [N, 1000]`` must return ImageNet-1k *probabilities* (softmax applied, standard class
    order); the caller wires the model and its preprocessing. Per view the tagger emits:

    * up to ``top_labels`` class names with probability >= ``min_prob`` (weight = probability);
    * up to ``max_hypernyms`` WordNet hypernyms within ``hypernym_depth`` informative levels of any class, whose
      summed class probability is >= ``min_prob`` (weight = that sum, capped at 1);
    * OCR text (``ocr=True`` or an :class:`OCRReader`): "text" plus "the word X" for each ASCII word of 2+ letters,
      "letters" if any letter, "digits"/"number" if any digit (weight = best line confidence); masked views only
      count words whose own box overlaps the mask (:mod:`neuroscribe.describe.ocr`);
    * ``colours``: the dominant basic colours of the (masked) view (weight = pixel fraction). With a
      ``colour_baseline`` (the probe set's share of each colour, :meth:`fit_colour_baseline`) and ``groups`` in
      :meth:`tag` (each view's unit) only colours unusual for the view's group are kept, weighted by pixel fraction
      times the share of the group's colour above the probe's (:func:`~neuroscribe.describe.colours.
      unusual_colours`, ``colour_lift``), so a colour common in the probe ("white", "gray") is not what a unit that
      shows nothing specific is called.

    Repeated phrases keep their largest weight. Views are classified in one batch per :meth:`tag` call.
    """

    def __init__(
        self, classify: Classifier, vocabulary: ImageNetVocabulary | None = None, ocr: bool | OCRReader = True,
        colours: bool = True, top_labels: int = 3, min_prob: float = 0.05, hypernym_depth: int = 3,
        max_hypernyms: int = 6, colour_top: int = 2, colour_min_fraction: float = 0.15,
        colour_baseline: np.ndarray | None = None, colour_lift: float = 2.0,
    ) -> None:
        if not callable(classify):
            raise TypeError(f"classify must be a callable list[PIL.Image] -> [N, 1000] probabilities, got {classify!r}")
        self.classify = classify
        self.vocabulary = vocabulary or default_vocabulary()
        self.ocr: OCRReader | None = ocr if isinstance(ocr, OCRReader) else (OCRReader() if ocr else None)
        self.colours = colours
        self.top_labels, self.min_prob = int(top_labels), float(min_prob)
        self.max_hypernyms, self.colour_top = int(max_hypernyms), int(colour_top)
        self.colour_min_fraction = float(colour_min_fraction)
        self.colour_baseline = None if colour_baseline is None else np.asarray(colour_baseline, dtype=np.float64)
        self.colour_lift = float(colour_lift)
        #: The fixed background these phrases are contrasted against (same vocabulary and hypernym depth).
        self.background = Background(self.vocabulary, hypernym_depth)
        # Membership matrix [n_hypernyms, 1000]: hypernym mass of a view = membership @ probabilities.
        self._hyper_names, self._membership = self.background.hypernym_names, self.background.membership

    def fit_colour_baseline(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Set (and return) the probe set's share of each basic colour from whole probe ``images``."""
        self.colour_baseline = colour_baseline(images)
        return self.colour_baseline

    def _colours(self, views: list, masks: list, groups: list | None) -> list[list[tuple[str, float]]]:
        """Per view, its colour candidates: dominant colours, kept where unusual for the view's group."""
        shares = [colour_shares(v, m) for v, m in zip(views, masks)]
        dominant = [ranked_colours(s, self.colour_top, self.colour_min_fraction) for s in shares]
        if self.colour_baseline is None or groups is None:
            return dominant
        unusual = {g: unusual_colours([s for s, h in zip(shares, groups) if h == g], self.colour_baseline,
                                      self.colour_lift, self.colour_min_fraction) for g in set(groups)}
        return [[(n, f * unusual[g][n]) for n, f in d if n in unusual[g]] for d, g in zip(dominant, groups)]

    def tag(
        self, views: Sequence[Image.Image], masks: Sequence[np.ndarray | None] | None = None,
        groups: Sequence[Any] | None = None,
    ) -> list[list[Candidate]]:
        """One candidate list per view (sorted by weight, then phrase); ``masks`` aligns with ``views`` or is None.

        ``groups`` (one hashable per view: its unit) pools views for the colour baseline test, so only colours
        unusual for the unit are named; None = every dominant colour of each view."""
        views = list(views)
        masks = [None] * len(views) if masks is None else list(masks)
        groups = None if groups is None else list(groups)
        if len(masks) != len(views) or (groups is not None and len(groups) != len(views)):
            raise ValueError(f"got {len(views)} views but {len(masks)} masks and "
                             f"{len(views) if groups is None else len(groups)} groups; pass one mask (or None) and "
                             "one group per view")
        if not views:
            return []
        probs = _to_numpy(self.classify([v if v.mode == "RGB" else v.convert("RGB") for v in views]))
        if probs.shape != (len(views), len(self.vocabulary)):
            raise ValueError(
                f"classify returned shape {probs.shape}, expected ({len(views)}, {len(self.vocabulary)}) ImageNet-1k "
                "probabilities (one row per view)"
            )
        if probs.min() < -1e-6 or np.abs(probs.sum(1) - 1).max() > 1e-2:
            raise ValueError("classify must return probabilities (softmax over 1000 classes); rows do not sum to 1")
        hyper_mass = probs @ self._membership.T
        colours = self._colours(views, masks, groups) if self.colours else [[] for _ in views]
        return [self._tag_one(view, mask, p, hm, c) for view, mask, p, hm, c in
                zip(views, masks, probs, hyper_mass, colours)]

    def _tag_one(self, view: Image.Image, mask: np.ndarray | None, p: np.ndarray, hm: np.ndarray,
                 colours: list[tuple[str, float]]) -> list[Candidate]:
        best: dict[str, Candidate] = {}

        def add(phrase: str, source: CandidateSource, weight: float) -> None:
            weight = float(min(max(weight, 0.0), 1.0))
            if phrase not in best or weight > best[phrase].weight:
                best[phrase] = Candidate(phrase, source, weight)

        for i in np.argsort(-p, kind="stable")[: self.top_labels]:
            if p[i] >= self.min_prob:
                add(self.vocabulary.name(int(i)), "label", p[i])
        hyper_order = sorted(np.flatnonzero(hm >= self.min_prob), key=lambda k: (-hm[k], self._hyper_names[k]))
        for k in hyper_order[: self.max_hypernyms]:
            add(self._hyper_names[k], "hypernym", hm[k])
        if self.ocr is not None:
            for phrase, weight in text_phrases(self.ocr.read(view, mask)):
                add(phrase, "text", weight)
        for name, weight in colours:
            add(name, "colour", weight)
        return sorted(best.values(), key=lambda c: (-c.weight, c.phrase))

_default_vocabulary = default_vocabulary  # the name stage.py and older callers import
