"""Tests for the captioner backend (neuroscribe.describe.captioner).

No captioning weights exist offline, so: the real transformers path runs on a tiny random-weight
``BlipForConditionalGeneration`` with a locally built ``BlipProcessor`` (a BERT vocabulary written to a temp dir),
captioning real photos' views from a real efficientnet-lite0 recording; its words are meaningless, so the tests
check mechanics (batching across units, greedy decoding, prompts, caching, determinism, output shape). The
method itself (captions -> candidates -> contrastive summary) is checked with a stub captioner whose captions are
planted. Summaries use the real default sentence embedder (all-MiniLM-L6-v2, shipped in a wheel, offline), so
related phrases ("green tree", "green bush") are compared as the describe stage compares them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from neuroscribe.describe.captioner import (
    CaptionerDescriber,
    CaptionerLoadError,
    caption_candidates,
    clean_caption,
)
from neuroscribe.describe.describers import Described, UnitViews


# ------------------------------------------------------------------------------------------------ candidates
def test_clean_caption():
    assert clean_caption("A picture of a Dog sitting  on grass.", "a picture of") == "a dog sitting on grass"
    assert clean_caption("arafed man riding a horse") == "man riding a horse"
    assert clean_caption("  two cats  ") == "two cats"
    assert clean_caption("a dog", prompt="<CAPTION>") == "a dog"


@pytest.mark.parametrize("caption, phrases", [
    ("a dog sitting on a wooden bench", ["a dog sitting on a wooden bench", "dog", "wooden bench"]),
    ("a close up of a cat with green eyes", ["a close up of a cat with green eyes", "cat", "green eyes"]),
    ("two red cars parked next to each other", ["two red cars parked next to each other", "red cars"]),
    ("a picture of a building, at night", ["a picture of a building, at night", "building", "night"]),
    ("", []),
])
def test_caption_candidates(caption, phrases):
    cands = caption_candidates(caption)
    assert [c.phrase for c in cands] == phrases
    assert all(c.weight == 1.0 for c in cands)
    assert [c.source for c in cands] == (["caption"] + ["phrase"] * (len(phrases) - 1) if phrases else [])


# ------------------------------------------------------------------------------------------------ planted
CAPTIONS = {
    (200, 0, 0): "a red car on a road", (201, 0, 0): "a red car in a field",
    (0, 200, 0): "a green tree by a road", (0, 201, 0): "a green bush by a road",
    (0, 0, 200): "a blue boat on a road", (0, 0, 201): "a blue boat on the sea",
}
TABLE = list(CAPTIONS)


class StubProcessor:
    """'Pixel values' are each image's top-left RGB; decoding looks the caption up."""

    def __call__(self, images, text=None, return_tensors="pt", padding=False):
        self.texts = text
        return {"pixel_values": torch.tensor([im.getpixel((0, 0)) for im in images], dtype=torch.float32)}

    def batch_decode(self, ids, skip_special_tokens=True):
        return [("A picture of " if self.texts else "") + CAPTIONS[TABLE[int(i[0])]] for i in ids]


class StubCaptioner(torch.nn.Module):
    """Captions an image by its colour (a parameter-free module, like a model on the CPU)."""

    def __init__(self):
        super().__init__()
        self.calls: list[dict] = []

    def generate(self, pixel_values, **kw):
        self.calls.append({"n": pixel_values.shape[0], **kw})
        return torch.tensor([[TABLE.index(tuple(int(x) for x in px))] for px in pixel_values])


def _solid(rgb, variant: int) -> Image.Image:
    arr = np.zeros((16, 16, 3), dtype=np.uint8)
    arr[:] = rgb
    arr[8:, 8:] = (variant * 10) % 256  # distinct pixels per view; (0, 0) keeps the planted colour
    return Image.fromarray(arr)


def _unit(layer, unit, colours) -> UnitViews:
    views = [_solid(c, 10 * unit + r) for r, c in enumerate(colours)]
    masks = [np.ones((16, 16), dtype=bool)] * len(views)
    return UnitViews(layer, unit, list(range(len(views))), [1.0] * len(views), views, masks, views, views)


def _planted_units():
    return [_unit("l", 0, [(200, 0, 0)] * 3 + [(201, 0, 0)] * 2),
            _unit("l", 1, [(0, 200, 0)] * 3 + [(0, 201, 0)] * 2),
            _unit("l", 2, [(0, 0, 200)] * 3 + [(0, 0, 201)] * 2)]


def test_planted_captions_give_the_distinctive_phrase(embedder):
    model = StubCaptioner()
    d = CaptionerDescriber(model_obj=model, processor=StubProcessor(), embedder=embedder, batch_size=4,
                           device="cpu")
    out = d.describe(_planted_units())
    # "road" is in most of unit 1's views but also all over the background: the distinctive phrase wins
    assert [o.description for o in out] == ["red car", "green tree", "blue boat"]
    for o in out:
        assert isinstance(o, Described) and o.backend == "captioner"
        assert o.score == o.candidates[0][1]
        assert [s for _, s in o.candidates] == sorted((s for _, s in o.candidates), reverse=True)
    ranked = dict(out[1].candidates)
    assert ranked["green tree"] > ranked["road"]
    assert all(o.candidates[-1][0] == "road" for o in out)  # in every unit's views, but generic: ranked last
    # a whole caption and its own fragment can mean the same: "a red car on a road" (3 of 5 views) is a near-
    # duplicate of "red car" for the real embedder (cosine > 0.8), so it is not listed again under it
    assert [p for p, _ in out[0].candidates] == ["red car", "a red car in a field", "field", "road"]
    for o in out:
        vecs = embedder.encode([p for p, _ in o.candidates])
        assert (vecs @ vecs.T - np.eye(len(vecs))).max() <= 0.8, o.candidates
    assert out[0].extra["captions"] == ["a red car on a road"] * 3 + ["a red car in a field"] * 2
    assert out[0].extra["support"]["red car"] == 5
    # 15 views in one pool, batches of 4 across units
    assert [c["n"] for c in model.calls] == [4, 4, 4, 3] and d.generate_calls == 4


def test_background_is_seeded_excludes_own_views_and_ignores_unit_order(monkeypatch, embedder):
    seen: dict[tuple, list] = {}

    def spy(cands, background, embedder, top=5, alpha=1.0):
        key = tuple(sorted({c.phrase for v in cands for c in v}))
        seen.setdefault(key, []).append(sorted(c.phrase for v in background for c in v))
        from neuroscribe.describe.summarise import Scored
        return [Scored("x", 0.0, 1)]

    import neuroscribe.describe.summarise as summ
    monkeypatch.setattr(summ, "summarise", spy)
    units = _planted_units() + [_unit("l", 3, [(0, 0, 201)])]
    kw = dict(processor=StubProcessor(), embedder=embedder, device="cpu", background_size=6)
    d = CaptionerDescriber(model_obj=StubCaptioner(), seed=0, **kw)
    out = d.describe(units)
    assert [o.extra["background_views"] for o in out] == [6, 6, 6, 6]
    d.describe(units[::-1])
    CaptionerDescriber(model_obj=StubCaptioner(), seed=1, **kw).describe(units)
    red = ("a red car in a field", "a red car on a road", "field", "red car", "road")
    runs = seen[red]
    assert runs[0] == runs[1] != runs[2]              # same seed, any order: same; another seed: another sample
    assert not any(p in ("red car", "a red car on a road", "a red car in a field") for p in runs[0])
    assert len([p for p in runs[0] if p.startswith("a ")]) == 6   # 6 views, one whole caption each


def test_a_unit_without_views_and_a_single_unit(embedder):
    d = CaptionerDescriber(model_obj=StubCaptioner(), processor=StubProcessor(), embedder=embedder,
                           device="cpu")
    empty = UnitViews("l", 9, [], [], [], [], [], [])
    out = d.describe([empty, _planted_units()[0]])
    assert out[0].description == "" and math.isnan(out[0].score) and out[0].candidates == []
    assert out[1].extra["background_views"] == 0 and out[1].description  # no background: typicality alone
    with pytest.raises(ValueError, match="twice"):
        d.describe([empty, empty])


def test_prompt_is_sent_and_stripped(embedder):
    proc = StubProcessor()
    d = CaptionerDescriber(model_obj=StubCaptioner(), processor=proc, embedder=embedder, device="cpu",
                           prompt="a picture of")
    assert d.caption([_solid((200, 0, 0), 1)]) == ["a red car on a road"]
    assert proc.texts == ["a picture of"]


def test_constructor_validation():
    with pytest.raises(ValueError, match="together"):
        CaptionerDescriber(model_obj=StubCaptioner())
    with pytest.raises(ValueError, match="batch_size"):
        CaptionerDescriber(batch_size=0)
    with pytest.raises(ValueError, match="dtype"):
        CaptionerDescriber(dtype="float33")


# ------------------------------------------------------------------------------------------------ missing weights
def test_missing_weights_give_a_clear_error(offline_hub):
    repo = "nobody-here/neuroscribe-no-such-captioner"
    d = CaptionerDescriber(repo, device="cpu")
    with pytest.raises(CaptionerLoadError) as err:
        d.prepare(None)
    msg = str(err.value)
    assert repr(repo) in msg and "HF_HOME" in msg and "network" in msg and "local directory" in msg


# ------------------------------------------------------------------------------------------------ tiny real BLIP
@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"] + (
        "a an the dog cat on of in with picture red blue green photo sitting car tree grass field road sky water "
        "boat house fish").split()
    vocab = tmp_path_factory.mktemp("blip") / "vocab.txt"
    vocab.write_text("\n".join(words) + "\n")
    tok = BertTokenizer(str(vocab), bos_token="[DEC]")
    proc = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok)
    cfg = BlipConfig(
        text_config=dict(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, encoder_hidden_size=32, bos_token_id=5, pad_token_id=0,
                         sep_token_id=3, eos_token_id=3, max_position_embeddings=64),
        vision_config=dict(hidden_size=32, image_size=32, patch_size=8, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64, initializer_range=0.02),
        projection_dim=32)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[:6] = -1e4   # never emit special tokens: non-empty captions
        for name, p in model.text_decoder.named_parameters():  # let the image matter to the random decoder
            if "crossattention" in name and ("value.weight" in name or "output.dense.weight" in name):
                p.mul_(20)
    return model, proc


class GenerateSpy:
    """Wraps ``model.generate`` on the instance and records each call's batch and keyword arguments."""

    def __init__(self, model):
        self.calls: list[dict] = []
        self._orig = model.generate
        model.generate = self

    def __call__(self, **kw):
        self.calls.append({k: (tuple(v.shape) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})
        return self._orig(**kw)


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    from neuroscribe.config import load_config
    from neuroscribe.record.exemplars import Recording
    from neuroscribe.record.recorder import record
    out = tmp_path_factory.mktemp("capjob")
    cfg = load_config(None, {"model": {"spec": "efficientnet-lite0"}, "layers": ["_blocks.12", "_fc"],
                             "data": {"limit": 24}, "record": {"k": 5}, "out": str(out), "device": "cpu",
                             "workers": 0, "progress": False, "batch_size": 24})
    return Recording(record(cfg))


def _views(rec, layer, units):
    try:
        from neuroscribe.describe.views import unit_views
    except ImportError:  # pragma: no cover - the views module is written in parallel
        pytest.skip("neuroscribe.describe.views is not available")
    return [unit_views(rec, layer, u) for u in units]


def _key(im):
    return im.tobytes()


def test_tiny_blip_batches_views_across_units(recording, tiny_blip, embedder):
    model, proc = tiny_blip
    units = _views(recording, "_blocks.12", [3, 50, 120])
    n_views = sum(len(u.views) for u in units)
    distinct = len({_key(v) for u in units for v in u.views})
    assert n_views == 15
    spy = GenerateSpy(model)
    try:
        d = CaptionerDescriber(model_obj=model, processor=proc, embedder=embedder, batch_size=4,
                               max_new_tokens=6, device="cpu")
        out = d.describe(units)
    finally:
        del model.generate
    # one generate() per batch of 4 across units (per-unit batching would need 3 * ceil(5/4) = 6 calls)
    assert len(spy.calls) == math.ceil(distinct / 4) == d.generate_calls
    assert [c["pixel_values"][0] for c in spy.calls] == [4] * (distinct // 4) + ([distinct % 4] if distinct % 4 else [])
    assert all(c["pixel_values"][1:] == (3, 32, 32) for c in spy.calls)
    assert all(c["do_sample"] is False and c["num_beams"] == 1 and c["max_new_tokens"] == 6 for c in spy.calls)
    assert [(o.layer, o.unit, o.backend) for o in out] == [("_blocks.12", 3, "captioner"),
                                                          ("_blocks.12", 50, "captioner"),
                                                          ("_blocks.12", 120, "captioner")]
    captions = [c for o in out for c in o.extra["captions"]]
    assert len(captions) == 15 and all(captions) and len(set(captions)) > 1   # the image matters
    for o in out:
        assert o.description == o.candidates[0][0] and len(o.candidates) >= 1
        assert o.extra["views"] == "views"


def test_tiny_blip_is_deterministic_and_caches(recording, tiny_blip, embedder):
    model, proc = tiny_blip
    units = _views(recording, "_blocks.12", [7, 8])
    a = CaptionerDescriber(model_obj=model, processor=proc, embedder=embedder, batch_size=4, device="cpu",
                           max_new_tokens=5)
    b = CaptionerDescriber(model_obj=model, processor=proc, embedder=embedder, batch_size=16, device="cpu",
                           max_new_tokens=5)
    out_a, out_b = a.describe(units), b.describe(units)
    assert [(o.description, o.score, o.candidates, o.extra["captions"]) for o in out_a] == \
        [(o.description, o.score, o.candidates, o.extra["captions"]) for o in out_b]
    calls = a.generate_calls
    assert a.describe(units)[0].candidates == out_a[0].candidates and a.generate_calls == calls  # all cached
    # batch size does not change a caption: an image captioned alone gives the same text
    alone = CaptionerDescriber(model_obj=model, processor=proc, batch_size=1, device="cpu", max_new_tokens=5)
    assert alone.caption(units[0].views[:2]) == out_a[0].extra["captions"][:2] and alone.generate_calls == 2


def test_tiny_blip_flat_layer_shares_images_and_prompt_is_stripped(recording, tiny_blip, embedder):
    model, proc = tiny_blip
    units = _views(recording, "_fc", [0, 1, 2, 3])     # classifier logits: whole images, shared across units
    ids = {i for u in units for i in u.image_ids}
    spy = GenerateSpy(model)
    try:
        d = CaptionerDescriber(model_obj=model, processor=proc, embedder=embedder, batch_size=64,
                               device="cpu", max_new_tokens=4, prompt="a picture of")
        out = d.describe(units)
    finally:
        del model.generate
    assert len(spy.calls) == 1 and spy.calls[0]["pixel_values"][0] == len(ids) < 20
    assert spy.calls[0]["input_ids"][0] == len(ids)    # the prompt went in with every image
    for o in out:
        assert not any(c.startswith("a picture of") for c in o.extra["captions"])
        assert all(c for c in o.extra["captions"])


def test_tiny_blip_use_crops_captions_the_crops(recording, tiny_blip, embedder):
    model, proc = tiny_blip
    units = _views(recording, "_blocks.12", [11])
    d = CaptionerDescriber(model_obj=model, processor=proc, embedder=embedder, device="cpu",
                           max_new_tokens=5, use_crops=True)
    out = d.describe(units)
    assert out[0].extra["views"] == "crops"
    assert out[0].extra["captions"] == d.caption(units[0].crops)
    assert len(d._captions) == len({_key(c) for c in units[0].crops})   # only crops were captioned


def test_prepared_recording_gives_a_layer_background_independent_of_batching(recording, tiny_blip, embedder):
    model, proc = tiny_blip

    def fresh():
        d = CaptionerDescriber(model_obj=model, processor=proc, embedder=embedder, batch_size=8,
                               device="cpu", max_new_tokens=5, background_size=10, seed=3)
        d.prepare(recording)
        return d

    together = fresh()
    sampled = sorted({u for u, _ in together._background_plan("_blocks.12")})
    units = _views(recording, "_blocks.12", [sampled[0], sampled[-1], 191 if 191 not in sampled else 190])
    out = together.describe(units)
    # the layer's background views are captioned in the same batches as the units' views
    bg = together._backgrounds["_blocks.12"]
    assert len(bg) == 10
    bg_units = [u for u, _ in bg]
    assert bg_units == sorted(bg_units)
    n_images = len(together._captions)
    assert together.generate_calls == math.ceil(n_images / 8) and n_images <= 10 + 15
    for o in out:  # each unit is contrasted with the sample minus its own views
        assert o.extra["background_views"] == 10 - bg_units.count(o.unit)
    assert [o.extra["background_views"] < 10 for o in out] == [True, True, False]
    # describing the units one at a time, in another order, gives the same answers
    alone = fresh()
    alone.batch_size = 32
    singles = [alone.describe([u])[0] for u in units[::-1]][::-1]
    assert [(o.description, o.candidates) for o in singles] == [(o.description, o.candidates) for o in out]
    assert alone._backgrounds["_blocks.12"] == bg
    # another seed samples another background
    other = CaptionerDescriber(model_obj=model, processor=proc, device="cpu", background_size=10, seed=4)
    other.prepare(recording)
    assert [u for u, _ in other._background_plan("_blocks.12")] != bg_units


def test_loads_a_local_checkpoint_through_the_auto_classes(tiny_blip, tmp_path):
    """The real loading path (AutoConfig -> AutoProcessor -> AutoModelForImageTextToText) on a saved tiny BLIP."""
    model, proc = tiny_blip
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    d = CaptionerDescriber(str(tmp_path), device="cpu", max_new_tokens=5)
    d.prepare(None)
    assert type(d.model).__name__ == "BlipForConditionalGeneration" and d.model.dtype == torch.float32
    assert not d.model.training
    ims = [_solid((200, 0, 0), 1), _solid((0, 0, 200), 2)]
    ref = CaptionerDescriber(model_obj=model, processor=proc, device="cpu", max_new_tokens=5)
    assert d.caption(ims) == ref.caption(ims)
