"""Verification by experiment, per unit: a description's words alone become an intervention on images where the
unit is quiet, and the unit is measured against a matched control (the same edit with other words or colours).

What MAIA does with an agent, as a small registry (:data:`INTERVENTIONS`; a new kind is one function that turns a
description into an :class:`Intervention`, or None when the words are not its kind). The first kind that accepts
the description is used:

* ``text`` -- "the word X": X is rendered (a font, size, colour and place drawn per image from the verifier's own
  seeded choices, never the study's cue); the control renders another common English word of the same length with
  the same choices. "text", "letters", "writing", "number", ...: common words (digits for "number"/"digits") are
  rendered; the control is the same drawing blurred until unreadable (same place, ink and colour; the blur also
  softens the strokes, so a plain contrast detector passes as "text"). A unit whose "the word X" is not confirmed
  is then tested as "text" (its target becomes "text"; ``word_effect``/``word_auc`` keep the word's figures): the
  words still name text, just not that one word.
* ``colour`` -- a basic colour term in the description: a patch of that colour (a third to a half of the side, at
  a random place); the control is the same patch in another basic colour.
* ``object`` -- any other description shared by at least one *other* unit: crops of that unit's exemplars under
  its mask are pasted in (scaled to 35-55 % of the side); the control pastes crops of units described otherwise.
  The units of one description form two folds, each shown the other's crops, and no crop of an image among the
  unit's own exemplars is used. A description no other unit has cannot be verified this way (``unverifiable``).
  The crops come from the probe: on a cued probe they can carry the cue, so an object verdict says that units
  labelled alike drive each other, not that the label is true.

Measurement (:func:`verify_units`): ``images`` probe images, a class-stratified seeded sample drawn for this
purpose; a unit is measured on those where it is quiet (spatial-max activation at most its median over the
sample). With ``t_i``, ``c_i`` the unit's spatial-max activation on the treated and control edit of image ``i``::

    effect = mean_i(t_i - c_i) / sd(base),  auc = P(t > c) over all (treated, control) pairs

where ``sd(base)`` is the sample sd over the whole sample, floored at 10 % of the layer's median sd (a nearly
constant unit cannot get a huge effect from a tiny change). ``confirmed`` when ``effect >= effect_min`` and
``auc >= auc_min`` (``describe.verify``). Edits that share their words share their images: ``images x (1 + 2 x
distinct interventions)`` forward passes; an object's units of one fold differ only in the images where the drawn
crop is of one of their own, and only those are passed again.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from ..datasets.cues import DEFAULT_FONT, load_font
from ..fusion import fold_for_inference
from ..text import common_words
from .tagger import BASIC_COLOURS

__all__ = ["INTERVENTIONS", "VERIFY_VERSION", "Intervention", "Pools", "intervention_for", "measure", "normalise",
           "register", "verify_units"]

TEXT_WORDS = {"text", "texts", "word", "words", "letter", "letters", "writing", "written", "caption", "label",
              "sign", "font", "number", "numbers", "digit", "digits", "lettering", "inscription"}
_DIGIT_WORDS = {"number", "numbers", "digit", "digits"}
_WORD_RE = re.compile(r"^the word\s+\"?([A-Za-z0-9'-]+(?: [A-Za-z0-9'-]+)*)\"?$")  # "the word french horn" too
_FONTS = [p for p in (DEFAULT_FONT, DEFAULT_FONT.with_name("DejaVuSans-Bold.ttf"),
                      DEFAULT_FONT.with_name("DejaVuSerif.ttf"), DEFAULT_FONT.with_name("DejaVuSansMono.ttf"))
          if p.is_file()]
_INK = [(255, 255, 255), (0, 0, 0), (220, 30, 30), (250, 220, 40), (30, 60, 200)]
UnitKey = tuple[str, int]
VERIFY_VERSION = 5  # part of verify.json's key: results of an older verifier are not reused


@dataclass
class Intervention:
    """An edit named by a description: ``treat`` and ``control`` take (image, rng) and return the edited copy;
    both are called with equally seeded rngs, so they share every choice but the thing tested."""

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


INTERVENTIONS: dict[str, Callable[[str, UnitKey, Pools], Intervention | None]] = {}


def register(kind: str):
    """Decorator: add an intervention kind (``fn(description, unit, pools) -> Intervention | None``)."""
    return lambda fn: INTERVENTIONS.update({kind: fn}) or fn


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


def _paste(img: Image.Image, crop: Image.Image, rng: random.Random) -> Image.Image:
    img = img.convert("RGB").copy()
    w, h = img.size
    side = int(min(w, h) * rng.uniform(0.35, 0.55))
    x, y = rng.randint(0, w - side), rng.randint(0, h - side)
    img.paste(crop.convert("RGB").resize((side, side), Image.Resampling.BILINEAR), (x, y))
    return img


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
                        lambda im, rng: _paste(im, pick(same, ok_same, rng), rng),
                        lambda im, rng: _paste(im, pick(other, ok_other, rng), rng), variant=dropped)


# ------------------------------------------------------------------------------------------------ measuring
def _seed(*parts) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def _crop_pools(rec, rows: Mapping[UnitKey, str], seed: int, per_description: int = 8,
                extra_units: int = 32) -> dict[str, list[tuple[UnitKey, Image.Image, int]]]:
    """Exemplar crops (every exemplar, under the unit's mask) of up to ``per_description`` units of every description
    that several units share, and of ``extra_units`` other units (control material)."""
    from .views import crop_box
    groups: dict[str, list[UnitKey]] = {}
    for key, d in rows.items():
        groups.setdefault(normalise(d), []).append(key)
    rng = random.Random(_seed(seed, "crops"))
    chosen = []
    for d, units in sorted(groups.items()):
        if len(units) > 1:
            chosen += rng.sample(units, min(per_description, len(units)))
    singles = sorted(k for d, units in groups.items() if len(units) == 1 for k in units)
    chosen += rng.sample(singles, min(extra_units, len(singles)))
    out: dict[str, list[tuple[UnitKey, Image.Image, int]]] = {}
    for layer, unit in sorted(set(chosen)):
        exemplars = rec.exemplars(layer, unit)
        if not exemplars:
            continue
        masks = rec.masks(layer, unit)
        for ex in exemplars:
            try:
                im = rec.image(ex.image_id)
            except OSError:
                continue
            out.setdefault(normalise(rows[(layer, unit)]), []).append(((layer, unit),
                                                                      im.crop(crop_box(masks[ex.rank])), ex.image_id))
    return out


@torch.no_grad()
def _maxima(module, rec, layers: Sequence[str], images: Sequence[Image.Image], batch: int, device) -> dict:
    """Each unit's spatial-max activation on each image: ``{layer: [n, units]}`` (float64 numpy)."""
    from ..hooks import run, trace, unit_view
    from ..models import channels_last, to_layout
    to_tensor, out = rec.preprocess.to_tensor(), {l: [] for l in layers}
    for s in range(0, len(images), batch):
        x = torch.stack([to_tensor(im) for im in images[s:s + batch]]).to(device)
        with channels_last(module) as nhwc, trace(module, list(layers), stop=True) as tr:  # NHWC: ~1.5x
            run(module, to_layout(x, nhwc))
        for l in layers:
            v = unit_view(tr[l], rec.meta["layers"][l]["prefix_tokens"], rec.layout(l))
            out[l].append(v.flatten(2).amax(2).double().cpu().numpy())
    return {l: np.concatenate(v) for l, v in out.items()}


def _digest(img: Image.Image) -> bytes:
    """What identifies an edited image for sharing its forward pass: its size, mode and pixels."""
    return hashlib.blake2b(img.tobytes() + repr((img.size, img.mode)).encode(), digest_size=16).digest()


def _auc(t: np.ndarray, c: np.ndarray) -> float:
    """P(t > c) + P(t == c) / 2 over all pairs (Mann-Whitney)."""
    gt = (t[:, None] > c[None, :]).mean()
    eq = (t[:, None] == c[None, :]).mean()
    return float(gt + 0.5 * eq)


def measure(base: np.ndarray, treated: np.ndarray, control: np.ndarray, unit: int) -> dict:
    """Effect and AUC of column ``unit`` of ``[images, units]`` spatial maxima (see the module docstring): on the
    images where the unit is at most its median on ``base``; sd over all of ``base``, floored at 10 % of the
    median sd of the layer's units."""
    sd = base.std(0, ddof=1)
    floor = max(1e-6, 0.1 * float(np.median(sd)))
    quiet = base[:, unit] <= np.median(base[:, unit])
    t, c = treated[quiet, unit], control[quiet, unit]
    return {"effect": float((t - c).mean() / max(float(sd[unit]), floor)), "auc": _auc(t, c), "n": int(quiet.sum())}


def verify_units(rec, lm, descriptions: Mapping[UnitKey, str], cfg, seed: int, device, batch_size: int = 32,
                 progress: bool = False, null: bool = False) -> dict[UnitKey, dict]:
    """Verify each unit's description by experiment (see the module docstring); ``cfg`` is ``describe.verify``.

    ``null=True`` replaces the treatment by a second, independently seeded control draw: the effects and AUCs
    then come from the null distribution (what the thresholds must reject; ``tools/verify_thresholds.py``).

    Returns ``{(layer, unit): {"kind", "target", "status", "effect", "auc", "n"}}``; ``status`` is
    ``confirmed``, ``not confirmed`` or ``unverifiable`` (no intervention for the words; then ``why``)."""
    from ..datasets.splits import stratified_sample
    labels = [int(y) for y in rec.labels]
    ids = stratified_sample(labels, cfg.images, seed, exclude=rec.skipped_ids, purpose="verify")
    base, kept = [], []
    for i in ids:
        try:
            base.append(rec.image(i).convert("RGB"))
            kept.append(i)
        except OSError:
            continue
    if len(base) < 4:
        raise ValueError(f"describe.verify needs at least 4 readable probe images; got {len(base)}")
    pools = Pools(words=common_words())
    ivs = {k: intervention_for(d, k, Pools(pools.words), cfg.kinds) for k, d in descriptions.items()}
    if "object" in cfg.kinds:
        rest = {k: d for k, d in descriptions.items() if ivs[k] is None}
        pools.crops = _crop_pools(rec, rest, seed) if rest else {}
        pools.own = {k: {ex.image_id for ex in rec.exemplars(*k)} for k in rest}
        ivs.update({k: intervention_for(d, k, pools, ["object"]) for k, d in rest.items()})
    layers = sorted({l for l, _ in descriptions}, key=rec.layers.index)
    x0 = torch.stack([rec.preprocess.to_tensor()(im) for im in base[:2]]).to(device)  # batch norm and pads folded
    module = fold_for_inference(lm.module, x0, keep=layers)[0]  # into the convs: same values, less time (fusion.py)
    acts0 = _maxima(module, rec, layers, base, batch_size, device)
    by_key: dict[str, list[UnitKey]] = {}
    for k, iv in ivs.items():
        if iv is not None:
            by_key.setdefault(iv.key, []).append(k)
    from tqdm.auto import tqdm

    def run_edit(units: list[UnitKey], iv: Intervention | None = None) -> dict[UnitKey, dict]:
        """``units`` of one key, each by its intervention (or ``iv``); every distinct edited image passed once."""
        ls = sorted({l for l, _ in units}, key=rec.layers.index)
        variants: dict[tuple, list[UnitKey]] = {}
        for k in units:
            variants.setdefault((iv or ivs[k]).variant, []).append(k)
        rows: dict[bytes, dict] = {}  # an edited image's digest -> its spatial maxima on the layers
        res = {}
        for group in variants.values():
            one = iv or ivs[group[0]]
            treated = [one.control(im, random.Random(_seed(seed, one.key, i, "null"))) if null else
                       one.treat(im, random.Random(_seed(seed, one.key, i))) for im, i in zip(base, kept)]
            control = [one.control(im, random.Random(_seed(seed, one.key, i))) for im, i in zip(base, kept)]
            digests = [_digest(im) for im in treated + control]
            todo = {d: im for d, im in zip(digests, treated + control) if d not in rows}
            if todo:
                acts = _maxima(module, rec, ls, list(todo.values()), batch_size, device)
                rows.update({d: {l: acts[l][j] for l in ls} for j, d in enumerate(todo)})
            n = len(treated)
            at = {l: np.stack([rows[d][l] for d in digests[:n]]) for l in ls}
            ac = {l: np.stack([rows[d][l] for d in digests[n:]]) for l in ls}
            for l, u in group:
                r = measure(acts0[l], at[l], ac[l], u)
                ok = r["effect"] >= cfg.effect_min and r["auc"] >= cfg.auc_min
                res[(l, u)] = {"kind": one.kind, "target": one.target,
                               "status": "confirmed" if ok else "not confirmed", **r}
        return res

    out: dict[UnitKey, dict] = {}
    for key, units in tqdm(sorted(by_key.items()), desc="verify", unit="edit", disable=not progress):
        out.update(run_edit(units))
    # "the word X" not confirmed: the words still say text; tested as text (the word's own figures kept)
    words = [k for k, r in out.items() if r["target"].startswith("the word ") and r["status"] != "confirmed"]
    if words:
        for k, r in run_edit(words, intervention_for("text", ("", -1), pools)).items():
            out[k] = {**r, "word_effect": out[k]["effect"], "word_auc": out[k]["auc"]}
    for k, iv in ivs.items():
        if iv is None:
            out[k] = {"kind": None, "target": None, "status": "unverifiable", "effect": None, "auc": None, "n": 0,
                      "why": "no intervention kind of " + str(list(cfg.kinds)) + " reads these words"
                             + (" (an object needs another unit with the same description)"
                                if "object" in cfg.kinds else "")}
    return out
