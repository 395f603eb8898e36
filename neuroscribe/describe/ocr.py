"""Text the tagger reads in a view: RapidOCR lines, each split into words with their own boxes, kept where the unit
fires.

A word counts for a view only when *its own* box overlaps the view's mask (the region where the unit fires on that
exemplar): RapidOCR returns one box per text line, and a line crossing the mask's edge ("KADOSHOP OPEN 24H" with
only "OPEN" inside) must not lend the unit the words outside it. Word boxes are cut from the line's box in
proportion to the characters' positions in the line (RapidOCR's recogniser has no per-character boxes; for a
straight line of text this is within a character or so). :func:`text_phrases` turns the kept words into the
tagger's text candidates.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["MAX_PHRASE_WORDS", "OCRHit", "OCRReader", "normalise_text", "text_phrases", "word_boxes",
           "words_in_mask"]


def mask_2d(mask) -> np.ndarray:
    """``mask`` as a 2-D array (a leading axis of 1 dropped), or a ValueError naming its shape."""
    m = np.asarray(mask)
    if m.ndim == 3 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D [H, W], got shape {m.shape}")
    return m


def _binary_mask(mask: np.ndarray | None, size: tuple[int, int]) -> np.ndarray | None:
    """Boolean ``[H, W]`` mask for an image of PIL ``size`` (W, H).

    Bool/integer masks mean "non-zero = inside"; float masks are thresholded at 0.5. A mask of another shape
    (e.g. a 7x7 activation map) is resized bilinearly to the image first.
    """
    if mask is None:
        return None
    m = mask_2d(mask)
    w, h = size
    if m.dtype == bool or np.issubdtype(m.dtype, np.integer):
        m = (m != 0).astype(np.float32)  # exactly 0/1, so the 0.5 threshold below keeps it as is
    m = m.astype(np.float32)
    if m.shape != (h, w):
        m = np.asarray(Image.fromarray(m).resize((w, h), Image.BILINEAR))
    return m >= 0.5


def _polygon_fraction(poly: Sequence[tuple[float, float]], mask: np.ndarray) -> float:
    """Fraction of the polygon's (rasterised) area that falls inside the boolean mask."""
    canvas = Image.new("1", (mask.shape[1], mask.shape[0]), 0)
    ImageDraw.Draw(canvas).polygon(list(poly), fill=1)
    inside_poly = np.asarray(canvas, dtype=bool)
    area = int(inside_poly.sum())
    return float((inside_poly & mask).sum()) / area if area else 0.0


@dataclass(frozen=True)
class OCRHit:
    """One text line read by OCR. ``box`` is the 4-point polygon ((x, y), ...) in image pixels, clockwise from the
    top-left corner (RapidOCR's order). ``words``: the line's words whose own box overlaps the mask (``None``: no
    mask was given, every word of the line counts)."""

    text: str
    confidence: float
    box: tuple[tuple[float, float], ...]
    in_mask_fraction: float
    words: tuple[str, ...] | None = None


_WORD = re.compile(r"[A-Za-z0-9]+")


def normalise_text(text: str) -> str:
    """Strip; lower-case if the text is only ASCII letters/digits/spaces (others are kept as read)."""
    text = text.strip()
    return text.lower() if re.fullmatch(r"[A-Za-z0-9 ]+", text) else text


def word_boxes(hit: OCRHit) -> list[tuple[str, tuple[tuple[float, float], ...]]]:
    """``(word, polygon)`` for each ASCII word of the line: the slice of the line's box that holds its characters.

    The top and bottom edges of the line's quadrilateral are cut at the word's first and last character offsets
    (as fractions of the line's length), so a word's box follows a slanted line too."""
    n = len(hit.text)
    if n == 0 or len(hit.box) != 4:
        return [(m.group(), hit.box) for m in _WORD.finditer(hit.text)]
    (tl, tr, br, bl) = [np.asarray(p, dtype=np.float64) for p in hit.box]

    def at(a: np.ndarray, b: np.ndarray, f: float) -> tuple[float, float]:
        x, y = a + (b - a) * f
        return float(x), float(y)

    out = []
    for m in _WORD.finditer(hit.text):
        s, e = m.start() / n, m.end() / n
        out.append((m.group(), (at(tl, tr, s), at(tl, tr, e), at(bl, br, e), at(bl, br, s))))
    return out


def words_in_mask(hits: Sequence[OCRHit], binary: np.ndarray | None, min_overlap: float = 0.0) -> list[OCRHit]:
    """The lines whose box overlaps the boolean mask by more than ``min_overlap`` of its area, each with the words
    whose own box does (:func:`word_boxes`); ``None`` keeps every line and word, an empty mask keeps nothing."""
    if binary is None:
        return list(hits)
    if not binary.any():
        return []
    out = []
    for h in hits:
        frac = _polygon_fraction(h.box, binary)
        if frac > min_overlap:
            words = tuple(w for w, poly in word_boxes(h) if _polygon_fraction(poly, binary) > min_overlap)
            out.append(OCRHit(h.text, h.confidence, h.box, frac, words))
    return out


class OCRReader:
    """Lazy wrapper around ``rapidocr_onnxruntime.RapidOCR`` (its ONNX weights ship in the wheel).

    ``min_confidence`` drops low-confidence lines; with a mask, ``min_mask_overlap`` is the fraction of a line's
    (and a word's) box that must lie inside the mask (strictly more than it; 0 = any overlap). ``rapidocr_kwargs``
    go to ``RapidOCR(...)``.
    """

    def __init__(self, min_confidence: float = 0.6, min_mask_overlap: float = 0.0, **rapidocr_kwargs: Any) -> None:
        self.min_confidence, self.min_mask_overlap = float(min_confidence), float(min_mask_overlap)
        self._kwargs, self._engine = rapidocr_kwargs, None

    @property
    def engine(self) -> Any:
        """The underlying RapidOCR engine, loaded on first use."""
        if self._engine is None:
            try:
                from rapidocr_onnxruntime import RapidOCR  # noqa: PLC0415 - optional, heavy
            except ImportError as err:
                raise ImportError(
                    "OCR needs the 'rapidocr-onnxruntime' package: pip install rapidocr-onnxruntime "
                    "(or neuroscribe[offline]); or build the Tagger with ocr=False"
                ) from err
            self._engine = RapidOCR(**self._kwargs)
        return self._engine

    def read(self, img: Image.Image, mask: np.ndarray | None = None) -> list[OCRHit]:
        """Read text lines in ``img``; keep those above ``min_confidence``, and with a mask only the lines and words
        that overlap it (:func:`words_in_mask`)."""
        rgb = img.convert("RGB")
        binary = _binary_mask(mask, rgb.size)
        if binary is not None and not binary.any():
            return []
        result, _ = self.engine(rgb)
        hits: list[OCRHit] = []
        for box, text, score in result or []:
            confidence = float(score)
            text = normalise_text(str(text))
            if confidence < self.min_confidence or not text:
                continue
            hits.append(OCRHit(text, confidence, tuple((float(x), float(y)) for x, y in box), 1.0))
        return words_in_mask(hits, binary, self.min_mask_overlap)


#: A line's words inside the mask (2 up to this many) also make one phrase, "the word french horn".
MAX_PHRASE_WORDS = 4


def text_phrases(hits: Sequence[OCRHit]) -> list[tuple[str, float]]:
    """Phrases for OCR hits: "text", "the word X", "letters", "digits", "number" with their best confidence.

    "text" needs a line overlapping the mask; the others come only from the words inside it (``OCRHit.words``).
    When 2 to :data:`MAX_PHRASE_WORDS` words of one line (each of 2+ letters) are inside, they also make one
    phrase in reading order, "the word french horn": a written name of two words is read as that name (the
    summariser ranks it ahead of its single words when it holds in as many views, see
    :meth:`~neuroscribe.describe.background.Background.ancestors`)."""
    out: dict[str, float] = {}

    def add(phrase: str, weight: float) -> None:
        out[phrase] = max(out.get(phrase, 0.0), weight)

    for hit in hits:
        add("text", hit.confidence)
        named = []
        for word in _WORD.findall(hit.text) if hit.words is None else hit.words:
            word = word.lower()
            if any(ch.isalpha() for ch in word):
                add("letters", hit.confidence)
                if word.isalpha() and len(word) >= 2:
                    add(f"the word {word}", hit.confidence)
                    named.append(word)
            if any(ch.isdigit() for ch in word):
                add("digits", hit.confidence)
                add("number", hit.confidence)
        if 2 <= len(named) <= MAX_PHRASE_WORDS:  # "French horn" is read as one name, not as "french" or "horn"
            add(f"the word {' '.join(named)}", hit.confidence)
    return sorted(out.items(), key=lambda t: (-t[1], t[0]))
