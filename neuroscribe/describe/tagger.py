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
* **Colour** (``source="colour"``): the 11 Berlin-Kay basic colour terms, by nearest centroid in CIELAB.

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
from .ocr import OCRHit, OCRReader, _binary_mask, _polygon_fraction, normalise_text, text_phrases  # noqa: F401
from .wordnet import HYPERNYM_MIN_ZIPF, HYPERNYM_STOP, ImageNetVocabulary, default_vocabulary

__all__ = [
    "BASIC_COLOURS", "HYPERNYM_MIN_ZIPF", "HYPERNYM_STOP", "Candidate", "CandidateSource", "ImageNetVocabulary",
    "OCRHit", "OCRReader", "Tagger", "dominant_colours", "normalise_text", "srgb_to_lab", "text_phrases",
]

#: The tagger emits label/hypernym/text/colour; "caption" and "phrase" are used by the captioner backend.
CandidateSource = Literal["label", "hypernym", "text", "colour", "caption", "phrase"]


@dataclass(frozen=True)
class Candidate:
    """One phrase a view might be described by; ``weight`` in [0, 1] is how strongly it applies."""

    phrase: str
    source: CandidateSource
    weight: float


# --------------------------------------------------------------------------------------------------- colour

#: Berlin & Kay's 11 basic colour terms, each with one or more exemplar sRGB centroids (a mid-saturation typical
#: value, plus light/dark variants where one centroid alone would lose them to a neighbour in CIELAB: navy and sky
#: blue stay "blue", tan stays "brown", dark/light gray stay "gray"). A pixel takes the term of its nearest centroid.
BASIC_COLOURS: dict[str, tuple[tuple[int, int, int], ...]] = {
    "black": ((20, 20, 20),),
    "white": ((245, 245, 245),),
    "gray": ((135, 135, 135), (85, 85, 85), (190, 190, 190)),
    "red": ((210, 30, 35), (140, 15, 20)),
    "orange": ((245, 140, 20),),
    "yellow": ((250, 225, 30), (240, 230, 140)),
    "green": ((50, 150, 50), (0, 95, 0), (140, 205, 100)),
    "blue": ((30, 80, 210), (20, 30, 120), (110, 160, 225), (140, 205, 235)),
    "purple": ((120, 40, 150), (175, 110, 200)),
    "pink": ((245, 150, 190), (255, 105, 180)),
    "brown": ((120, 75, 35), (190, 150, 100), (75, 45, 25)),
}


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """Convert sRGB values in [0, 255] (shape ``[..., 3]``) to CIELAB (D65 white point)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375],
                  [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = linear @ m.T / np.array([0.95047, 1.0, 1.08883])
    eps, kappa = 216 / 24389, 24389 / 27
    f = np.where(xyz > eps, np.cbrt(xyz), (kappa * xyz + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


_COLOUR_NAMES = list(BASIC_COLOURS)
_CENTROID_TERM = np.array([k for k, n in enumerate(_COLOUR_NAMES) for _ in BASIC_COLOURS[n]])
_CENTROID_LAB = srgb_to_lab(np.array([c for n in _COLOUR_NAMES for c in BASIC_COLOURS[n]], dtype=np.float64))


def dominant_colours(
    img: Image.Image, mask: np.ndarray | None = None, top: int = 2, min_fraction: float = 0.15, max_side: int = 96
) -> list[tuple[str, float]]:
    """The ``top`` basic colour names covering at least ``min_fraction`` of the (masked) pixels.

    Every pixel takes the term of its nearest :data:`BASIC_COLOURS` centroid in CIELAB; the image is first shrunk
    to at most ``max_side`` pixels a side (the mask with it). Returns ``[(name, fraction), ...]`` by fraction, ties
    by name; an empty mask gives ``[]``.
    """
    rgb = img.convert("RGB")
    binary = _binary_mask(mask, rgb.size)
    scale = max_side / max(rgb.size)
    if scale < 1:
        small = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        rgb = rgb.resize(small, Image.BILINEAR)
        if binary is not None:
            binary = np.asarray(Image.fromarray(binary).resize(small, Image.NEAREST))
    pixels = np.asarray(rgb, dtype=np.float64).reshape(-1, 3)
    if binary is not None:
        pixels = pixels[binary.reshape(-1)]
    if len(pixels) == 0:
        return []
    lab = srgb_to_lab(pixels)
    nearest = _CENTROID_TERM[np.argmin(((lab[:, None, :] - _CENTROID_LAB[None]) ** 2).sum(-1), axis=1)]
    fractions = np.bincount(nearest, minlength=len(_COLOUR_NAMES)) / len(pixels)
    ranked = sorted(((float(f), n) for n, f in zip(_COLOUR_NAMES, fractions)), key=lambda t: (-t[0], t[1]))
    return [(n, f) for f, n in ranked[:top] if f >= min_fraction]


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
    * ``colours``: the dominant basic colours of the (masked) view (weight = pixel fraction).

    Repeated phrases keep their largest weight. Views are classified in one batch per :meth:`tag` call.
    """

    def __init__(
        self, classify: Classifier, vocabulary: ImageNetVocabulary | None = None, ocr: bool | OCRReader = True,
        colours: bool = True, top_labels: int = 3, min_prob: float = 0.05, hypernym_depth: int = 3,
        max_hypernyms: int = 6, colour_top: int = 2, colour_min_fraction: float = 0.15,
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
        #: The fixed background these phrases are contrasted against (same vocabulary and hypernym depth).
        self.background = Background(self.vocabulary, hypernym_depth)
        # Membership matrix [n_hypernyms, 1000]: hypernym mass of a view = membership @ probabilities.
        self._hyper_names, self._membership = self.background.hypernym_names, self.background.membership

    def tag(
        self, views: Sequence[Image.Image], masks: Sequence[np.ndarray | None] | None = None
    ) -> list[list[Candidate]]:
        """One candidate list per view (sorted by weight, then phrase); ``masks`` aligns with ``views`` or is None."""
        views = list(views)
        masks = [None] * len(views) if masks is None else list(masks)
        if len(masks) != len(views):
            raise ValueError(f"got {len(views)} views but {len(masks)} masks; pass one mask (or None) per view")
        if not views:
            return []
        probs = _to_numpy(self.classify([v.convert("RGB") for v in views]))
        if probs.shape != (len(views), len(self.vocabulary)):
            raise ValueError(
                f"classify returned shape {probs.shape}, expected ({len(views)}, {len(self.vocabulary)}) ImageNet-1k "
                "probabilities (one row per view)"
            )
        if probs.min() < -1e-6 or np.abs(probs.sum(1) - 1).max() > 1e-2:
            raise ValueError("classify must return probabilities (softmax over 1000 classes); rows do not sum to 1")
        hyper_mass = probs @ self._membership.T
        return [self._tag_one(view, mask, p, hm) for view, mask, p, hm in zip(views, masks, probs, hyper_mass)]

    def _tag_one(self, view: Image.Image, mask: np.ndarray | None, p: np.ndarray, hm: np.ndarray) -> list[Candidate]:
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
        if self.colours:
            for name, fraction in dominant_colours(view, mask, self.colour_top, self.colour_min_fraction):
                add(name, "colour", fraction)
        return sorted(best.values(), key=lambda c: (-c.weight, c.phrase))

_default_vocabulary = default_vocabulary  # the name stage.py and older callers import
