"""The offline describer end to end on real photos, EfficientNet-Lite0 and RapidOCR: which words it picks."""

from __future__ import annotations

import random

import numpy as np
import pytest
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from neuroscribe.config import DescribeConfig
from neuroscribe.datasets.cues import TextCue, apply_cue
from neuroscribe.datasets.probe import load_image, sample_root
from neuroscribe.describe.describers import UnitViews

GOLF_BALL = "n03445777"
FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")


def photos(split: str, wnid: str | None = None) -> list[Image.Image]:
    paths = sorted((sample_root() / split).glob(f"{wnid or '*'}/*.jpg"))
    return [load_image(p).resize((224, 224)) for p in paths]


def unit(images: list[Image.Image], masks: list[np.ndarray] | None = None) -> UnitViews:
    masks = masks or [np.ones((224, 224), bool)] * len(images)
    return UnitViews("layer", 0, list(range(len(images))), [1.0] * len(images), images, masks, images, images)


class Probe:
    """The little of a recording a describer's ``prepare`` may read: the probe images."""

    def __init__(self, images: list[Image.Image]) -> None:
        self.images, self.image_paths, self.skipped_ids = images, [f"{i}.jpg" for i in range(len(images))], set()

    def image(self, i: int) -> Image.Image:
        return self.images[i]


@pytest.fixture(scope="module")
def describer():
    torch = pytest.importorskip("torch")
    pytest.importorskip("rapidocr_onnxruntime")
    from neuroscribe.describe.offline import TaggerDescriber
    return TaggerDescriber(DescribeConfig(), torch.device("cpu"))


def test_golf_balls_are_golf_ball_even_on_a_golf_ball_heavy_probe(describer) -> None:
    """The background is fixed (all ImageNet classes), never the probe: on a probe that is mostly golf balls, a
    unit whose exemplars are golf balls is still "golf ball" (against the probe, "golf ball" is everywhere and
    loses to "ball" or a colour)."""
    others = [im for k, im in enumerate(photos("train")) if k % 40 == 0]  # one photo of each class
    describer.prepare(Probe(photos("train", GOLF_BALL) + others))
    out = describer.describe([unit(photos("val", GOLF_BALL))])[0]
    assert out.description == "golf ball", out
    assert out.extra["support"] >= 8 and out.score > 3.0  # nats per view: a class in most views


def text_views(words: list[str]) -> list[Image.Image]:
    rng = random.Random(0)
    cue = TextCue(size=0.16, position="bottom-left")
    return [apply_cue(im, cue, w, rng) for im, w in zip(photos("val")[::17], words)]


def test_fragments_of_one_word_across_exemplars_add_up(describer) -> None:
    """OCR reads one word in pieces on different exemplars: "eng", "engl", "english" count as "english"."""
    out = describer.describe([unit(text_views(["ENG", "ENGL", "ENGLISH", "CAFE", "SALE", "OPEN"]))])[0]
    assert out.description == "the word english", out
    assert out.extra["support"] == 3
    assert not {"the word eng", "the word engl"} & {c for c, _ in out.candidates}


def test_crop_view_counts_only_the_words_inside_the_mask(describer) -> None:
    """``tagger.view: crop``: the crop around the mask has a margin; a word in that margin, outside the region
    where the unit fires, is not the unit's word."""
    from neuroscribe.describe.views import crop_view
    rng = random.Random(1)
    font = ImageFont.truetype(str(FONT), 30) if FONT.is_file() else ImageFont.load_default(size=30)
    images, masks = [], []
    for im in photos("val")[5::20]:
        im = apply_cue(im, TextCue(size=0.14, position="top-left"), "OPEN", rng)
        draw = ImageDraw.Draw(im)
        draw.rectangle([6, 95, 110, 135], fill="white")
        draw.text((10, 98), "SALE", font=font, fill="black")
        m = np.zeros((224, 224), bool)
        m[:56, :120] = True  # where "OPEN" is written; the crop around it, (0, 0, 156, 156), holds "SALE" too
        images.append(im)
        masks.append(m)
    uv = unit(images, masks)
    uv.crops = [crop_view(im, m) for im, m in zip(images, masks)]
    view = describer.view
    describer.view = "crop"
    try:
        out = describer.describe([uv])[0]
    finally:
        describer.view = view
    words = [c for c, _ in out.candidates if c.startswith("the word")]
    assert out.description == "the word open" and "the word sale" not in words, out


def test_colour_words_are_judged_against_the_probe(describer) -> None:
    """``prepare`` measures the probe's colours; a unit whose masks land on a white card is "white" on a probe of
    ordinary photos, and gets no colour word on a probe where white cards are everywhere (#18)."""
    def carded(im: Image.Image) -> Image.Image:
        im = im.copy()
        ImageDraw.Draw(im).rectangle([0, 0, 111, 223], fill=(245, 245, 245))  # the left half: a white card
        return im

    left = np.zeros((224, 224), bool)
    left[:, :112] = True
    views = [carded(im) for im in photos("val")[3::20]]
    ordinary = [im for k, im in enumerate(photos("train")) if k % 20 == 0]

    def colours() -> list[str]:
        return sorted({c.phrase for view in describer.tag([unit(views, [left] * len(views))]) for c in view
                       if c.source == "colour"})

    try:
        describer.prepare(Probe(ordinary))
        assert describer.tagger.colour_baseline is not None and colours() == ["white"]
        describer.prepare(Probe([carded(im) for im in ordinary]))  # white on half of every probe photo
        assert colours() == []
    finally:
        describer.prepare(Probe(ordinary))


def test_image_keys_are_pixel_keys_memoised_per_object() -> None:
    """The memo by identity gives the pixel digest: equal pixels in another object share it, a changed copy does
    not, and a dead image's entry goes with it (so a reused id never returns a stale key)."""
    import gc
    from PIL import Image
    from neuroscribe.describe import views
    a = Image.new("RGB", (16, 16), (10, 20, 30))
    b = a.copy()
    key = views.pixel_key(a)
    assert views.pixel_key(a) == key == views.pixel_key(b)
    raw = bytes(range(128))  # the same bytes under another mode or shape are another image
    assert views.pixel_key(Image.frombytes("L", (16, 8), raw)) != views.pixel_key(Image.frombytes("P", (16, 8), raw))
    assert views.pixel_key(Image.frombytes("L", (16, 8), raw)) != views.pixel_key(Image.frombytes("L", (8, 16), raw))
    c = a.copy()
    c.putpixel((3, 4), (11, 20, 30))
    assert views.pixel_key(c) != key
    small = views.shrunk(a, (8, 8))
    assert views.shrunk(a, (8, 8)) is small and small.size == (8, 8) and views.shrunk(a, (8, 8), 0) is not small
    assert views.shrunk(b, (16, 16)) is b  # already RGB at that size: itself
    ids = {id(a), id(b), id(c), id(small)}
    del a, b, c, small
    gc.collect()
    assert not ids & set(views._DERIVED)  # nothing derived outlives its image (nor keeps it alive)
