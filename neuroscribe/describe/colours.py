"""Basic colour names of a view, and which of them are unusual for a probe set.

Every pixel takes the Berlin-Kay basic colour term of its nearest centroid in CIELAB (:func:`colour_shares`).
:func:`dominant_colours` lists a view's main colours. A colour word says something about a unit only where the
colour is unusual: most photos are partly white, gray, black or brown, so a unit whose masks merely land on such
pixels "sees nothing specific" in colour terms. :func:`unusual_colours` compares a unit's share of each colour
(the mean over its views' masks) with the probe set's (the mean over whole probe images, :func:`colour_baseline`)
and keeps a colour only where the unit's share is at least ``lift`` times the probe's (and at least
``min_fraction``); its weight then is the share above the baseline, ``1 - baseline / share`` of it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
from PIL import Image

from .ocr import _binary_mask
from .views import pixel_key, shrunk

__all__ = ["BASIC_COLOURS", "COLOUR_NAMES", "colour_baseline", "colour_shares", "dominant_colours",
           "ranked_colours", "srgb_to_lab", "unusual_colours"]


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


COLOUR_NAMES = list(BASIC_COLOURS)
_CENTROID_TERM = np.array([k for k, n in enumerate(COLOUR_NAMES) for _ in BASIC_COLOURS[n]])
_CENTROID_LAB = srgb_to_lab(np.array([c for n in COLOUR_NAMES for c in BASIC_COLOURS[n]], dtype=np.float64))


_TERMS: "OrderedDict[str, np.ndarray]" = OrderedDict()  # image digest -> per-pixel colour terms (small image)
_TERMS_SIZE = 8192  # uint8 terms of 96 px images: ~75 MB at most; a probe of 2,000 images is computed once
_TERMS_LOCK = threading.Lock()


def _nearest_term(lab: np.ndarray) -> np.ndarray:
    """The colour term (uint8 index in :data:`COLOUR_NAMES`) of each ``[N, 3]`` CIELAB row's nearest centroid.

    One centroid at a time (``[N]`` temporaries, not ``[N, 24, 3]``: ~3x faster), with the same float64 sums as
    ``((lab - c) ** 2).sum(-1)`` and the first centroid kept on a tie, as ``argmin`` does: the same term for every
    one of the 16.7 million sRGB colours (checked once, exhaustively)."""
    best = np.full(len(lab), np.inf)
    idx = np.zeros(len(lab), dtype=np.intp)
    for k, (c0, c1, c2) in enumerate(_CENTROID_LAB):
        d0, d1, d2 = lab[:, 0] - c0, lab[:, 1] - c1, lab[:, 2] - c2
        d = d0 * d0 + d1 * d1 + d2 * d2
        closer = d < best
        best = np.where(closer, d, best)
        idx[closer] = k
    return _CENTROID_TERM.astype(np.uint8)[idx]


def _pixel_terms(rgb: Image.Image) -> np.ndarray:
    """``[H, W]`` index (in :data:`COLOUR_NAMES`) of each pixel's nearest colour term, cached per distinct image:
    the views of a layer's units share a few probe images, each seen under many masks."""
    key = pixel_key(rgb)
    with _TERMS_LOCK:
        terms = _TERMS.get(key)
        if terms is not None:
            _TERMS.move_to_end(key)
            return terms
    terms = _nearest_term(srgb_to_lab(np.asarray(rgb, dtype=np.float64).reshape(-1, 3)))
    terms = terms.reshape(rgb.height, rgb.width)
    with _TERMS_LOCK:
        _TERMS[key] = terms
        while len(_TERMS) > _TERMS_SIZE:
            _TERMS.popitem(last=False)
    return terms


def colour_shares(img: Image.Image, mask: np.ndarray | None = None, max_side: int = 96) -> np.ndarray | None:
    """Fraction of the (masked) pixels taking each basic colour term, in :data:`COLOUR_NAMES` order.

    The image is first shrunk to at most ``max_side`` pixels a side (the mask with it). None for an empty mask.
    """
    binary = _binary_mask(mask, img.size)
    scale = max_side / max(img.size)
    small = img.size
    if scale < 1:
        small = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    rgb = shrunk(img, small, Image.BILINEAR)  # one shrunk copy per image object, whatever the mask
    if small != img.size and binary is not None:
        binary = np.asarray(Image.fromarray(binary).resize(small, Image.NEAREST))
    terms = _pixel_terms(rgb).reshape(-1)
    if binary is not None:
        terms = terms[binary.reshape(-1)]
    if len(terms) == 0:
        return None
    return np.bincount(terms, minlength=len(COLOUR_NAMES)) / len(terms)


def dominant_colours(
    img: Image.Image, mask: np.ndarray | None = None, top: int = 2, min_fraction: float = 0.15, max_side: int = 96
) -> list[tuple[str, float]]:
    """The ``top`` basic colour names covering at least ``min_fraction`` of the (masked) pixels.

    Every pixel takes the term of its nearest :data:`BASIC_COLOURS` centroid in CIELAB; the image is first shrunk
    to at most ``max_side`` pixels a side (the mask with it). Returns ``[(name, fraction), ...]`` by fraction, ties
    by name; an empty mask gives ``[]``.
    """
    return ranked_colours(colour_shares(img, mask, max_side), top, min_fraction)


def ranked_colours(shares: np.ndarray | None, top: int = 2, min_fraction: float = 0.15) -> list[tuple[str, float]]:
    """:func:`dominant_colours` of precomputed :func:`colour_shares`."""
    if shares is None:
        return []
    ranked = sorted(((float(f), n) for n, f in zip(COLOUR_NAMES, shares)), key=lambda t: (-t[0], t[1]))
    return [(n, f) for f, n in ranked[:top] if f >= min_fraction]


def colour_baseline(images: Sequence[Image.Image], max_side: int = 96) -> np.ndarray:
    """The probe set's share of each basic colour: the mean of :func:`colour_shares` over whole images."""
    shares = [colour_shares(im, None, max_side) for im in images]
    if not shares:
        raise ValueError("colour_baseline needs at least one image")
    return np.mean(shares, axis=0)


def unusual_colours(shares: Sequence[np.ndarray | None], baseline: np.ndarray, lift: float = 2.0,
                    min_fraction: float = 0.15) -> dict[str, float]:
    """``{colour: weight}`` of the colours unusual for a unit whose views have colour ``shares`` (None: an empty
    mask, skipped): its mean share ``s`` is at least ``min_fraction`` and at least ``lift`` times the probe's
    ``baseline``; weight ``1 - baseline / s``, how much of the share is above the probe's."""
    if lift < 1:
        raise ValueError(f"colour lift must be >= 1 (a share at least as large as the probe's); got {lift}")
    seen = [s for s in shares if s is not None]
    if not seen:
        return {}
    unit = np.mean(seen, axis=0)
    base = np.asarray(baseline, dtype=np.float64)
    keep = (unit >= min_fraction) & (unit >= lift * base)
    return {COLOUR_NAMES[k]: float(1.0 - base[k] / unit[k]) for k in np.flatnonzero(keep)}
