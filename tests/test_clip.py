"""Tests for the CLIP-Dissect backend (neuroscribe.describe.clip).

No CLIP weights exist offline, so the real-model path is covered by: the soft-WPMI math against a hand
computation and on planted similarity matrices; the describer's wiring with a stub CLIP whose embeddings encode
colour (a planted end-to-end case); and its mechanics (batching, caching, determinism, errors) with a tiny
random-weight open_clip ``CLIP`` and the bundled BPE tokenizer on a real efficientnet-lite0 recording of real
photos.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from neuroscribe.describe.clip import (
    ClipDissectDescriber,
    ClipLoadError,
    default_vocabulary,
    load_clip,
    load_vocabulary,
    parse_spec,
    rank_weights,
    soft_wpmi,
)
from neuroscribe.describe.describers import Described, UnitViews


def _uv(layer: str, unit: int) -> UnitViews:
    """CLIP-Dissect reads top sets from the recording, so a unit's views can be empty here."""
    return UnitViews(layer, unit, [], [], [], [], [], [])


# ------------------------------------------------------------------------------------------------ the math
def _hand_soft_wpmi(sim, ids, scale, lam, a, p_start, p_end, min_prob=1e-7):
    """The CLIP-Dissect formula written out with plain Python loops."""
    c = len(sim[0])
    probs = []
    for row in sim:
        ex = [math.exp(scale * s) for s in row]
        z = sum(ex)
        probs.append([e / z for e in ex])
    k = len(ids[0])
    w = [p_start - r / k * (p_start - p_end) for r in range(k)]
    lpe = []
    for row in ids:
        lpe.append([sum(math.log(1 - (w[r] if i >= 0 else 0.0) + (w[r] if i >= 0 else 0.0) * probs[max(i, 0)][cc]
                                 + min_prob) for r, i in enumerate(row)) for cc in range(c)])
    u = len(ids)
    log_p = [(math.log(sum(math.exp(a * lpe[j][cc]) for j in range(u))) - math.log(u)) / a for cc in range(c)]
    return [[lpe[j][cc] - lam * log_p[cc] for cc in range(c)] for j in range(u)], lpe, log_p


def test_soft_wpmi_matches_hand_computation():
    rng = np.random.default_rng(0)
    sim = rng.uniform(-0.3, 0.6, size=(5, 4))
    ids = [[0, 3, 1], [2, 4, -1], [1, 0, 2]]
    res = soft_wpmi(torch.tensor(sim), torch.tensor(ids), scale=7.0, lam=0.6, a=3.0, p_start=0.95, p_end=0.5)
    score, lpe, log_p = _hand_soft_wpmi(sim.tolist(), ids, 7.0, 0.6, 3.0, 0.95, 0.5)
    assert res.score.dtype == torch.float64 and res.score.shape == (3, 4)
    np.testing.assert_allclose(res.score.numpy(), score, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(res.log_p_given_e.numpy(), lpe, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(res.log_p.numpy(), log_p, rtol=1e-10, atol=1e-12)


def test_soft_wpmi_chunking_and_numpy_input_give_the_same_result():
    rng = np.random.default_rng(1)
    sim = rng.normal(0, 0.1, size=(30, 12))
    ids = rng.integers(0, 30, size=(9, 5))
    whole = soft_wpmi(sim, ids, scale=50.0)
    tiny_chunks = soft_wpmi(torch.tensor(sim), torch.tensor(ids), scale=50.0, chunk_elems=1)
    torch.testing.assert_close(whole.score, tiny_chunks.score)


def test_rank_weights_follow_the_reference_schedule():
    w = rank_weights(4, 0.998, 0.97)
    np.testing.assert_allclose(w.numpy(), [0.998, 0.991, 0.984, 0.977])
    assert rank_weights(1).tolist() == [0.998]


def test_soft_wpmi_planted_concept_wins_and_generic_concept_is_penalised():
    """Each unit's top images show one concept strongly; a 'generic' concept is strong on every image.

    Without the prior (lam=0) the generic concept wins everywhere; with lam=1 each unit gets its planted concept.
    """
    rng = np.random.default_rng(0)
    n_units, k, n_concepts, generic = 6, 8, 40, 39
    sim = rng.normal(0.2, 0.005, size=(n_units * k + 20, n_concepts))
    sim[:, generic] += 0.06                       # "photo": a bit above everything on every image
    planted = {u: 3 + 5 * u for u in range(n_units)}
    ids = np.arange(n_units * k).reshape(n_units, k)
    for u, c in planted.items():
        sim[ids[u], c] += 0.05                    # the unit's concept: strong on its own top images only
    res = soft_wpmi(sim, ids, scale=100.0, lam=1.0)
    assert res.score.argmax(1).tolist() == [planted[u] for u in range(n_units)]
    # with lam=1 a score is at most log(U)/a, reached by a concept that only one unit has: the planted ones
    ceiling = math.log(n_units) / 10.0
    assert float(res.score.max()) <= ceiling + 1e-9
    np.testing.assert_allclose([float(res.score[u, c]) for u, c in planted.items()], ceiling, atol=1e-4)
    plain = soft_wpmi(sim, ids, scale=100.0, lam=0.0)
    assert plain.score.argmax(1).tolist() == [generic] * n_units


def test_soft_wpmi_missing_ranks_and_top_k():
    rng = np.random.default_rng(3)
    sim = torch.tensor(rng.normal(0, 0.1, size=(10, 6)))
    full = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    padded = torch.tensor([[0, 1, -1, -1], [4, 5, -1, -1]])
    # a missing rank contributes log(1 + min_prob) ~ 0: same as using only the first two ranks
    a = soft_wpmi(sim, padded, scale=10.0)
    b = soft_wpmi(sim, full, scale=10.0, top_k=2)
    c = soft_wpmi(sim, full[:, :2], scale=10.0)
    torch.testing.assert_close(b.score, c.score)
    w2 = rank_weights(4)[:2]   # ...but the rank weights are those of a k=4 schedule
    w2_only = rank_weights(2)
    assert not torch.allclose(w2, w2_only)
    lpe = torch.log(1 - w2[None, :, None] + w2[None, :, None] * torch.softmax(10.0 * sim, 1)[full[:, :2]]
                    + 1e-7).sum(1)
    torch.testing.assert_close(a.log_p_given_e, lpe + 2 * math.log1p(1e-7), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("ids, msg", [([[0, 10]], "index the 10 rows"), ([[0, -2]], "index the 10 rows"),
                                      (np.zeros((0, 3), dtype=int), "at least one unit")])
def test_soft_wpmi_rejects_bad_ids(ids, msg):
    with pytest.raises(ValueError, match=msg):
        soft_wpmi(torch.zeros(10, 3), ids)


# ------------------------------------------------------------------------------------------------ vocabulary
def test_default_vocabulary_is_common_alphabetic_words():
    v = default_vocabulary()
    assert 15000 < len(v) <= 20000
    assert len(set(v)) == len(v)
    assert all(w.isalpha() and len(w) >= 3 for w in v)
    assert {"dog", "water", "car", "tree"} <= set(v)
    assert "a" not in v and "of" not in v
    assert load_vocabulary(None) == v


def test_vocabulary_file_and_list(tmp_path: Path):
    f = tmp_path / "concepts.txt"
    f.write_text("# my concepts\nstriped fur\n\n  golf ball \nstriped fur\nsky\n", encoding="utf-8")
    assert load_vocabulary(str(f)) == ["striped fur", "golf ball", "sky"]
    assert load_vocabulary(f) == ["striped fur", "golf ball", "sky"]
    assert load_vocabulary(["a", " b", "a", ""]) == ["a", "b"]
    with pytest.raises(FileNotFoundError, match="vocabulary file not found"):
        load_vocabulary(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="no concepts"):
        load_vocabulary(str(tmp_path / "empty.txt"))


# ------------------------------------------------------------------------------------------------ loading
def test_parse_spec():
    assert parse_spec("ViT-B-32@openai") == ("ViT-B-32", "openai")
    assert parse_spec("open_clip:ViT-B-16@laion2b_s34b_b88k") == ("ViT-B-16", "laion2b_s34b_b88k")
    assert parse_spec("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K") == (
        "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", None)


def test_missing_weights_give_a_clear_error(offline_hub):
    with pytest.raises(ClipLoadError) as err:
        load_clip("ViT-B-32@openai")
    msg = str(err.value)
    assert "'ViT-B-32'" in msg and "pretrained tag 'openai'" in msg
    assert "timm/vit_base_patch32_clip_224.openai" in msg        # where the weights live
    assert "HF_HOME" in msg and "network" in msg and "ViT-B-32@/path/to/" in msg
    d = ClipDissectDescriber("ViT-B-32@openai", vocabulary=["dog"], device="cpu")
    with pytest.raises(ClipLoadError, match="openai"):
        d.prepare(None)


@pytest.mark.parametrize("spec, msg", [("ViT-B-33@openai", "no architecture 'ViT-B-33'.*ViT-B-32"),
                                       ("ViT-B-32", "names no weights.*openai"),
                                       ("ViT-B-32@nonsense", "neither an open_clip pretrained tag")])
def test_bad_specs_are_explained(spec, msg):
    with pytest.raises(ClipLoadError, match=msg):
        load_clip(spec)


def test_constructor_validation():
    with pytest.raises(ValueError, match="together"):
        ClipDissectDescriber(model_obj=object())
    with pytest.raises(ValueError, match="template"):
        ClipDissectDescriber(template="a photo of")
    with pytest.raises(ValueError, match="top_k"):
        ClipDissectDescriber(top_k=0)


# ------------------------------------------------------------------------------------------------ planted e2e
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


class ColourClip(torch.nn.Module):
    """A stub CLIP: an image's embedding is its mean RGB (+ a constant), a concept's is a fixed direction."""

    DIRS = {"red": [1.0, 0.0, 0.0, 0.3], "green": [0.0, 1.0, 0.0, 0.3], "blue": [0.0, 0.0, 1.0, 0.3],
            "thing": [0.5, 0.5, 0.5, 1.0]}

    def __init__(self, vocab):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.table = torch.tensor([self.DIRS[w] for w in vocab])
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(100.0)))

    def encode_image(self, x):
        return torch.cat([x.mean((2, 3)), torch.full((x.shape[0], 1), 0.3)], 1)

    def encode_text(self, tokens):
        return self.table[tokens[:, 0]]


class FakeRecording:
    """Duck-typed Recording: solid-colour images; unit u's top set is images of one colour (unit 3: mixed)."""

    def __init__(self):
        self.names = ["red"] * 6 + ["green"] * 6 + ["blue"] * 6
        order = [list(range(5)), list(range(6, 11)), list(range(12, 17)), [0, 6, 12, 1, 7]]
        self._t = {"layer": {"ids": torch.tensor(order)}, "other": {"ids": torch.tensor([[5, 11, -1, -1, -1]])}}
        self.image_paths = [Path(f"/nowhere/{i}.png") for i in range(len(self.names))]
        self.loaded: list[int] = []

    @property
    def layers(self):
        return list(self._t)

    def tensors(self, layer):
        return self._t[layer]

    def units(self, layer):
        return self._t[layer]["ids"].shape[0]

    def image(self, i):
        self.loaded.append(i)
        rgb = np.array(COLOURS[self.names[i]], dtype=np.uint8)
        noise = np.random.default_rng(i).integers(0, 20, size=(16, 16, 3), dtype=np.uint8)
        return Image.fromarray(np.clip(rgb[None, None] + noise, 0, 255).astype(np.uint8))


def _colour_describer(**kw):
    vocab = ["thing", "red", "green", "blue"]
    index = {w: i for i, w in enumerate(vocab)}

    def tokenizer(texts):
        return torch.tensor([[index[t]] for t in texts])

    def preprocess(im):
        return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)

    return ClipDissectDescriber(model_obj=ColourClip(vocab), tokenizer=tokenizer, preprocess=preprocess,
                                vocabulary=vocab, device="cpu", **kw)


def test_planted_colour_units_are_described_by_their_colour():
    rec = FakeRecording()
    d = _colour_describer(batch_size=4, n_candidates=4)
    d.prepare(rec)
    # every exemplar of every layer embedded once (17 ids: 0-4, 6-10, 12-16 and 5, 11), in batches of 4
    assert sorted(set(rec.loaded)) == sorted(rec.loaded) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14,
                                                              15, 16]
    assert d.encode_calls == {"image": math.ceil(17 / 4), "text": 1}
    out = d.describe([_uv("layer", 2), _uv("layer", 0), _uv("layer", 1), _uv("other", 0)])
    assert [(o.layer, o.unit) for o in out] == [("layer", 2), ("layer", 0), ("layer", 1), ("other", 0)]
    assert [o.description for o in out[:3]] == ["blue", "red", "green"]
    for o in out:
        assert isinstance(o, Described) and o.backend == "clip"
        assert [c for c, _ in o.candidates][0] == o.description and len(o.candidates) == 4
        assert [s for _, s in o.candidates] == sorted((s for _, s in o.candidates), reverse=True)
        assert o.score == o.candidates[0][1]
    # the "other" layer's prior is its single unit, so every score there is 0 with lam=1 (log p(c|E) - log p(c))
    assert all(abs(s) < 1e-5 for _, s in out[3].candidates)


def test_describe_needs_prepare_and_valid_units():
    d = _colour_describer()
    with pytest.raises(RuntimeError, match="prepare"):
        d.describe([_uv("layer", 0)])
    d.prepare(FakeRecording())
    with pytest.raises(IndexError, match="out of range"):
        d.describe([_uv("layer", 4)])
    with pytest.raises(KeyError):
        d.describe([_uv("nope", 0)])


# ------------------------------------------------------------------------------------------------ tiny real CLIP
@pytest.fixture(scope="module")
def recording(rec):
    """The session's shared real recording (EfficientNet-Lite0, 60 shipped photos, _blocks.12 and _fc)."""
    return rec


@pytest.fixture(scope="module")
def tiny_clip():
    import open_clip
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    torch.manual_seed(0)
    model = CLIP(embed_dim=32, vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8,
                                                        image_size=32),
                 text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)).eval()
    return model, open_clip.get_tokenizer("ViT-B-32"), open_clip.image_transform(32, is_train=False)


def test_tiny_open_clip_on_a_real_recording(recording, tiny_clip):
    model, tok, pre = tiny_clip
    vocab = default_vocabulary()[:300]
    d = ClipDissectDescriber(model_obj=model, tokenizer=tok, preprocess=pre, vocabulary=vocab, batch_size=8,
                             device="cpu", n_candidates=7)
    d.prepare(recording)
    ids = sorted({i for layer in recording.layers for i in recording.tensors(layer)["ids"].reshape(-1).tolist()
                  if i >= 0})
    assert list(d.image_rows) == ids and d.image_features.shape == (len(ids), 32)
    assert d.text_features.shape == (300, 32)
    assert d.encode_calls == {"image": math.ceil(len(ids) / 8), "text": math.ceil(300 / 8)}
    torch.testing.assert_close(d.text_features.norm(dim=1), torch.ones(300))
    assert d.logit_scale() == pytest.approx(1 / 0.07, rel=1e-5)   # the model's own (untrained) logit scale

    units = [_uv("_blocks.12", 5), _uv("_fc", 0), _uv("_blocks.12", 191)]
    out = d.describe(units)
    assert [(o.layer, o.unit, o.backend) for o in out] == [("_blocks.12", 5, "clip"), ("_fc", 0, "clip"),
                                                           ("_blocks.12", 191, "clip")]
    for o in out:
        assert len(o.candidates) == 7 and o.description in vocab
        assert [s for _, s in o.candidates] == sorted((s for _, s in o.candidates), reverse=True)

    # the scores are soft-WPMI over the whole layer's recorded top sets, computed independently here
    for layer, unit, o in [("_blocks.12", 5, out[0]), ("_fc", 0, out[1])]:
        top = recording.tensors(layer)["ids"]
        rows = torch.tensor([[ids.index(i) for i in row] for row in top.tolist()])
        sim = d.image_features.double() @ d.text_features.double().T
        ref = soft_wpmi(sim, rows, scale=1 / 0.07).score[unit]
        best = torch.sort(ref, descending=True, stable=True)
        assert [c for c, _ in o.candidates] == [vocab[i] for i in best.indices[:7].tolist()]
        np.testing.assert_allclose([s for _, s in o.candidates], best.values[:7].numpy(), rtol=1e-5, atol=1e-5)

    # deterministic: a fresh describer gives the same answer, and text features are embedded once per describer
    again = ClipDissectDescriber(model_obj=model, tokenizer=tok, preprocess=pre, vocabulary=vocab, batch_size=32,
                                 device="cpu", n_candidates=7)
    again.prepare(recording)
    redo = again.describe(units)
    assert [o.description for o in redo] == [o.description for o in out]
    assert [[c for c, _ in o.candidates] for o in redo] == [[c for c, _ in o.candidates] for o in out]
    np.testing.assert_allclose([s for o in redo for _, s in o.candidates],
                               [s for o in out for _, s in o.candidates], rtol=1e-6, atol=1e-9)
    calls = dict(again.encode_calls)
    again.prepare(recording)
    assert again.encode_calls["text"] == calls["text"]

    # top_k uses only the best-ranked images: a different answer set, same mechanics
    k2 = ClipDissectDescriber(model_obj=model, tokenizer=tok, preprocess=pre, vocabulary=vocab, device="cpu",
                              top_k=2, n_candidates=7)
    k2.prepare(recording)
    top = recording.tensors("_fc")["ids"]
    rows = torch.tensor([[ids.index(i) for i in row] for row in top.tolist()])
    ref = soft_wpmi(k2.image_features.double() @ k2.text_features.double().T, rows[:, :2], scale=1 / 0.07).score[0]
    assert k2.describe([_uv("_fc", 0)])[0].score == pytest.approx(float(ref.max()), rel=1e-5)
