"""Flagging: keyword matching on word boundaries with plurals, sentence-embedding similarity on real descriptions,
the use modes, and the cue effect of the real text cue on efficientnet-lite0 with real photos."""
import math

import numpy as np
import pytest
import torch

from neuroscribe.ablate.flag import cue_effect, cue_effect_stats, cue_pairs, flag_units, keyword_matches
from neuroscribe.config import FlagConfig

DESCRIPTIONS = {
    0: "the word 'tench' written in white",
    1: "text",
    2: "golf ball",
    3: "letters and digits",
    4: "a dog on grass",
    5: "typography",  # no keyword, but close to 'text' in meaning
    6: "alphabet",
}


def _rows(layer="_blocks.15"):
    return [{"layer": layer, "unit": u, "description": d, "score": 1.0} for u, d in DESCRIPTIONS.items()]


@pytest.fixture(scope="module")
def embedder():
    from neuroscribe.text import SentenceEmbedder
    return SentenceEmbedder()


def test_keyword_word_boundaries_and_plurals():
    assert keyword_matches("The WORD 'tench' written in white", ["written", "word"]) == ["word", "written"]
    assert keyword_matches("letters and digits", ["letter", "digits"]) == ["letter", "digits"]
    assert keyword_matches("letters", ["letter", "letters"]) == ["letters", "letter"]  # exact spelling first
    assert keyword_matches("a single digit", ["digits"]) == ["digits"]
    assert keyword_matches("cardboard boxes", ["box"]) == ["box"]
    assert keyword_matches("in context", ["text"]) == []  # no substring matches
    assert keyword_matches("a traffic signal", ["sign"]) == []
    assert keyword_matches("glass", ["glas"]) == []  # 'ss' is not a plural
    assert keyword_matches("two street signs", ["street sign"]) == ["street sign"]  # multi-word keyword
    assert keyword_matches("", ["text"]) == []


def test_flags_on_real_descriptions(embedder):
    cfg = FlagConfig()
    flags = flag_units(_rows(), cfg, embedder, all_rows=True)
    by_unit = {f.unit: f for f in flags}
    assert len(flags) == len(DESCRIPTIONS)  # one row per (unit, cue): all rows asked for
    f = by_unit[0]
    assert f.flagged and f.by_keyword and f.keyword == "word" and "keyword 'word'" in f.reasons[0]
    assert 0 < f.similarity < cfg.embedding_threshold and not f.by_embedding  # recorded though below threshold
    assert by_unit[1].by_keyword and by_unit[1].keyword == "text"
    assert by_unit[1].similarity == pytest.approx(1, abs=1e-5)
    assert by_unit[3].by_keyword and by_unit[3].keyword == "letters" and by_unit[3].by_embedding
    for u in (2, 4):  # golf ball, a dog on grass
        assert not by_unit[u].flagged and not by_unit[u].by_keyword and by_unit[u].similarity < 0.45
        assert by_unit[u].reasons == []
    for u in (5, 6):  # flagged by meaning alone
        assert by_unit[u].flagged and not by_unit[u].by_keyword and by_unit[u].by_embedding
        assert by_unit[u].similarity >= cfg.embedding_threshold and "similar to keyword" in by_unit[u].reasons[0]
    flagged = flag_units(_rows(), cfg, embedder)
    assert sorted(f.unit for f in flagged) == [0, 1, 3, 5, 6] and all(f.flagged for f in flagged)
    assert flagged[0].to_dict()["layer"] == "_blocks.15"
    # a stricter threshold leaves only the keyword matches
    strict = flag_units(_rows(), FlagConfig(embedding_threshold=0.95), embedder)
    assert sorted(f.unit for f in strict) == [0, 1, 3]
    # keywords only (no embedder): similarity is NaN, to_dict gives None
    kw_only = flag_units(_rows(), FlagConfig(embedder=None))
    assert sorted(f.unit for f in kw_only) == [0, 1, 3]
    assert math.isnan(kw_only[0].similarity) and kw_only[0].to_dict()["similarity"] is None


def test_use_modes_with_evidence(embedder):
    rows = _rows()
    # 100 measured units in the layer; top 2% = 2 units: 4 and 1 (unit 4, 'a dog on grass', has no description cue)
    evidence = {("_blocks.15", u): 0.01 * u for u in range(100)}
    evidence[("_blocks.15", 4)] = 9.0
    evidence[("_blocks.15", 1)] = 5.0
    cfg = {"evidence_top": 0.02}
    ev = flag_units(rows, FlagConfig(use="evidence", **cfg), embedder, evidence)
    assert [(f.unit, f.by_evidence) for f in ev] == [(1, True), (4, True)]
    assert ev[1].evidence == 9.0 and "ranks 1 of 100" in ev[1].reasons[-1]
    both = flag_units(rows, FlagConfig(use="both", **cfg), embedder, evidence)
    assert [f.unit for f in both] == [1]
    either = flag_units(rows, FlagConfig(use="either", **cfg), embedder, evidence)
    assert sorted(f.unit for f in either) == [0, 1, 3, 4, 5, 6]
    # units with evidence but no description can be flagged by evidence alone
    assert next(f for f in ev if f.unit == 4).description == "a dog on grass"
    ev_only = flag_units([], FlagConfig(use="evidence", **cfg), embedder, evidence)
    assert [f.unit for f in ev_only] == [1, 4] and ev_only[0].description is None
    # an effect must also exceed evidence_min
    assert flag_units(rows, FlagConfig(use="evidence", evidence_min=6.0, **cfg), embedder, evidence)[0].unit == 4


def test_errors_name_the_problem(embedder):
    with pytest.raises(ValueError, match="needs cue-effect evidence"):
        flag_units(_rows(), FlagConfig(use="evidence"), embedder)
    with pytest.raises(ValueError, match=r"descriptions\[1\] lacks \['description'\]"):
        flag_units([{"layer": "a", "unit": 0, "description": "x"}, {"layer": "a", "unit": 1}], FlagConfig(), embedder)
    with pytest.raises(ValueError, match="described twice"):
        flag_units(_rows() + _rows()[:1], FlagConfig(), embedder)
    with pytest.raises(ValueError, match="evidence_cue"):
        flag_units(_rows(), FlagConfig(cues={"text": ["text"], "watermark": ["istock"]}), embedder,
                   {("_blocks.15", 0): 1.0})
    with pytest.raises(ValueError, match="finite"):
        flag_units(_rows(), FlagConfig(use="either"), embedder, {("_blocks.15", 0): float("nan")})
    assert flag_units([], FlagConfig(), embedder) == []  # nothing to flag is an answer, not an error


def test_cue_effect_of_real_text_on_efficientnet():
    from neuroscribe.datasets.cues import TextCue
    from neuroscribe.datasets.probe import open_probe_set, sample_root
    from neuroscribe.datasets.shifts import CuedDataset
    from neuroscribe.models import load_model

    lm = load_model("efficientnet-lite0")
    probe = open_probe_set(sample_root(), split="val")
    rng = np.random.default_rng(0)
    pick = rng.choice(len(probe), 20, replace=False)
    ds = CuedDataset([probe.samples[i] for i in pick], probe.class_names, TextCue(size=0.16, position="center"),
                     fraction=1.0, correlation="wrong", seed=3)
    tf = lm.preprocess.transform()
    layer = "_conv_head"  # the last conv: clear text units (the 7x7 blocks before it are noisier at 12 pairs)
    fit = list(range(12))
    held = list(range(12, 20))
    effects = cue_effect(lm.module, {layer: None}, cue_pairs(ds, tf, fit, batch_size=12))
    assert len(effects) == 1280 and all(math.isfinite(v) for v in effects.values())
    top = sorted(effects, key=effects.get, reverse=True)[:5]
    bottom = sorted(effects, key=effects.get)[:5]
    assert effects[top[0]] > 0.5
    # on held-out pairs, the top units really respond more to the texted image, pair by pair
    units = [u for _, u in top]
    stats = cue_effect_stats(lm.module, {layer: units}, cue_pairs(ds, tf, held, batch_size=8))[layer]
    assert stats.units.tolist() == units and stats.n == 8
    assert (stats.mean_diff > 0).all() and stats.effect.mean() > 0.5
    from neuroscribe.hooks import trace
    clean, cued = next(cue_pairs(ds, tf, held, batch_size=8))
    with torch.no_grad(), trace(lm.module, retain=[layer]) as tr:
        lm.module(torch.cat([clean, cued]))
    ranked = sorted(effects, key=effects.get)
    middle = [u for _, u in ranked[630:650]]  # units of median effect, as a control
    acts = tr[layer].amax(dim=(2, 3))
    a = acts[:, units]
    diff = a[8:] - a[:8]
    up_top = (diff > 0).float().mean().item()
    up_middle = (acts[8:, middle] > acts[:8, middle]).float().mean().item()
    print(f"held-out pairs moving up: top-5 units {up_top:.2f}, median-effect units {up_middle:.2f}")
    assert ((diff[:, :3] > 0).sum(0) >= 7).all()  # the top 3 units: (nearly) every held-out photo
    assert up_top >= 0.8 and up_top > up_middle + 0.15
    # the formula, by hand, for two units on the held-out batch
    floor = max(1e-6, 0.1 * float(np.median(stats.clean_std)))
    for j in range(2):
        d = diff[:, j].double()
        sd = a[:8, j].double().std()
        assert stats.effect[j] == pytest.approx(float(d.mean() / max(float(sd), floor)), rel=1e-4)
    # and the least affected units do not move up the same way
    assert np.mean([effects[k] for k in bottom]) < 0
    with pytest.raises(IndexError, match=r"0\.\.1279"):
        cue_effect(lm.module, {layer: [1280]}, cue_pairs(ds, tf, [0, 1], batch_size=2))
    with pytest.raises(ValueError, match="at least 2"):
        cue_effect(lm.module, [layer], cue_pairs(ds, tf, [0], batch_size=1))


def test_cue_effect_floors_the_standard_deviation_of_a_unit_silent_on_clean_images():
    """A unit that is exactly 0 on every clean image (sd 0) and fires on the cued ones used to get an effect of
    ~mean/1e-6 (427,607 in a study); the sd is floored at a tenth of the layer's median sd."""
    conv = torch.nn.Conv2d(3, 3, 1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        conv.weight[0, :, 0, 0] = 1.0  # unit 0: brightness above 2.5, silent on the clean images below
        conv.bias[0] = -2.5
        conv.weight[1, 0, 0, 0] = 1.0  # units 1 and 2: plain channels, vary from image to image
        conv.weight[2, 1, 0, 0] = 1.0
    model = torch.nn.Sequential(conv, torch.nn.ReLU())
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(6, 3, 4, 4, generator=g) * 0.5
    cued = clean.clone()
    cued[:, :, :2, :2] = 1.0  # the cue: a white corner
    stats = cue_effect_stats(model, {"1": None}, [(clean, cued)])["1"]
    assert stats.clean_std[0] == 0.0 and stats.mean_diff[0] > 0
    floor = 0.1 * float(np.median(stats.clean_std))
    assert stats.effect[0] == pytest.approx(stats.mean_diff[0] / floor)
    assert stats.effect[0] < 1e3  # finite and comparable, not mean/1e-6


def test_top_share_takes_the_top_five_percent_of_each_layer_with_a_floor_of_one_and_ties_to_the_lower_unit():
    """The flag-quality truth rule (measure.top_share): per layer, the top TRUTH_SHARE of its units by score, at
    least one unit however small the layer, ties to the lower unit; layers not asked for are left out."""
    from neuroscribe.ablate.measure import TRUTH_SHARE, top_share
    assert TRUTH_SHARE == 0.05
    score = {("small", 0): 1.0, ("small", 2): 5.0, ("small", 1): 5.0}  # 3 units: 5 % rounds to 0, the floor gives 1
    score.update({("big", u): float(u % 7) - 0.01 * u for u in range(40)})  # 40 units: 2; best are 6 (6.0-0.06)
    score.update({("other", 0): 99.0})                                      # and 13 (6.0-0.13), then 20
    assert top_share(score, ["small", "big"]) == {("small", 1), ("big", 6), ("big", 13)}
    assert top_share({("big", u): 1.0 for u in range(40)}, ["big"]) == {("big", 0), ("big", 1)}  # all tied
    assert top_share(score, []) == set()


def test_capped_description_candidates_are_chosen_by_the_words_own_experiment():
    """Past ablate.max_candidates the description set keeps the units whose verification RESPONSE is largest (then
    support, then the description score), never the cue evidence; a row verified before responses existed falls back
    to its effect; the evidence set keeps the largest cue effects."""
    import math
    from neuroscribe.ablate.stage import capped_candidates, verify_score
    described = {("l", 0): {"verify_response": 0.5, "verify_effect": 9.0, "extra": {"support": 9}, "score": 9.0},
                 ("l", 1): {"verify_response": 2.0, "verify_effect": 0.1, "extra": {"support": 1}, "score": 0.1},
                 ("l", 2): {"verify_effect": 1.5, "extra": {"support": 1}, "score": 0.1},  # no response: its effect
                 ("l", 3): {"verify_response": 2.0, "verify_effect": 0.1, "extra": {"support": 5}, "score": 0.1},
                 ("l", 4): {"verify_response": float("nan"), "extra": {"support": 99}, "score": 99.0}}
    flags = {"flags": [{"layer": "l", "unit": u, "evidence": e} for u, e in enumerate([5.0, 0.0, 1.0, 0.0, 9.0])]}
    units = sorted(described)
    assert capped_candidates("description", units, 3, described, flags) == [("l", 3), ("l", 1), ("l", 2)]
    assert capped_candidates("both", units, 2, described, flags) == [("l", 3), ("l", 1)]
    assert capped_candidates("evidence", units, 2, described, flags) == [("l", 4), ("l", 0)]
    assert capped_candidates("description", units, None, described, flags) == units  # no cap: all, as given
    assert capped_candidates("description", units, 5, described, flags) == units
    assert verify_score(described[("l", 4)]) == -math.inf and verify_score({}) == -math.inf
    assert verify_score(described[("l", 2)]) == 1.5 and verify_score(described[("l", 0)]) == 0.5
    tied = {("m", 5): {"verify_response": 3.0, "extra": {"support": 2}, "score": 1.0},  # response and support tie:
            ("m", 6): {"verify_response": 3.0, "extra": {"support": 2}, "score": 2.0},  # the description score
            ("m", 7): {"verify_response": 3.0, "extra": {"support": 2}, "score": 2.0},  # decides, then the unit
            ("m", 8): {"verify_response": 1.0, "extra": {"support": 2}, "score": 9.0}}
    assert capped_candidates("description", sorted(tied), 3, tied, flags) == [("m", 6), ("m", 7), ("m", 5)]
    group = {"group_evidence": {"units": [{"layer": "m", "unit": u, "auc": a} for u, a in ((5, 0.9), (8, 0.95))]}}
    assert capped_candidates("group", sorted(tied), 2, tied, group) == [("m", 8), ("m", 5)]  # its own AUCs


def test_description_ranking_orders_by_the_words_tier_then_response_then_cosine(tmp_path):
    """The flag-score ranking on a hand-made job: confirmed words above named ones above the rest, whatever their
    response; within a tier the verification's RESPONSE (not its effect; the effect for a row verified before
    responses; a NaN or missing one last), then the cosine to the cues' keywords; equal keys share a rank."""
    import json
    from neuroscribe.ablate.measure import description_ranking
    (tmp_path / "describe.json").write_text(json.dumps({"key": "k"}))
    (tmp_path / "describe" / "k").mkdir(parents=True)
    units = "ABCDEFGHI"
    (tmp_path / "describe" / "k" / "units.jsonl").write_text(
        "".join(json.dumps({"layer": "l", "unit": i, "description": u}) + "\n" for i, u in enumerate(units)))
    ver = {"A": (9.0, 0.1), "B": (0.2, 5.0), "C": (5.0, 1.0), "D": (0.5, 2.0), "E": (1.5, None),
           "F": (3.0, float("nan")), "G": (3.0, float("nan")), "H": (0.0, 1.0)}  # unit: (effect, response)
    (tmp_path / "describe" / "k" / "verify.json").write_text(json.dumps({"units": [
        {"layer": "l", "unit": units.index(u), "status": "tested", "effect": e,
         **({} if r is None else {"response": r})} for u, (e, r) in ver.items()]}))
    words = {"A": (True, True, 0.0), "B": (False, True, 0.0), "C": (False, False, 0.3), "D": (False, False, 0.3),
             "E": (False, False, 0.3), "F": (False, False, 0.9), "G": (False, False, 0.1), "H": (False, False, 0.3)}
    (tmp_path / "flags.json").write_text(json.dumps({"words": [["l", units.index(u), *w] for u, w in words.items()]}))
    rank = {units[u]: r for (_, u), r in description_ranking(tmp_path).items()}
    assert rank["A"] > rank["B"] > rank["D"] > rank["E"] > rank["C"] == rank["H"] > rank["F"] > rank["G"]
    assert rank["G"] > rank["I"]  # in no flags.json "words" row and never verified: the lowest key of all
