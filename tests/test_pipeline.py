"""The robustness stages chained on a tiny real job: a ResNet-18 trained on shipped photos with a text cue."""
import json
import time

import pytest
import torch

from neuroscribe import pipeline
from neuroscribe.config import load_config
from neuroscribe.record.recorder import record
from neuroscribe.describe.stage import describe

TEXT = {"kind": "text", "size": 0.25, "position": "bottom-left"}


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipe") / "job"
    cfg = load_config(None, {
        "train": {"arch": "torchvision:resnet18", "data": {"split": "train", "limit": 120}, "cue": TEXT,
                  "fraction": 0.5, "holdout": 0.25, "resolution": 48, "epochs": 2, "batch_size": 30,
                  "checkpoint": str(out.parent / "models" / "text-{seed}.safetensors")},
        "layers": ["layer3", "layer4"], "data": {"split": "val", "limit": 40}, "record": {"k": 5},
        "describe": {"units": 12, "faithfulness_images": 0, "gallery": False, "verify": {"images": 8}},
        "shifts": [{"name": "wrong-text", "data": {"split": "val", "limit": 40}, "cue": TEXT,
                    "correlation": "wrong"},
                   {"name": "train-text", "data": {"split": "train", "limit": 40}, "cue": TEXT, "fraction": 0.5,
                    "correlation": "match"}],
        "probe": "train-text",  # training photos: the evidence shift (record itself reads data: in this test)
        "flag": {"embedder": None, "evidence_shift": "train-text", "evidence_images": 20},
        "ablate": {"max_units": 4, "control_candidates": 6},
        "evaluate": {"bootstrap": 200}, "out": str(out), "progress": False, "workers": 0, "batch_size": 20})
    cfg = pipeline.train(cfg)
    record(cfg)
    describe(cfg)
    # a cue vocabulary sure to hit, so the flag set is not empty: a word of the first description (colour words,
    # which it used to rely on, are now named only where unusual for the probe)
    rows = [json.loads(l) for l in (out / "descriptions.jsonl").read_text().splitlines() if l.strip()]
    word = next(r["description"].split()[-1] for r in rows if r["description"])
    # words alone (flag.verified off): this file tests what the choosing stages read, not the verification, and a
    # 2-epoch model's units are rarely confirmed for an arbitrary word (verification flags: tests/test_verify.py)
    cfg = cfg.model_copy(update={"flag": cfg.flag.model_copy(update={"cues": {"picked": [word]}, "verified": False})})
    return cfg, out


def test_flag_ablate_never_read_test_sets(job, monkeypatch):
    cfg, out = job
    def no_test_sets(*a, **k):
        raise AssertionError("a choosing stage read the test sets")
    from neuroscribe.ablate import stage as choosing
    from neuroscribe.datasets import sets
    for module in (choosing, sets):  # wherever a choosing stage could reach the builders from
        monkeypatch.setattr(module, "test_sets", no_test_sets, raising=False)
    built, real_shift_set = [], sets.shift_set
    spy = lambda shift, *a: built.append(shift.name) or real_shift_set(shift, *a)  # noqa: E731
    monkeypatch.setattr(choosing, "shift_set", spy)
    monkeypatch.setattr(sets, "shift_set", spy)
    flags = pipeline.flag(cfg)
    assert flags["sets"]["description"], "units described with the picked word should be flagged"
    assert "evidence" in flags["sets"]
    abl = pipeline.ablate(cfg)
    main = abl["variants"]["description"]
    assert [n for n, _ in main["curve"]] == list(range(len(main["curve"])))
    assert main["chosen_n"] == max(main["curve"], key=lambda t: (t[1], -t[0]))[0]
    # controls: the same number of units as the main ablation, >= 5 random draws
    assert abl["controls"]["n"] == main["chosen_n"]
    assert len(abl["controls"]["random"]) >= 5
    assert all(len(d) == main["chosen_n"] for d in abl["controls"]["random"])
    assert len(abl["controls"]["sort_all"]) == main["chosen_n"]
    assert "the name of a random WRONG class written on it" in abl["validation"]["description"]
    assert built and set(built) <= {"train-text"}, built  # evidence came from training photos, never a test set


def test_evaluate_and_report_carry_the_computed_numbers(job):
    cfg, out = job
    pipeline.flag(cfg)
    pipeline.ablate(cfg)
    ev = pipeline.evaluate(cfg)
    assert set(ev["test_sets"]) == {"in-distribution", "wrong-text"}
    paths = pipeline.report(cfg)
    rep = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    for s in ("in-distribution", "wrong-text"):
        acc = ev["results"]["base"][s]["acc"]
        assert rep["variants"]["base"]["results"][s]["acc"] == acc
        assert f"{100 * acc:.1f}%" in md and f"{100 * acc:.1f}" in html
    assert len(rep["variants"]["random"]["draws"]) >= 5
    # the headline: the ablation's gain on wrong-text (the shifted set), paired CI, beside the best random draw
    res, h = ev["results"], rep["headline"]
    assert h["set"] == "wrong-text" and h["variant"] == "ablated"
    gain = 100 * (res["ablated"]["wrong-text"]["acc"] - res["base"]["wrong-text"]["acc"])
    assert h["gain"] == pytest.approx(gain, abs=1e-9)
    pv = ev["vs_base"]["ablated"]["wrong-text"]
    assert pv["diff"] == pytest.approx(gain / 100, abs=1e-9) and pv["lo"] <= pv["diff"] <= pv["hi"]
    assert h["gain_lo"] == pytest.approx(100 * pv["lo"]) and h["gain_hi"] == pytest.approx(100 * pv["hi"])
    draws = [100 * (res[k]["wrong-text"]["acc"] - res["base"]["wrong-text"]["acc"]) for k in res
             if k.startswith("random/")]
    assert h["random_draws"] == len(draws) >= 5 and h["random_best"] == pytest.approx(max(draws))
    assert h["excludes_random_best"] == (h["gain_lo"] > h["random_best"])
    assert "**Headline**" in md
    assert (out / "curve.png").stat().st_size > 1000 and paths["html"].endswith("report.html")
    # the stages are current: a second run reuses them
    assert pipeline.ablate(cfg)["key"] == json.loads((out / "ablation.json").read_text())["key"]


def test_evaluate_passes_once_per_distinct_edit_and_reuses_it(job, monkeypatch):
    """Variants that edit the same model alike (an empty flag set, N = 0, a random draw equal to the ablation...)
    share one pass per test set; their figures are those of that pass. Variants whose model differs in its last
    layer only (re-fit, DFR) share the pass of the same edit, scored by their own head: figure for figure what a
    pass of their own model gives."""
    from neuroscribe.ablate import evaluate as ev_mod
    cfg, out = job
    cfg = cfg.model_copy(update={"ablate": cfg.ablate.model_copy(update={"dfr": "holdout", "refit": True})})
    pipeline.flag(cfg)
    abl = pipeline.ablate(cfg)
    calls = []
    real = ev_mod.predict
    monkeypatch.setattr(ev_mod, "predict", lambda *a, **k: calls.append(1) or real(*a, **k))
    (out / "evaluation.json").unlink(missing_ok=True)
    ev = pipeline.evaluate(cfg)
    assert "dfr" in ev["results"]
    edits = [v["units"] for v in abl["variants"].values()] + [abl["controls"]["sort_all"], *abl["controls"]["random"]]
    distinct = {tuple(sorted(map(tuple, u))) for u in edits} | {()}  # () = the base model
    assert len(distinct) < len(edits) + 1, "the fixture has no two alike edits: the reuse is not exercised"
    assert {"refit_only", "dfr"} <= set(ev["results"])  # heads of their own, on the base model's body
    assert ev["forward_passes"] == {s: len(distinct) for s in ev["test_sets"]}
    assert len(calls) == sum(ev["forward_passes"].values())
    # each head's figures as a pass of its own model (nothing ablated) gives them
    from neuroscribe.ablate.refit import dfr_last_layer, refit_last_layer
    from neuroscribe.ablate.stage import model_and_means
    from neuroscribe.datasets.sets import class_index, dfr_set, dfr_train_set, held_out, loader, shift_set, test_sets
    lm, dev, _, means = model_and_means(cfg)
    probe = next(s for s in cfg.shifts if s.name == cfg.probe)
    own = {"refit_only": refit_last_layer(lm.module, [], loader(cfg, shift_set(probe, lm.preprocess, cfg.seed,
                                          lm.class_names, held_out(cfg.out))[0]), device=dev, seed=cfg.seed),
           "dfr": dfr_last_layer(lm.module, [], dfr_set(cfg, lm.preprocess, lm.class_names)[0],
                                 lambda d: loader(cfg, d), cfg.ablate.method, means, device=dev, seed=cfg.seed,
                                 extra=(dfr_train_set(cfg, lm.preprocess) or (None,))[0])[0]}
    for sname, (ds, set_names, _) in test_sets(cfg, lm.preprocess, lm.class_names).items():
        for v, model in own.items():
            p = real(model, loader(cfg, ds), dev, class_index=class_index(lm, set_names), keep_logits=False,
                     progress=False)
            assert ev["results"][v][sname]["acc"] == float((p.preds == p.labels).mean()), (v, sname)
    names = {"description": "ablated", "evidence": "ablated_evidence", "both": "ablated_both"}
    for name, v in abl["variants"].items():
        if not v["units"]:  # an empty choice is the base model, figure for figure
            assert ev["results"][names.get(name, name)] == ev["results"]["base"]


def test_dfr_ns_chooses_n_for_ablation_and_dfr_together_on_validation(job, monkeypatch):
    """``ablate.dfr_ns``: DFR fitted after the first N units of the description ordering, for each N (clipped to
    the ordering), scored on validation with those units ablated; N = the best (ties to the smaller); evaluated as
    ``ablated_dfr_tuned``. Every point is measured again independently, and so is the evaluated variant."""
    import torch
    from neuroscribe.ablate import edit as edit_mod, refit as refit_mod, select as select_mod, stage as stage_mod
    from neuroscribe.ablate.evaluate import accuracy_report, predict
    from neuroscribe.ablate.stage import model_and_means, validation_batches
    from neuroscribe.config import ConfigError
    from neuroscribe.datasets.sets import class_index, dfr_set, loader, test_sets
    cfg, out = job
    with pytest.raises(ConfigError, match="ablate.dfr_ns.0: Input should be greater than or equal to 0"):
        load_config(None, {"ablate": {"dfr": "holdout", "dfr_ns": [-1, 10]}})
    with pytest.raises(ValueError, match="set ablate.dfr too"):
        pipeline.ablate(cfg.model_copy(update={"ablate": cfg.ablate.model_copy(update={"dfr_ns": [0, 2]})}))
    cfg = cfg.model_copy(update={"ablate": cfg.ablate.model_copy(update={"dfr": "holdout", "dfr_ns": [0, 1, 99]})})
    pipeline.flag(cfg)
    # what the curve's passes get: the units DFR is fitted after, and the edits each validation pass applies
    fitted, scored, built, inside = [], [], {}, []
    real = {"fit": refit_mod.dfr_last_layer, "edits": edit_mod.ablation_edits, "val": select_mod.val_correct,
            "curve": stage_mod.dfr_curve}

    def edits(m, units, *a, **k):
        e = real["edits"](m, units, *a, **k)
        built[id(e)] = (e, edit_mod.as_unit_dict(units))  # e kept alive: its id is not reused
        return e
    monkeypatch.setattr(refit_mod, "dfr_last_layer", lambda m, units, *a, **k: (
        inside and fitted.append([tuple(u) for u in units])) or real["fit"](m, units, *a, **k))
    monkeypatch.setattr(edit_mod, "ablation_edits", edits)
    monkeypatch.setattr(select_mod, "val_correct", lambda m, v, e, *a, **k: (inside and scored.append(
        None if e is None else built.get(id(e), (None, "edits not built for this pass"))[1])) or real["val"](
        m, v, e, *a, **k))
    monkeypatch.setattr(stage_mod, "dfr_curve", lambda *a, **k: inside.append(1) or real["curve"](*a, **k))
    (out / "ablation.json").unlink(missing_ok=True)
    abl = pipeline.ablate(cfg)
    monkeypatch.undo()
    ordered = [(l, u) for l, u, _ in abl["variants"]["description"]["ordered"]]
    assert ordered, "the fixture's description ordering is empty: nothing to tune"
    tuned = abl["dfr_tuned"]
    ns = [n for n, _ in tuned["curve"]]
    assert ns == sorted({0, 1, len(ordered)})
    assert fitted == [ordered[:n] for n in ns], "DFR was not fitted after the first N units of the ordering"
    assert scored == [edit_mod.as_unit_dict(ordered[:n]) if n else None for n in ns], \
        "a point of the curve was not scored with its own units ablated"
    best = max(v for _, v in tuned["curve"])
    assert tuned["chosen_n"] == min(n for n, v in tuned["curve"] if v == best)
    assert tuned["units"] == [list(u) for u in ordered[:tuned["chosen_n"]]]
    lm, dev, _, means = model_and_means(cfg)  # every point measured again, independently
    val, _, names, _ = validation_batches(cfg, lm)
    dfr_ds = dfr_set(cfg, lm.preprocess, lm.class_names)[0]
    models = {}
    for n, value in tuned["curve"]:
        model, _ = refit_mod.dfr_last_layer(lm.module, ordered[:n], dfr_ds, lambda d: loader(cfg, d),
                                            cfg.ablate.method, means, device=dev, seed=cfg.seed)
        e = edit_mod.ablation_edits(model, edit_mod.as_unit_dict(ordered[:n]), cfg.ablate.method, means) if n else None
        right = select_mod.val_correct(model, val, e, dev, class_index(lm, names))
        assert value == int(right.sum()) / len(right), f"N = {n}"
        models[n] = (model, e)
    # a tie goes to the smaller N (every point scores alike)
    monkeypatch.setattr(refit_mod, "dfr_last_layer", lambda m, *a, **k: (m, {}))
    monkeypatch.setattr(select_mod, "val_correct", lambda *a, **k: torch.ones(4, dtype=torch.bool))
    tie = stage_mod.dfr_curve(cfg, lm, dev, means, ordered, val, class_index(lm, names))
    assert [v for _, v in tie["curve"]] == [1.0] * len(ns) and tie["chosen_n"] == 0 and tie["units"] == []
    monkeypatch.undo()
    dfr_models, heads = {}, []  # evaluation: the DFR fits it makes itself, the stored heads it takes
    monkeypatch.setattr(refit_mod, "dfr_last_layer", lambda m, units, *a, **k: dfr_models.setdefault(
        tuple(map(tuple, units)), real["fit"](m, units, *a, **k)))
    real["head"] = refit_mod.with_head_weights
    monkeypatch.setattr(refit_mod, "with_head_weights", lambda m, w, b: heads.append((w, b)) or real["head"](m, w, b))
    (out / "evaluation.json").unlink(missing_ok=True)
    ev = pipeline.evaluate(cfg)
    monkeypatch.undo()
    assert ev["variants"]["ablated_dfr_tuned"] == tuned["units"]
    chosen = ordered[:tuned["chosen_n"]]
    # DFR alone (N = 0) and the tuned N are the curve's own fits, stored by the ablation stage: not fitted again
    headline = tuple(map(tuple, abl["variants"]["description"]["units"]))
    assert set(dfr_models) == {headline} - {tuple(ordered[:n]) for n in ns}, "evaluate re-fitted a stored DFR fit"
    assert ev["dfr"]["dfr"]["stored"].startswith(stage_mod.DFR_FITS)
    curve_units = {tuple(ordered[:n]) for n in ns}  # the stored heads evaluate took, in its order, are the
    # independent fits' heads
    order = list(dict.fromkeys(u for u in [(), headline or None, tuple(chosen)] if u in curve_units))
    want = [models[len(u)][0].fc for u in order]
    assert len(heads) == len(want) and all(torch.equal(w, h.weight) and torch.equal(b, h.bias)
                                           for (w, b), h in zip(heads, want)), "a stored head is not the curve's fit"
    tests = test_sets(cfg, lm.preprocess, lm.class_names)
    for vname, n in (("ablated_dfr_tuned", tuned["chosen_n"]), ("dfr", 0)):
        model, e = models[n]  # its figures measured again with the independent fit
        for sname, (ds, set_names, _) in tests.items():
            p = predict(model, list(loader(cfg, ds)), dev, e, class_index=class_index(lm, set_names),
                        keep_logits=False, progress=False)
            acc = accuracy_report(p.preds, p.labels, p.groups, 0, cfg.seed)["acc"]
            assert ev["results"][vname][sname]["acc"] == pytest.approx(acc, abs=1e-12), (vname, sname)
    # fits stored under another key (made for other inputs: see the next test) are never used: fitted again
    from neuroscribe import io as io_mod
    from safetensors.torch import load_file
    fits = out / stage_mod.DFR_FITS
    io_mod.save_tensors(fits, load_file(str(fits)), {"key": "another job", "units": json.dumps(
        {str(n): [list(u) for u in ordered[:n]] for n in ns})})
    dfr_models.clear()
    monkeypatch.setattr(refit_mod, "dfr_last_layer", lambda m, units, *a, **k: dfr_models.setdefault(
        tuple(map(tuple, units)), real["fit"](m, units, *a, **k)))
    (out / "evaluation.json").unlink()
    again = pipeline.evaluate(cfg)
    monkeypatch.undo()
    assert set(dfr_models) == {(), headline, tuple(chosen)} and "stored" not in again["dfr"]["dfr"]
    assert again["results"] == ev["results"], "a fit made again differs from the stored one"


def test_stored_dfr_fits_are_keyed_by_everything_a_fit_reads(job):
    """A stored DFR head (dfr-fits.safetensors) is reused only by a job whose fit would read the same: another seed,
    batch size, DFR setting, training section or definition of the shift DFR fits on gives another key."""
    from neuroscribe.ablate.stage import dfr_fits_key
    cfg, _ = job
    cfg = cfg.model_copy(update={"ablate": cfg.ablate.model_copy(update={"dfr": "wrong-text"})})

    def with_(**kw):
        return cfg.model_copy(update=kw)
    shifts = [s.model_copy(update={"data": s.data.model_copy(update={"limit": 30})}) if s.name == "wrong-text" else s
              for s in cfg.shifts]
    others = [with_(seed=cfg.seed + 1), with_(batch_size=cfg.batch_size + 1), with_(shifts=shifts),
              with_(ablate=cfg.ablate.model_copy(update={"dfr_toward": "head"})),
              with_(ablate=cfg.ablate.model_copy(update={"dfr_train": 0.5})),
              with_(ablate=cfg.ablate.model_copy(update={"dfr_retrains": 3})),
              with_(train=cfg.train.model_copy(update={"fraction": 0.25}))]
    key = dfr_fits_key(cfg, "ablation")
    assert key == dfr_fits_key(with_(evaluate=cfg.evaluate.model_copy(update={"bootstrap": 7})), "ablation")
    assert dfr_fits_key(cfg, "another ablation") != key
    assert len({key, *(dfr_fits_key(c, "ablation") for c in others)}) == len(others) + 1


def test_the_warm_start_of_fits_with_training_photos_is_in_their_keys(job, monkeypatch):
    """Fits with ``dfr_train`` photos are warm-started (not bit for bit the cold fits): a change of that rule gives
    their stored fits and evaluation another key; jobs without training photos, which fit cold, keep theirs."""
    from neuroscribe.ablate import refit as refit_mod
    from neuroscribe.ablate.stage import dfr_fits_key
    cfg, _ = job
    cold = cfg.model_copy(update={"ablate": cfg.ablate.model_copy(update={"dfr": "wrong-text"})})
    warm = cold.model_copy(update={"ablate": cold.ablate.model_copy(update={"dfr_train": 0.5})})
    before = [dfr_fits_key(c, "ablation") for c in (cold, warm)] + [refit_mod.dfr_rule(c) for c in (cold, warm)]
    monkeypatch.setattr(refit_mod, "DFR_WARM_RULE", "another warm start")
    after = [dfr_fits_key(c, "ablation") for c in (cold, warm)] + [refit_mod.dfr_rule(c) for c in (cold, warm)]
    assert before[0] == after[0] and before[2] == after[2] == refit_mod.DFR_RULE
    assert before[1] != after[1] and before[3] != after[3]


def test_ablation_key_follows_the_dfr_rule_only_where_the_stage_fits_dfr(job, monkeypatch):
    """ablation.json holds the ``dfr_ns`` curve's DFR fits: a job that sets dfr_ns gets another ablation key when
    DFR's rule (its C grid) changes, and a job without dfr_ns keeps its key (the stage fits no DFR)."""
    from neuroscribe.ablate import refit as refit_mod, stage as stage_mod
    cfg, _ = job
    pipeline.flag(cfg)
    keys = []

    class Seen(Exception):
        pass

    def current(path, key):
        keys.append(key)
        raise Seen  # the key is all this test reads: the stage stops before any work
    monkeypatch.setattr(stage_mod.io, "current", current)
    tuned = cfg.model_copy(update={"ablate": cfg.ablate.model_copy(update={"dfr": "holdout", "dfr_ns": [0, 2]})})
    for rule in (refit_mod.DFR_RULE, "another DFR rule"):
        monkeypatch.setattr(refit_mod, "DFR_RULE", rule)
        for c in (cfg, tuned):
            with pytest.raises(Seen):
                pipeline.ablate(c)
    plain, with_ns, plain_other, with_ns_other = keys
    assert plain == plain_other, "a job that fits no DFR in the ablate stage changed its key with DFR's rule"
    assert with_ns != with_ns_other, "the dfr_ns curve's key ignores DFR's rule"
    assert with_ns != plain

def test_clean_tolerance_chooses_among_the_n_that_keep_clean_validation_accuracy(job):
    cfg, out = job
    pipeline.flag(cfg)
    free = pipeline.ablate(cfg)
    main = free["variants"]["description"]
    assert free["validation"]["clean"] * 2 == free["validation"]["n"] and free["clean_tolerance"] is None
    assert [n for n, _ in main["clean_curve"]] == [n for n, _ in main["curve"]]
    strict = cfg.model_copy(update={"ablate": cfg.ablate.model_copy(update={"clean_tolerance": 0.0})})
    abl = pipeline.ablate(strict)
    assert abl["key"] != free["key"] and abl["clean_tolerance"] == 0.0
    v = abl["variants"]["description"]
    clean = dict(v["clean_curve"])
    assert v["curve"] == main["curve"] and v["clean_curve"] == main["clean_curve"]  # same passes, another choice
    ok = [(a, -n) for n, a in v["curve"] if clean[n] >= clean[0]]
    assert v["chosen_n"] == -max(ok)[1] and clean[v["chosen_n"]] >= clean[0]
    assert abl["controls"]["n"] == v["chosen_n"]
    pipeline.evaluate(strict)
    pipeline.report(strict)
    sel = json.loads((out / "report.json").read_text())["ablation"]["selection"]
    assert "at most 0 points of clean validation accuracy" in sel
    assert f"{clean[v['chosen_n']]:.1%} at the chosen N" in sel
    no_clean = strict.model_copy(update={"ablate": strict.ablate.model_copy(update={"validation": "wrong-text"})})
    with pytest.raises(ValueError, match="ablate.clean_tolerance is set, but the validation set .* holds no clean"):
        pipeline.ablate(no_clean)



def test_progress_false_in_the_config_silences_loading_bars_through_the_python_api(job):
    from transformers.utils import logging as hf_logging
    cfg, _ = job
    assert cfg.progress is False
    for stage in (describe, pipeline.flag):  # the stages that load Hugging Face models (current here: no work)
        hf_logging.enable_progress_bar()
        try:
            stage(cfg)
            assert not hf_logging.is_progress_bar_enabled(), stage.__name__
        finally:
            hf_logging.enable_progress_bar()


def test_several_seeds_run_one_job_each_and_aggregate(tmp_path, monkeypatch):
    """run() with train.seeds = [0, 1, 2]: one complete job per seed, then mean and t-CI over seeds."""
    import numpy as np
    from scipy import stats
    calls = []

    def fake_run_one(cfg):
        s = cfg.train.seeds[0]
        calls.append((s, cfg.out))
        acc = {0: 0.5, 1: 0.6, 2: 0.7}[s]
        rep = {"variants": {
            "base": {"results": {"wrong-text": {"acc": acc, "lo": acc, "hi": acc, "n": 10}}},
            "random": {"draws": [{"results": {"wrong-text": {"acc": acc - d / 100}}} for d in range(5)]}}}
        cfg.out.mkdir(parents=True, exist_ok=True)
        (cfg.out / "report.json").write_text(json.dumps(rep))
        return {"json": str(cfg.out / "report.json")}
    monkeypatch.setattr(pipeline, "_run_one", fake_run_one)
    cfg = load_config(None, {"train": {"seeds": [0, 1, 2]}, "out": str(tmp_path / "job")})
    out = pipeline.run(cfg)
    assert [s for s, _ in calls] == [0, 1, 2]
    assert [o.name for _, o in calls] == ["seed0", "seed1", "seed2"]
    agg = json.loads(open(out["json"]).read())["results"]
    base = agg["base"]["wrong-text"]
    a = np.array([0.5, 0.6, 0.7])
    assert base["mean"] == pytest.approx(0.6)
    assert base["ci95_half"] == pytest.approx(stats.t.ppf(0.975, 2) * a.std(ddof=1) / np.sqrt(3))
    assert agg["random"]["wrong-text"]["mean"] == pytest.approx(0.58)
    assert "60.0% ±" in open(out["md"]).read()


def test_run_log_times_each_stage_and_names_the_one_that_failed(tmp_path, monkeypatch):
    """_run_one appends one row to JOBDIR/runs.jsonl per run, every stage timed in pipeline order -- also when a
    stage fails, which the row names, and the rows of earlier runs are kept."""
    seen = []

    def stage(name):
        def fn(cfg):
            seen.append(name)
            if name == "describe":
                time.sleep(0.2)  # a stage that takes a while shows it
            if name == "ablate" and fail:
                raise RuntimeError("ablate broke")
            return cfg if name == "train" else {"json": "report.json"} if name == "report" else None
        return fn
    names = ["train", "with_probe", "record", "describe", "flag", "ablate", "evaluate", "report"]
    for n in names:
        monkeypatch.setattr(pipeline, n, stage(n))
    cfg = load_config(None, {"out": str(tmp_path / "job")})
    fail = True
    with pytest.raises(RuntimeError, match="ablate broke"):
        pipeline._run_one(cfg)
    fail = False
    assert pipeline._run_one(cfg) == {"json": "report.json"}
    rows = [json.loads(x) for x in (tmp_path / "job" / "runs.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["failed in ablate", "complete"]
    stages = ["train", "probe", "record", "describe", "flag", "ablate", "evaluate", "report"]
    assert list(rows[0]["seconds"]) == stages[:6] and list(rows[1]["seconds"]) == stages
    assert seen == names[:6] + names
    assert all(r["threads"] == torch.get_num_threads() and r["machine"] for r in rows)
    for r in rows:  # the seconds are each stage's own: describe's sleep, and no more than the run's total
        assert r["seconds"]["describe"] >= 0.2 > r["seconds"]["record"]
        assert r["total"] >= sum(r["seconds"].values()) - 0.02


def test_run_log_tells_an_interrupt_from_an_error_and_never_breaks_the_run(tmp_path, capsys):
    """Ctrl-C in a stage is 'interrupted in STAGE'; an error outside any stage is 'failed'; a run log that cannot be
    written is reported on stderr and neither fails a finished run nor hides a stage's own error."""
    out = tmp_path / "job"
    out.mkdir()

    def ctrl_c():
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        with pipeline.stage_clock(out) as timed:
            timed("train", lambda: None)
            timed("record", ctrl_c)
    with pytest.raises(ValueError, match="between"):
        with pipeline.stage_clock(out) as timed:
            timed("train", lambda: None)
            raise ValueError("between stages")
    with pytest.raises(KeyboardInterrupt):
        with pipeline.stage_clock(out) as timed:
            timed("train", lambda: None)
            ctrl_c()  # Ctrl-C between stages
    rows = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["interrupted in record", "failed", "interrupted"]
    assert list(rows[0]["seconds"]) == ["train", "record"] and list(rows[1]["seconds"]) == ["train"]
    (out / "runs.jsonl").unlink()
    (out / "runs.jsonl").mkdir()  # the log's path is taken: it cannot be written
    with pipeline.stage_clock(out) as timed:
        assert timed("train", lambda: 7) == 7  # the run finishes
    assert "run log" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="the stage's own"):
        with pipeline.stage_clock(out) as timed:
            timed("train", lambda: (_ for _ in ()).throw(RuntimeError("the stage's own error")))


def test_run_log_is_written_by_the_main_process_only(tmp_path, monkeypatch):
    """Under torchrun every rank runs the stages; only rank 0 adds the run's row (else one row per rank)."""
    out = tmp_path / "job"
    out.mkdir()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")  # torchrun's environment of the second rank (no process group needed)
    with pipeline.stage_clock(out) as timed:
        timed("train", lambda: None)
    assert not (out / "runs.jsonl").exists()
    monkeypatch.setenv("RANK", "0")
    with pipeline.stage_clock(out) as timed:
        timed("train", lambda: None)
    assert len((out / "runs.jsonl").read_text().splitlines()) == 1


def test_export_edited_bakes_units_into_loadable_weights(tmp_path):
    """ablation.json's units baked into a torchvision ResNet-18's weights load back as checkpoint:PATH and
    give the same logits as hook ablation."""
    import torch
    from neuroscribe.ablate.edit import ablated
    from neuroscribe.models import load_model
    job = tmp_path / "job"
    job.mkdir()
    base = load_model("torchvision:resnet18@none", num_classes=4)
    ck = tmp_path / "m.safetensors"
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in base.module.state_dict().items()}, str(ck))
    units = [["layer4.1.bn2", 5], ["layer3.0.conv1", 2]]
    (job / "ablation.json").write_text(json.dumps({"variants": {"description": {"units": units}}}))
    cfg = load_config(None, {"model": {"spec": f"checkpoint:{ck}", "arch": "torchvision:resnet18",
                                       "num_classes": 4}, "out": str(job)})
    out = pipeline.export_edited(cfg, tmp_path / "edited.safetensors")
    edited = load_model(f"checkpoint:{out}")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), ablated(base.module, {"layer4.1.bn2": [5], "layer3.0.conv1": [2]}):
        want = base.module(x)
    with torch.no_grad():
        got, unedited = edited.module(x), base.module(x)
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(unedited, want, atol=1e-5)  # the ablation moves these logits: a no-op bake would fail


def test_probe_from_training_photos_leaves_out_the_validation_holdout(job):
    """The probe (and evidence, re-fit) sets built from the training data never contain the held-out validation
    photos: all 400 training photos as the probe, and none of the trained job's holdout in it."""
    import csv
    from pathlib import Path
    from neuroscribe.datasets.sets import held_out
    cfg, out = job
    shifts = [s.model_copy(update={"data": s.data.model_copy(update={"limit": None})}) if s.name == "train-text"
              else s for s in cfg.shifts]
    probe_cfg = pipeline.with_probe(cfg.model_copy(update={"shifts": shifts}))
    holdout = held_out(out)
    assert len(holdout) == json.loads((out / "train.json").read_text())["holdout_n"] >= 25  # ~25% of 120 photos
    with open(probe_cfg.data.root) as fh:
        sources = {Path(r["source"]).resolve() for r in csv.DictReader(fh)}
    assert len(sources) == 400 - len(holdout) and not sources & holdout


def test_dfr_train_adds_the_trained_photos_to_every_dfr_fit_and_never_the_holdout(job, monkeypatch):
    """``ablate.dfr_train``: that share of the photos the model trained on (class-stratified), each clean and again
    with the cue naming a random class, joins every DFR fit (the dfr_ns curve and evaluate alike); no held-out photo
    is among them; the default (0) adds nothing. ``ablate.dfr_retrains`` reaches every one of those fits."""
    from pathlib import Path
    from neuroscribe.ablate import refit as refit_mod
    from neuroscribe.ablate.stage import DFR_FITS, model_and_means
    from neuroscribe.config import ConfigError
    from neuroscribe.datasets.probe import open_probe_set
    from neuroscribe.datasets.sets import InMemory, dfr_train_set, held_out
    cfg, out = job
    with pytest.raises(ConfigError, match="ablate.dfr_train adds training photos to DFR's fit: set ablate.dfr"):
        load_config(None, {"ablate": {"dfr_train": 0.5}})
    lm = model_and_means(cfg)[0]
    assert dfr_train_set(cfg, lm.preprocess) is None
    cfg = cfg.model_copy(update={"ablate": cfg.ablate.model_copy(update={"dfr": "holdout", "dfr_train": 0.5,
                                                                         "dfr_ns": [0, 1], "dfr_retrains": 2})})
    ds, desc = dfr_train_set(cfg, lm.preprocess)
    split = json.loads(next((out / "train").glob("seed*/split.json")).read_text())
    d = cfg.train.data
    probe = open_probe_set(d.root, d.format, d.split, d.limit, seed=cfg.train.data_seed)
    trained = {Path(probe.samples[i].path).resolve(): int(probe.samples[i].label) for i in split["train_ids"]}
    n = len(ds) // 2
    assert n == round(0.5 * len(trained)) and len(ds) == 2 * n and f"{n} training photos (50%" in desc
    photos = [Path(s.path).resolve() for s in ds.samples]
    assert photos[:n] == photos[n:] and set(photos) <= set(trained) and not set(photos) & held_out(out)
    assert [s.label for s in ds.samples[:n]] == [trained[p] for p in photos[:n]] == [s.label for s in ds.samples[n:]]
    assert [s.group for s in ds.samples] == ["clean"] * n + ["cued"] * n
    per_class = [sum(s.label == c for s in ds.samples[:n]) for c in set(trained.values())]
    assert max(per_class) - min(per_class) <= 1, per_class  # class-stratified
    for i in range(n):  # the cue drawn on every cued copy, the label kept
        (xc, yc, gc), (xq, yq, gq) = ds[i], ds[n + i]
        assert yc == yq and (gc, gq) == ({"group": "clean"}, {"group": "cued"}) and not torch.equal(xc, xq)
    named = [p["cue_class"] for p in ds.cued.plan()]
    assert 0 < sum(c == s.label for c, s in zip(named, ds.samples)) < n  # a random class: sometimes the right one
    extras, slices, retrains = [], [], []
    real = refit_mod.dfr_last_layer
    monkeypatch.setattr(refit_mod, "dfr_last_layer", lambda *a, **k: extras.append(k.get("extra")) or slices.append(
        a[2]) or retrains.append(k.get("retrains")) or real(*a, **k))
    pipeline.flag(cfg)
    (out / "ablation.json").unlink(missing_ok=True)
    pipeline.ablate(cfg)
    (out / DFR_FITS).unlink()  # evaluate fits every DFR variant itself here (its reuse of the curve's: the dfr_ns test)
    (out / "evaluation.json").unlink(missing_ok=True)
    ev = pipeline.evaluate(cfg)
    monkeypatch.undo()
    assert len(extras) >= 3 and all(e is not None and e.samples == ds.samples for e in extras)  # curve (2) + evaluate
    # each stage reads the slice and the training photos once for all its fits (held in memory, the same items)
    assert all(isinstance(d, InMemory) for d in extras + slices)
    assert extras[0] is extras[1] and slices[0] is slices[1] and extras[-1] is not extras[0]
    assert all(torch.equal(extras[0][i][0], ds[i][0]) for i in (0, n, len(ds) - 1))
    assert ev["dfr"]["dfr"]["extra"] == len(ds) and ev["dfr"]["training_photos"] == desc
    assert retrains == [2] * len(extras) and ev["dfr"]["dfr"]["final"]["retrains"] == 2
    (out / "ablation.json").unlink(missing_ok=True)  # the other tests' settings rebuild theirs
    (out / "evaluation.json").unlink(missing_ok=True)


def test_flag_quality_against_counterfactual_truth_on_a_test_set(job):
    """evaluation.json scores every flag set against counterfactual ground truth measured on the planted-cue test set
    (class-stratified pairs, never the first images of the class-sorted folder): recomputed here independently."""
    import numpy as np
    from sklearn.metrics import roc_auc_score
    from neuroscribe.ablate.flag import cue_effect, cue_pairs
    from neuroscribe.ablate.measure import description_ranking
    from neuroscribe.datasets.sets import test_sets
    from neuroscribe.datasets.splits import stratified_sample
    from neuroscribe.runtime import job_model
    cfg, out = job
    pipeline.flag(cfg)
    pipeline.ablate(cfg)
    q = pipeline.evaluate(cfg)["flag_quality"]
    assert q["test_set"] == "wrong-text" and q["n_images"] == cfg.flag.evidence_images == 20
    assert len(q["per_class"]) == 10 and set(q["per_class"].values()) == {2}  # 2 per class, not 20 tench
    lm, dev = job_model(cfg)
    ds = test_sets(cfg, lm.preprocess, lm.class_names)["wrong-text"][0]
    ids = stratified_sample([y for _, y in ds.samples], 20, cfg.seed, purpose="flag truth")
    effect = cue_effect(lm.module, {l: None for l in cfg.layers}, cue_pairs(ds, lm.preprocess.to_tensor(), ids, 20),
                        device=dev)
    truth = set()
    for layer in cfg.layers:
        e = sorted((-v, u) for (l, u), v in effect.items() if l == layer)  # largest effect first, ties by unit
        truth |= {(layer, u) for _, u in e[:round(0.05 * len(e))]}
    assert q["truth"] == len(truth) == round(0.05 * 256) + round(0.05 * 512) and q["units"] == 768
    flags = json.loads((out / "flags.json").read_text())
    for name, units in flags["sets"].items():
        got = {tuple(u) for u in units}
        s = q["sets"][name]
        assert s["flagged"] == len(got) and s["share"] == pytest.approx(len(got) / 768)
        assert s["true_positives"] == len(got & truth)
        assert s["recall"] == pytest.approx(len(got & truth) / len(truth))
        assert s["precision"] == (pytest.approx(len(got & truth) / len(got)) if got else None)
    # the description ranking, rebuilt from the raw artifacts: words that name the cue first (verification is off in
    # this fixture, so naming is flagging), then the verification response; no embedder, so no cosine
    from neuroscribe.ablate.flag import keyword_matches
    desc = {(r["layer"], r["unit"]): r["description"] for r in
            (json.loads(x) for x in (out / "descriptions.jsonl").read_text().splitlines() if x.strip())}
    ver = {(v["layer"], v["unit"]): v["response"] for v in
           json.loads(next((out / "describe").glob("*/verify.json")).read_text())["units"]}
    key = {u: (bool(keyword_matches(d, cfg.flag.cues["picked"])), -np.inf if ver.get(u) is None else ver[u])
           for u, d in desc.items()}
    units = sorted(u for u in key if u in effect)
    levels = sorted(set(key.values()))
    assert q["sets"]["description"]["auc"] == pytest.approx(roc_auc_score(
        [u in truth for u in units], [levels.index(key[u]) for u in units]))
    rank = description_ranking(out)
    assert all((rank[a] < rank[b]) == (key[a] < key[b]) for a in units for b in units)
    assert all(rank[tuple(u)] > rank[v] for u in flags["sets"]["description"] for v in rank
               if list(v) not in flags["sets"]["description"])  # flagged words rank above every other unit
    assert 0 <= q["sets"]["description"]["auc"] <= 1 and np.isfinite(q["sets"]["description"]["auc"])
    # beside it, the same share over all units at once (the same effects; the literal rule)
    e = sorted((-v, u) for u, v in effect.items())
    pooled = {u for _, u in e[:round(0.05 * 768)]}
    p = q["pooled"]
    assert p["truth"] == len(pooled) == 38 and {tuple(u) for u in p["truth_units"]} == pooled
    assert p["truth_per_layer"] == {l: sum(x == l for x, _ in pooled) for l in cfg.layers}
    for name, members in flags["sets"].items():
        got = {tuple(u) for u in members}
        assert p["sets"][name]["true_positives"] == len(got & pooled)
        assert p["sets"][name]["recall"] == pytest.approx(len(got & pooled) / 38)
        assert p["sets"][name]["precision"] == (pytest.approx(len(got & pooled) / len(got)) if got else None)
    assert 0 < sum(u in pooled for u in units) < len(units)  # both classes present: the AUC below is defined
    assert p["sets"]["description"]["auc"] == pytest.approx(roc_auc_score(
        [u in pooled for u in units], [levels.index(key[u]) for u in units]))
    pipeline.report(cfg)  # the report carries it: json as evaluated, a table in report.md and report.html
    rq = json.loads((out / "report.json").read_text())["flag_quality"]
    assert {k: v for k, v in rq.items() if k not in ("sets", "pooled")} == \
        {k: v for k, v in q.items() if k not in ("sets", "pooled")}
    for got, want in ((rq, q), (rq["pooled"], q["pooled"])):
        assert {k: {f: x for f, x in v.items() if x is not None} for k, v in got["sets"].items()} == \
            {k: {f: x for f, x in v.items() if x is not None} for k, v in want["sets"].items()}
    d = q["sets"]["description"]
    precision = "—" if d["precision"] is None else f"{100 * d['precision']:.1f}"
    row = f"| description | {d['flagged']} | {100 * d['share']:.1f} | {precision} | {100 * d['recall']:.1f} | "
    for name in ("report.md", "report.html"):
        assert "Flag quality on wrong-text (%)" in (out / name).read_text()
    assert row in (out / "report.md").read_text()
    pd = q["pooled"]["sets"]["description"]
    pooled_row = (f"| description (pooled truth: 38 units, {q['pooled']['rule']}) | {pd['flagged']} | "
                  f"{100 * pd['share']:.1f} | ")
    assert pooled_row in (out / "report.md").read_text()


def test_train_checkpoint_is_a_loadable_copy_of_the_jobs_model(job, tmp_path):
    """``train.checkpoint``: the trained model and its spec copied there ({seed} filled in), loadable by spec."""
    import torch
    from neuroscribe.models import load_model
    from neuroscribe.train.stage import copy_checkpoint
    cfg, out = job
    info = json.loads((out / "train.json").read_text())
    copy = out.parent / "models" / "text-0.safetensors"
    assert info["copy"] == str(copy)
    assert copy.read_bytes() == (out / "train" / "seed0" / "model.safetensors").read_bytes()
    assert copy.with_name(copy.name + ".spec.json").read_bytes() == \
        (out / "train" / "seed0" / "model.safetensors.spec.json").read_bytes()
    a, b = load_model(f"checkpoint:{copy}").module, load_model(f"checkpoint:{info['checkpoint']}").module
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(ValueError, match="must name a .safetensors file"):
        copy_checkpoint(copy, copy, tmp_path / "model.pt", 0)
    assert copy_checkpoint(copy, copy, tmp_path / "x-{seed}.safetensors", 3) == tmp_path / "x-3.safetensors"
    several = cfg.model_copy(update={"out": str(tmp_path / "seeds"), "train": cfg.train.model_copy(
        update={"seeds": [0, 1], "checkpoint": tmp_path / "one.safetensors"})})
    with pytest.raises(ValueError, match=r"one file for seeds \[0, 1\].*Put \{seed\} in its name"):
        pipeline.run(several)  # refused before any work: each seed's copy would overwrite the last
    assert not (tmp_path / "seeds").exists()
