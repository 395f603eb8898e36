"""The interventions of verification by experiment (:mod:`.verify`): a description's words become an edit.

What MAIA does with an agent, as a small registry (:data:`INTERVENTIONS`; a new kind is one function that turns a
description into an :class:`Intervention`, or None when the words are not its kind). The first kind that accepts
the description is used:

* ``text`` -- "the word X": X is rendered (a font, size, colour and place drawn per image from the verifier's own
  seeded choices, never the study's cue); the control renders another common English word of the same length with
  the same choices. "text", "letters", "writing", "number", ...: common words (digits for "number"/"digits") are
  rendered; the control is the same drawing blurred until unreadable (same place, ink and colour; the blur also
  softens the strokes, so a plain contrast detector passes as "text"). A unit whose "the word X" is not confirmed
  is then tested as "text" (its target becomes "text"; ``word_effect``, ``word_auc``, ``word_response`` keep the
  word's figures): the words still name text, just not that one word.
* ``colour`` -- a basic colour term in the description: a patch of that colour (a third to a half of the side, at
  a random place); the control is the same patch in another basic colour.
* ``object`` -- any other description shared by at least one *other* unit: crops of that unit's exemplars under
  its mask are pasted in (scaled to 35-55 % of the side); the control pastes crops of units described otherwise.
  The units of one description form two folds, each shown the other's crops, and no crop of an image among the
  unit's own exemplars is used. A description no other unit has cannot be verified this way (``unverifiable``).
  The crops come from the probe: on a cued probe they can carry the cue, so an object verdict says that units
  labelled alike drive each other, not that the label is true.
"""

from __future__ import annotations

import random
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFilter

from ..datasets.cues import DEFAULT_FONT, load_font
from .tagger import BASIC_COLOURS

__all__ = ["INTERVENTIONS", "Intervention", "Pools", "intervention_for", "normalise", "register"]

TEXT_WORDS = {"text", "texts", "word", "words", "letter", "letters", "writing", "written", "caption", "label",
              "sign", "font", "number", "numbers", "digit", "digits", "lettering", "inscription"}
_DIGIT_WORDS = {"number", "numbers", "digit", "digits"}
_WORD_RE = re.compile(r"^the word\s+\"?([A-Za-z0-9'-]+(?: [A-Za-z0-9'-]+)*)\"?$")  # "the word french horn" too
_FONTS = [p for p in (DEFAULT_FONT, DEFAULT_FONT.with_name("DejaVuSans-Bold.ttf"),
                      DEFAULT_FONT.with_name("DejaVuSerif.ttf"), DEFAULT_FONT.with_name("DejaVuSansMono.ttf"))
          if p.is_file()]
_INK = [(255, 255, 255), (0, 0, 0), (220, 30, 30), (250, 220, 40), (30, 60, 200)]
UnitKey = tuple[str, int]


@dataclass
class Intervention:
    """An edit named by a description: ``treat`` and ``control`` take (image, rng) and return the edited copy (which
    may be shared with other calls: never draw on it); both are called with equally seeded rngs, so they share every
    choice but the thing tested."""

    kind: str
    target: str
    key: str  # interventions with one key draw alike (one seeded rng per image) and share their forward passes
    treat: Callable[[Image.Image, random.Random], Image.Image]
    control: Callable[[Image.Image, random.Random], Image.Image]
    variant: tuple = ()  # within one key, interventions of one variant make identical images


@dataclass
class Pools:
    """What interventions may draw on besides the words: common words, exemplar crops of units by description
    (``crops[description] = [(unit, crop, image id), ...]``) and each unit's own exemplar image ids (``own``),
    which are never pasted for it."""

    words: list[str] = field(default_factory=list)
    crops: dict[str, list[tuple[UnitKey, Image.Image, int]]] = field(default_factory=dict)
    own: dict[UnitKey, set[int]] = field(default_factory=dict)
    #: the last pasted edits by (image, crop, size, place), holding both: the units of one description redraw the
    #: same edits (one object each, so its pixel key is computed once too)
    pasted: OrderedDict = field(default_factory=OrderedDict, repr=False, compare=False)

    def paste(self, img: Image.Image, crop: Image.Image, rng: random.Random, keep: int = 512) -> Image.Image:
        """``img`` with ``crop`` pasted at 35-55 % of its side, at a place drawn from ``rng`` (memoised)."""
        w, h = img.size
        side = int(min(w, h) * rng.uniform(0.35, 0.55))
        x, y = rng.randint(0, w - side), rng.randint(0, h - side)
        key = (id(img), id(crop), side, x, y)
        hit = self.pasted.get(key)
        if hit is not None:
            self.pasted.move_to_end(key)
            return hit[2]
        out = img.convert("RGB")
        out = out.copy() if out is img else out
        out.paste(crop.convert("RGB").resize((side, side), Image.Resampling.BILINEAR), (x, y))
        self.pasted[key] = (img, crop, out)  # the sources pinned: their ids stay theirs while the entry lives
        while len(self.pasted) > keep:
            self.pasted.popitem(last=False)
        return out


INTERVENTIONS: dict[str, Callable[[str, UnitKey, Pools], Intervention | None]] = {}


def register(kind: str):
    """Decorator: add an intervention kind (``fn(description, unit, pools) -> Intervention | None``)."""
    def add(fn):
        INTERVENTIONS[kind] = fn
        return fn
    return add


def normalise(description: str) -> str:
    """The form interventions read (and crop pools are keyed by): lower case, single spaces."""
    return " ".join(str(description).lower().split())


def intervention_for(description: str, unit: UnitKey, pools: Pools, kinds: Sequence[str] | None = None):
    """The first registered kind (of ``kinds``, default all) that turns ``description`` into an intervention."""
    text = normalise(description)
    for kind, make in INTERVENTIONS.items():
        if kinds is None or kind in kinds:
            iv = make(text, unit, pools)
            if iv is not None:
                return iv
    return None


# ------------------------------------------------------------------------------------------------ the kinds
def _draw_words(img: Image.Image, words: str, rng: random.Random, blur: bool = False) -> Image.Image:
    img = img.convert("RGB").copy()
    w, h = img.size
    font_path = str(rng.choice(_FONTS)) if _FONTS else None
    px = max(8, int(h * rng.uniform(0.12, 0.22)))
    ink = rng.choice(_INK)
    outline = (0, 0, 0) if sum(ink) > 380 else (255, 255, 255)
    font = load_font(font_path, px)
    draw = ImageDraw.Draw(img)
    while True:
        l, t, r, b = draw.textbbox((0, 0), words, font=font, stroke_width=max(1, px // 12))
        if r - l <= 0.9 * w or px <= 8:
            break
        px = max(8, int(px * 0.85))
        font = load_font(font_path, px)
    x = int(rng.uniform(0, max(1, w - (r - l)))) - l
    y = int(rng.uniform(0, max(1, h - (b - t)))) - t
    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    ImageDraw.Draw(layer).text((x, y), words, font=font, fill=ink + (255,), stroke_width=max(1, px // 12),
                               stroke_fill=outline + (255,))
    if blur:
        layer = layer.filter(ImageFilter.GaussianBlur(radius=px * 0.6))
    img.paste(layer, (0, 0), layer)
    return img


def _same_length_word(word: str, pool: Sequence[str], rng: random.Random) -> str:
    same = [w for w in pool if len(w) == len(word) and w != word.lower()]
    near = same or [w for w in pool if abs(len(w) - len(word)) <= 1 and w != word.lower()] or ["house"]
    return rng.choice(near)


@register("text")
def _text(desc: str, unit: UnitKey, pools: Pools) -> Intervention | None:
    m = _WORD_RE.match(desc)
    if m:
        word = m.group(1)

        def treat_word(im, rng):
            rng.random()  # the control's choice of word, drawn here too so both are drawn alike
            return _draw_words(im, word, rng)

        def control_word(im, rng):  # each word of a phrase replaced by a common word of its length
            pick = random.Random(rng.random())
            return _draw_words(im, " ".join(_same_length_word(w, pools.words, pick) for w in word.split()), rng)
        return Intervention("text", f"the word {word}", f"word:{word.lower()}", treat_word, control_word)
    tokens = set(re.findall(r"[a-z]+", desc))
    if not tokens & TEXT_WORDS:
        return None
    digits = bool(tokens & _DIGIT_WORDS)

    def words(rng: random.Random) -> str:
        if digits:
            return str(rng.randint(10, 99999))
        return " ".join(rng.choice(pools.words or ["open"]) for _ in range(rng.randint(1, 2)))

    def treat(im, rng):
        return _draw_words(im, words(random.Random(rng.random())), rng)

    def control(im, rng):
        return _draw_words(im, words(random.Random(rng.random())), rng, blur=True)
    return Intervention("text", "digits" if digits else "text", "digits" if digits else "text", treat, control)


_COLOUR_ALIASES = {"grey": "gray"}


def _patch(img: Image.Image, rgb: tuple[int, int, int], rng: random.Random) -> Image.Image:
    img = img.convert("RGB").copy()
    w, h = img.size
    side = int(min(w, h) * rng.uniform(0.33, 0.5))
    x, y = rng.randint(0, w - side), rng.randint(0, h - side)
    ImageDraw.Draw(img).rectangle((x, y, x + side - 1, y + side - 1), fill=rgb)
    return img


@register("colour")
def _colour(desc: str, unit: UnitKey, pools: Pools) -> Intervention | None:
    names = [_COLOUR_ALIASES.get(t, t) for t in re.findall(r"[a-z]+", desc)]
    hit = next((n for n in names if n in BASIC_COLOURS), None)
    if hit is None:
        return None
    others = sorted(c for c in BASIC_COLOURS if c != hit)

    def treat(im, rng):
        rng.random()  # the control's choice of colour, drawn here too so both patches land alike
        return _patch(im, BASIC_COLOURS[hit][0], rng)

    def control(im, rng):
        other = others[int(rng.random() * len(others))]
        return _patch(im, BASIC_COLOURS[other][0], rng)
    return Intervention("colour", hit, f"colour:{hit}", treat, control)


@register("object")
def _object(desc: str, unit: UnitKey, pools: Pools) -> Intervention | None:
    items = pools.crops.get(desc, [])
    members = sorted({u for u, _, _ in items})
    # two folds of the units sharing the description: a unit is shown the other fold's crops, never its own, nor a
    # crop of one of its own exemplar images. Each image draws from the whole pool (one draw for the fold); only where
    # that crop is of the unit's own images is another drawn, so a fold's units share most edited images.
    fold = members.index(unit) % 2 if unit in members else -1
    own = pools.own.get(unit, set())
    same = [(c, i) for u, c, i in items if fold < 0 or members.index(u) % 2 != fold]
    other = [(c, i) for d, rows in sorted(pools.crops.items()) if d != desc for _, c, i in rows]
    ok_same, ok_other = ([j for j, (_, i) in enumerate(pool) if i not in own] for pool in (same, other))
    if not ok_same or not ok_other:
        return None
    dropped = tuple(sorted({i for _, i in same + other if i in own}))

    def pick(pool, ok, rng):
        j = int(rng.random() * len(pool))
        return pool[j if pool[j][1] not in own else ok[int(rng.random() * len(ok))]][0]
    return Intervention("object", desc, f"object:{desc}:{fold}",
                        lambda im, rng: pools.paste(im, pick(same, ok_same, rng), rng),
                        lambda im, rng: pools.paste(im, pick(other, ok_other, rng), rng), variant=dropped)
