"""The demo/study orchestration end to end on a tiny job: ``benchmarks/milan_study.py``'s ``main`` (two training
seeds) drives ``neuroscribe.pipeline.run`` with a ``train:`` section and a ``probe:`` shift, so ``run`` ->
``_run_one`` -> ``train`` / ``with_probe`` / record / describe / flag / ablate / evaluate / report run for real,
then the study's helpers (``final_layer_check``, ``flag_truth``, ``collect``, the aggregate, ``verdict`` and
``markdown``). ResNet-18 trained for one epoch at 32 px on 40 shipped photos, 3 described units per layer."""
from __future__ import annotations

import csv
import importlib.util
import itertools
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from neuroscribe import pipeline
from neuroscribe.config import load_config
from neuroscribe.datasets.probe import manifest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TEXT = {"kind": "text", "size": 0.3, "position": "bottom-left"}
SETS = ("in-distribution", "wrong-text", "wrong-text-new-style")
PROBE_N, TEST_N, SHARE, UNITS = 12, 12, 0.05, 3
STAGES = pipeline.STAGES
JOB = {
    "train": {"arch": "torchvision:resnet18", "data": {"split": "train", "limit": 40}, "cue": TEXT, "fraction": 0.5,
              "holdout": 0.25, "resolution": 32, "epochs": 1, "batch_size": 16, "seeds": [0, 1]},
    "layers": ["layer3", "layer4"],
    "data": {"split": "val", "limit": TEST_N},
    "record": {"k": 2},
    "describe": {"units": UNITS, "faithfulness_images": 0, "gallery": False, "tagger": {"ocr": False},
                 "verify": {"enabled": False}},  # verification is tested in test_verify, test_pipeline
    "probe": "train-text",
    "shifts": [
        {"name": "train-text", "data": {"split": "train", "limit": PROBE_N}, "cue": TEXT, "fraction": 0.5,
         "correlation": "match", "seed": 0},
        {"name": "wrong-text", "data": {"split": "val", "limit": TEST_N}, "cue": TEXT, "fraction": 1.0,
         "correlation": "wrong"},
        {"name": "wrong-text-new-style", "data": {"split": "val", "limit": TEST_N},
         "cue": {**TEXT, "position": "top-right", "colour": "yellow", "background": None, "stroke": 0.08},
         "fraction": 1.0, "correlation": "wrong"},
    ],
    # an embedding threshold of -1 flags every described unit, so no flag set is empty whatever a one-epoch model's
    # units are described as (the description -> flag rule itself is test_flag's business)
    "flag": {"embedding_threshold": -1.0, "evidence_shift": "train-text", "evidence_images": 8},
    "ablate": {"max_units": 2, "max_candidates": 3, "validation": "holdout", "control_candidates": 4,
               "refit": True},
    "evaluate": {"bootstrap": 50},
    "progress": False, "workers": 0, "batch_size": 16, "device": "cpu",
}


def _study_module():
    spec = importlib.util.spec_from_file_location("milan_study", ROOT / "benchmarks" / "milan_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_study_refuses_one_checkpoint_file_for_several_seeds_before_any_work(tmp_path, monkeypatch):
    """The study runs its seeds one by one (each a one-seed job), so pipeline.run's own check would come only after
    every seed had overwritten the same file: the script checks first."""
    from neuroscribe import pipeline
    config = tmp_path / "tiny.yaml"
    train = dict(JOB["train"], seeds=[0, 1], checkpoint=str(tmp_path / "one.safetensors"))
    config.write_text(yaml.safe_dump(dict(JOB, train=train, out=str(tmp_path / "job"))))
    def forbidden(*a, **k):
        raise AssertionError("the study started work")
    for stage in ("run", "train"):
        monkeypatch.setattr(pipeline, stage, forbidden)
    with pytest.raises(ValueError, match=r"one file for seeds \[0, 1\].*Put \{seed\} in its name"):
        _study_module().main(["--config", str(config), "--reference-seeds", "", "--results", str(tmp_path / "r")])
    assert not (tmp_path / "job").exists() and not (tmp_path / "one.safetensors").exists()


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    config = tmp / "tiny.yaml"
    config.write_text(yaml.safe_dump(dict(JOB, out=str(tmp / "job"))))
    ms = _study_module()
    results = tmp / "results" / "study"
    assert ms.main(["--config", str(config), "--reference-seeds", "", "--results", str(results)]) == 0
    cfg = load_config(config)
    return ms, cfg, json.loads(results.with_suffix(".json").read_text()), results.with_suffix(".md").read_text()


def test_results_name_the_command_that_made_them(study):
    ms, cfg, res, md = study
    cmd = shlex.split(res["command"])
    assert cmd[:2] == ["python", "benchmarks/milan_study.py"] and cmd[cmd.index("--config") + 1].endswith("tiny.yaml")
    assert cmd[cmd.index("--reference-seeds") + 1] == ""  # the fixture ran without a reference
    assert cmd[cmd.index("--results") + 1].endswith("results/study")
    assert res["command"] in md


def test_each_seed_job_has_every_stage_artifact(study):
    ms, cfg, res, _ = study
    for s in (0, 1):
        job = Path(cfg.out) / f"seed{s}"
        for name in ("train.json", "record.json", "describe.json", "descriptions.jsonl", "flags.json",
                     "ablation.json", "evaluation.json", "report.json", "report.md", "report.html"):
            assert (job / name).is_file(), f"seed {s}: {name} missing"
        train = json.loads((job / "train.json").read_text())
        assert Path(train["checkpoint"]).is_file() and f"seed{s}" in train["checkpoint"]
        # the job as run (its test data, not the probe the record stage was given), to rerun any stage from
        as_run = load_config(job / "config.yaml")
        assert as_run.data == cfg.data and as_run.train.seeds == [s] and as_run.out == job
        assert load_config(job / "record" / "config.yaml").data.root.name == "manifest.csv"  # the probe set
        assert train["train_n"] + train["holdout_n"] == 40 and len(train["history"]) == 1  # one epoch
        abl = json.loads((job / "ablation.json").read_text())
        # chosen on the held-out training photos
        assert "the name of a random WRONG class" in abl["validation"]["description"]
        assert abl["validation"]["n"] == 2 * train["holdout_n"]  # each held-out photo clean and cued
        ev = json.loads((job / "evaluation.json").read_text())
        assert set(ev["test_sets"]) == set(SETS)  # the probe shift is never a test set
        assert {"base", "ablated", "ablated_evidence", "ablated_both", "sort_all"} <= set(ev["results"])
        # MILAN's re-fit variant (last layer re-fit on the probe photos) exists when units were ablated
        assert ("refit" in ev["results"]) == bool(abl["variants"]["description"]["units"])
        # the per-seed table the study reports is the job's own report
        rep = json.loads((job / "report.json").read_text())
        for v in ("base", "ablated", "sort_all"):
            for st in SETS:
                assert res["per_seed"][str(s)]["accuracy"][v][st] == rep["variants"][v]["results"][st]["acc"]
        assert res["per_seed"][str(s)]["chosen_n"] == {k: v["chosen_n"] for k, v in abl["variants"].items()}
    # pipeline.run over both seeds wrote the across-seed summary
    seeds = json.loads((Path(cfg.out) / "seeds.json").read_text())
    assert seeds["seeds"] == [0, 1]
    base = seeds["results"]["base"]["wrong-text"]
    assert base["n_seeds"] == 2 and base["mean"] == pytest.approx(np.mean(list(base["per_seed"].values())))


def test_probe_set_is_written_once_in_the_models_field_of_view_and_recorded(study):
    ms, cfg, _, _ = study
    job = Path(cfg.out) / "seed0"
    probe_dir = job / "probe" / "train-text"
    rows = list(csv.DictReader(open(probe_dir / "manifest.csv", newline="", encoding="utf-8")))
    # PROBE_N training photos drawn, less those the trained model holds out as its validation set
    from neuroscribe.datasets.sets import held_out
    holdout = held_out(job)
    assert holdout and not {Path(r["source"]).resolve() for r in rows} & holdout
    n_probe = len(rows)
    assert 0 < n_probe <= PROBE_N and (probe_dir / "probe.json").is_file()
    cued = [r for r in rows if r["has_cue"] == "1"]
    names = json.loads((ROOT / "neuroscribe" / "data" / "sample" / "classes.json").read_text())
    names = [names[w] for w in sorted(names)]
    assert 0 < len(cued) < n_probe  # the true class name written on about half of them
    assert all(r["cue_class"] == r["label"] and r["cue_token"] == names[int(r["label"])] for r in cued)
    # the model's field of view at the view size (224 px for a 32 px model), the cue drawn there; record reads them
    # through a preprocess that resizes them to the model's 32 px crop
    assert json.loads((probe_dir / "probe.json").read_text())["view_size"] == 224
    assert not list(probe_dir.rglob("*.png"))  # kept as what redraws it (tests/test_planted.py), not as copies
    # the recording (and so every view and description) is of the probe photos, not of data: (clean val photos)
    from neuroscribe.record import Recording
    rec = Recording.open(job)
    assert Path(rec.meta["data_root"]).resolve() == probe_dir.resolve() and rec.meta["n_images"] == n_probe
    assert [p.resolve() for p in rec.image_paths] == [s.path.resolve() for s in
                                                       manifest(probe_dir / "manifest.csv").samples]
    first = rec.exemplars("layer4", 0)[0]
    stored = manifest(probe_dir / "manifest.csv").load(first.image_id)
    assert stored.size == (224, 224)
    assert rec.preprocess.resize == rec.preprocess.crop == 32 and rec.image(first.image_id).size == (32, 32)
    assert np.array_equal(np.asarray(rec.image(first.image_id, rec.view_size)), np.asarray(stored))
    described = [json.loads(line) for line in (job / "descriptions.jsonl").read_text().splitlines() if line]
    assert {(r["layer"], r["unit"]) for r in described} == {(l, u) for l in cfg.layers for u in range(UNITS)}
    assert all(set(r["exemplar_ids"]) <= set(range(n_probe)) for r in described)


def test_rerun_reuses_every_stage(study, monkeypatch):
    """A second run of a finished seed is all cache hits: nothing is trained, materialised or recomputed."""
    ms, cfg, _, _ = study
    sub = ms.seed_cfg(cfg, 0)
    job = Path(sub.out)
    before = {p: p.read_bytes() for p in job.rglob("*") if p.is_file()}

    def forbidden(*a, **k):
        raise AssertionError("a current stage ran again")

    from neuroscribe.train import classifier as train_mod
    from neuroscribe.datasets import shifts
    monkeypatch.setattr(train_mod, "_train_epoch", forbidden)
    monkeypatch.setattr(train_mod, "_decode_all", forbidden)
    from neuroscribe.datasets import planted
    monkeypatch.setattr(shifts, "materialise", forbidden)
    monkeypatch.setattr(planted, "write_planted", forbidden)  # the probe is planted once
    pipeline.run(sub)
    after = {p: p.read_bytes() for p in job.rglob("*") if p.is_file()}
    assert set(after) == set(before)
    changed = sorted(str(p.relative_to(job)) for p in before if after[p] != before[p])
    # the report is rebuilt from the stage artifacts each run, the run log gains a row; every other file is as it was
    assert all(c.startswith("report.") or c in ("curve.png", "runs.jsonl") for c in changed), changed
    runs = job / "runs.jsonl"
    old, new = before[runs].decode().splitlines(), after[runs].decode().splitlines()
    assert new[:-1] == old and len(new) == len(old) + 1  # appended, nothing rewritten
    row = json.loads(new[-1])
    assert row["status"] == "complete" and list(row["seconds"]) == list(STAGES)
    assert ms.collect(sub, 0.0, None, {})["stage_seconds"] == row["seconds"]  # the study reads the run just made


def test_study_helpers_report_what_the_jobs_hold(study):
    ms, cfg, res, md = study
    for s in ("0", "1"):  # the pipeline's stage clock: the study run's row, from scratch, every stage timed
        rows = [json.loads(x) for x in (Path(cfg.out) / f"seed{s}" / "runs.jsonl").read_text().splitlines()]
        assert len(rows) >= 2  # the seed's run, the aggregate run over both seeds (every stage current), any rerun
        assert all(r["status"] == "complete" and list(r["seconds"]) == list(STAGES) for r in rows)
        assert sum(rows[0]["seconds"].values()) <= rows[0]["total"] + 0.05  # rounded to 0.01 s each
        assert rows[0]["total"] <= res["per_seed"][s]["seconds"] + 0.1
        assert res["per_seed"][s]["stage_seconds"] == rows[0]["seconds"]  # collected after the seed's own run
        tables = sys.modules["study_tables"]  # the per-seed line lists them in pipeline order, also once key-sorted
        line = tables.stage_minutes(json.loads(json.dumps(rows[0]["seconds"], sort_keys=True)))
        assert [part.split()[0] for part in line.strip(" ()").split(", ")] == list(STAGES) and line in md
    truth_per_layer = {"layer3": 256, "layer4": 512}
    for s in ("0", "1"):
        per = res["per_seed"][s]
        job = Path(cfg.out) / f"seed{s}"
        flags = json.loads((job / "flags.json").read_text())
        truth = per["flag_truth"]  # the job's own flag quality (evaluation.json), truth on the wrong-text test set
        assert truth == json.loads((job / "evaluation.json").read_text())["flag_quality"]
        assert truth["test_set"] == "wrong-text" and truth["n_images"] == cfg.flag.evidence_images
        assert truth["truth"] == sum(max(1, round(SHARE * n)) for n in truth_per_layer.values())
        assert truth["units"] == sum(truth_per_layer.values())
        units = {tuple(u) for u in truth["truth_units"]}  # kept, so descriptions can be read against the truth
        assert len(units) == truth["truth"] and {l for l, _ in units} == set(truth_per_layer)
        assert set(truth["sets"]) == set(flags["sets"]) == {"description", "evidence", "both"}
        for name, row in truth["sets"].items():
            assert row["flagged"] == len(flags["sets"][name])
            assert row["share"] == pytest.approx(row["flagged"] / truth["units"])
            assert row["recall"] == pytest.approx(row["true_positives"] / truth["truth"])
            assert row["true_positives"] == len({tuple(u) for u in flags["sets"][name]} & units)
            if row["flagged"]:
                assert row["precision"] == pytest.approx(row["true_positives"] / row["flagged"])
        auc = truth["sets"]["description"].get("auc")  # absent when the described units hold no truth unit
        assert auc is None or 0 <= auc <= 1
        final = per["final_layer_check"]  # fc logits described on the probe photos, one per class
        assert final and final["layer"] == "fc" and 0 < final["classes"] <= 10
        assert (job / "final-layer" / "describe.json").is_file()
        assert per["final_layer"] == ms.final_layer_summary(final) and per["final_layer"]["units"] == final["classes"]
        assert per["final_layer"]["named"] == round(final["accuracy"] * final["classes"])
        assert per["validation"]["n"] == 2 * json.loads((job / "train.json").read_text())["holdout_n"]
    # the aggregate is the mean of the seeds, gains are paired per seed
    for v in ("base", "ablated", "random", "sort_all"):
        for st in SETS:
            vals = [res["per_seed"][s]["accuracy"][v][st] for s in ("0", "1")]
            assert res["aggregate"]["accuracy"][v][st]["mean"] == pytest.approx(np.mean(vals))
    gain = [res["per_seed"][s]["accuracy"]["ablated"]["wrong-text"]
            - res["per_seed"][s]["accuracy"]["base"]["wrong-text"] for s in ("0", "1")]
    assert res["aggregate"]["gain"]["ablated"]["wrong-text"]["mean"] == pytest.approx(np.mean(gain))
    for k in ("flagged", "share", "precision", "recall", "auc"):  # the issue's flags.description fields
        vals = [v for s in ("0", "1") if (v := res["per_seed"][s]["flag_truth"]["sets"]["description"].get(k))
                is not None]
        got = res["aggregate"]["flags"]["description"][k]["mean"]
        assert got == (pytest.approx(np.mean(vals)) if vals else None)
    for k in ("flagged", "precision", "recall"):  # the same share of all units at once, labelled beside it
        vals = [v for s in ("0", "1") if (v := res["per_seed"][s]["flag_truth"]["pooled"]["sets"]["description"][k])
                is not None]
        got = res["aggregate"]["flags_pooled"]["description"][k]["mean"]
        assert got == (pytest.approx(np.mean(vals)) if vals else None)
    assert "ranking AUC" in md and "| description, pooled truth |" in md
    assert res["config"]["n_probe"] == PROBE_N and res["config"]["seeds"] == [0, 1]
    assert res["config"]["n_test"] == TEST_N and res["reference"] == []
    # no reference: no share of the gap to judge; the clean cost, flags and MILAN's figure still are
    assert not any("of the gap" in x for x in res["verdict"]) and res["verdict"][-1].startswith("MILAN (section 7)")
    assert any(x.startswith("clean val change, ablated: flagged by descriptions") for x in res["verdict"])
    assert any(x.startswith("description flags (means over seeds): share") for x in res["verdict"])
    assert md.startswith("# MILAN section 7 on Imagenette") and md.count("- seed ") >= 4
    assert f"{100 * res['aggregate']['accuracy']['base']['wrong-text']['mean']:.1f}" in md


def test_flag_truth_only_measures_the_flags_again_on_the_finished_jobs(study, tmp_path, monkeypatch):
    """``--flag-truth-only`` on results made before the pooled truth existed: the per-layer figures come out as
    stored (else it stops), the pooled variant is added as a fresh run would have it, the ranking AUC is the one
    measured now (its per-seed values and their mean); nothing is trained."""
    import neuroscribe.ablate.measure as measure
    ms, cfg, res, _ = study
    real, measured = measure.flag_quality, itertools.cycle([0.6, 0.8])  # the fixture's own AUC is undefined:
    def with_auc(*args, **kw):                                  # the redo must carry what the measure gives
        q = real(*args, **kw)
        q["sets"]["description"]["auc"] = next(measured)
        return q
    monkeypatch.setattr(measure, "flag_quality", with_auc)
    old = json.loads(json.dumps(res))
    for row in old["per_seed"].values():
        row["flag_truth"].pop("pooled")
    old["aggregate"].pop("flags_pooled")
    old["per_seed"]["0"]["flag_truth"]["sets"]["description"]["auc"] = 0.5  # an older ranking rule's AUC
    old["aggregate"]["flags"]["description"]["auc"] = {"mean": 0.5, "ci95_half": None, "n": 1}  # ... and its mean
    (tmp_path / "old.json").write_text(json.dumps(old))
    config = Path(cfg.out).parent / "tiny.yaml"
    assert ms.main(["--config", str(config), "--results", str(tmp_path / "old"), "--flag-truth-only"]) == 0
    new = json.loads((tmp_path / "old.json").read_text())
    # the ranking's AUC is not a figure the flags must reproduce: measured again with the current rule, the stored
    # one replaced by it, seed by seed, and the aggregate's mean with them
    assert [new["per_seed"][s]["flag_truth"]["sets"]["description"].pop("auc") for s in ("0", "1")] == [0.6, 0.8]
    assert new["aggregate"]["flags"]["description"].pop("auc") == pytest.approx(ms.mean_ci([0.6, 0.8]))
    assert {k: v for k, v in res["aggregate"]["flags"]["description"].items() if k != "auc"} == \
        new["aggregate"]["flags"]["description"]
    assert {k: v for k, v in new["aggregate"]["flags"].items() if k != "description"} == \
        {k: v for k, v in res["aggregate"]["flags"].items() if k != "description"}
    assert new["aggregate"]["flags_pooled"] == res["aggregate"]["flags_pooled"]
    for s in ("0", "1"):  # every other figure as stored (a copy: the fixture is shared)
        want = json.loads(json.dumps(res["per_seed"][s]["flag_truth"]))
        want["sets"]["description"].pop("auc", None)
        assert new["per_seed"][s]["flag_truth"] == want
    assert "| description, pooled truth |" in (tmp_path / "old.md").read_text()
    cmd = shlex.split(new["flag_truth_command"])  # the redo names what it ran on, so it can be run again
    assert new["flag_truth_command"] in (tmp_path / "old.md").read_text()
    assert cmd[:3] == ["python", "benchmarks/milan_study.py", "--flag-truth-only"]
    assert Path(cmd[cmd.index("--config") + 1]).resolve() == config.resolve()
    assert Path(cmd[cmd.index("--results") + 1]).resolve() == (tmp_path / "old").resolve()
    old["per_seed"]["0"]["flag_truth"]["sets"]["description"]["true_positives"] += 1  # results that disagree
    (tmp_path / "old.json").write_text(json.dumps(old))
    with pytest.raises(SystemExit, match="seed 0: the recomputed truth gives other flag figures"):
        ms.main(["--config", str(config), "--results", str(tmp_path / "old"), "--flag-truth-only"])


def test_markdown_survives_an_empty_flag_set(study):
    ms, cfg, res, _ = study
    res = json.loads(json.dumps(res))
    seed = res["per_seed"]["0"]
    seed["curves"]["description"], seed["chosen_n"]["description"], seed["candidates"]["description"] = \
        [[0, None]], 0, 0
    assert "- seed 0, description: -" in ms.markdown(res)  # an empty flag set's curve: no crash, a dash


def test_the_test_set_names_come_from_the_config(study):
    """Another cue kind's study (configs/milan_study_patch.yaml) names its test sets itself: the results and tables
    follow the config's shift names, never a hard-coded 'wrong-text'."""
    ms, cfg, res, _ = study
    assert res["sets"] == list(SETS)
    renamed = {"wrong-text": "wrong-patch", "wrong-text-new-style": "wrong-patch-new-style"}
    text = json.dumps(res)
    for old, new in sorted(renamed.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(f'"{old}"', f'"{new}"')
    other = json.loads(text)
    try:
        ms.use_sets(other["sets"][1:])
        other["verdict"] = ms.verdict(other)
        md = ms.markdown(other)
    finally:
        ms.use_sets(SETS[1:])
    assert "| variant | clean val | wrong-patch val | wrong-patch-new-style val |" in md
    assert "wrong-text val" not in md
    assert other["sets"] == ["in-distribution", "wrong-patch", "wrong-patch-new-style"]


def test_gap_closed_share_per_seed_against_the_reference(study):
    ms = study[0]
    acc = lambda base, abl: {"accuracy": {"base": {"wrong-text": base}, "ablated": {"wrong-text": abl}}}  # noqa: E731
    per = {"0": acc(0.2, 0.5), "1": acc(0.3, 0.45)}
    refs = [{"results": {"in-distribution": {"acc": 0.9}, "wrong-text": {"acc": 0.75}}},
            {"results": {"in-distribution": {"acc": 0.8}, "wrong-text": {"acc": 0.85}}}]
    closed, protocol = ms.gap_closed_share(per, refs, ["ablated"])
    # reference wrong-text 0.8: seed 0 closes 0.3 of 0.6, seed 1 0.15 of 0.5
    assert closed["ablated"]["mean"] == pytest.approx((0.5 + 0.3) / 2) and closed["ablated"]["n"] == 2
    assert protocol["reference_drop"]["mean"] == pytest.approx((0.15 - 0.05) / 2)
    assert ms.gap_closed_share(per, [], ["ablated"]) == ({}, {})
    agg = study[2]["aggregate"]["final_layer"]
    assert agg["clean"] is None and agg["text"]["per_seed"] == [study[2]["per_seed"][s]["final_layer"]["named"]
                                                                for s in ("0", "1")]
    res = json.loads(json.dumps(study[2]))
    res["aggregate"]["gap_closed"], res["protocol"] = closed, protocol
    assert "| ablated: flagged by descriptions (headline) | 40.0 ± " in ms.markdown(res)


def test_paired_gap_closed_against_each_seeds_strongest_control(study):
    ms = study[0]

    def acc(base, abl, best_random, sort_all, dfr, abl_dfr):
        return {"accuracy": {"base": {"wrong-text": base}, "ablated": {"wrong-text": abl},
                             "random_range": {"wrong-text": [base - 0.01, best_random]},
                             "sort_all": {"wrong-text": sort_all}, "dfr": {"wrong-text": dfr},
                             "ablated_dfr": {"wrong-text": abl_dfr}}}
    per = {"0": acc(0.2, 0.5, 0.26, 0.2, 0.4, 0.6), "1": acc(0.3, 0.45, 0.3, 0.35, 0.5, 0.45)}
    refs = [{"results": {"in-distribution": {"acc": 0.9}, "wrong-text": {"acc": 0.8}}}]
    got = ms.paired_gap_closed(per, refs)
    # gaps 0.6 and 0.5; the best random draw, not the mean, is subtracted
    assert got["ablated - best random draw"]["mean"] == pytest.approx((0.24 / 0.6 + 0.15 / 0.5) / 2)
    assert got["ablated - sort-all"]["mean"] == pytest.approx((0.3 / 0.6 + 0.1 / 0.5) / 2)
    assert got["ablated + DFR - DFR alone"]["mean"] == pytest.approx((0.2 / 0.6 - 0.05 / 0.5) / 2)
    assert got["ablated - sort-all"]["n"] == 2 and ms.paired_gap_closed(per, []) == {}
    del per["1"]["accuracy"]["dfr"]  # a variant missing in one seed: no comparison rather than a partial mean
    assert "ablated + DFR - DFR alone" not in ms.paired_gap_closed(per, refs)


def _verdict_of(ms, shares: dict, base=0.2, ref=0.7):
    """The verdict of hand-made seeds: ``shares[variant]`` = that variant's share of the gap per seed (gap 0.5)."""
    n = len(shares["ablated"])
    per = {}
    for k in range(n):
        wrong = {v: base + 0.5 * sh[k] for v, sh in shares.items()}
        acc = {v: {s: (w if s == ms.SETS[1] else 0.6) for s in ms.SETS} for v, w in {"base": base, **wrong}.items()}
        acc["random_range"] = {s: [0.0, base + 0.5 * shares["random"][k]] for s in ms.SETS}
        per[str(k)] = {"accuracy": acc}
    refs = [{"results": {"in-distribution": {"acc": 0.8}, ms.SETS[1]: {"acc": ref}}}]
    variants = list(shares)
    gain = {v: {s: ms.mean_ci([per[k]["accuracy"][v][s] - per[k]["accuracy"]["base"][s] for k in per])
                for s in ms.SETS} for v in variants}
    res = {"per_seed": per, "reference": refs,
           "aggregate": {"gain": gain, "gap_closed": ms.gap_closed_share(per, refs, variants)[0]}}
    return {line.split(" ")[0] + " " + line.split(" ")[1]: line for line in ms.verdict(res)}


def test_verdict_judges_every_part_of_a_target(study):
    ms = study[0]
    z = [0.0, 0.0, 0.0]
    met = _verdict_of(ms, {"ablated": [0.40, 0.45, 0.50], "random": [0.01, 0.0, 0.02], "sort_all": z,
                           "dfr": [0.40, 0.42, 0.44], "ablated_dfr": [0.62, 0.65, 0.70]})
    lo = lambda a, b: (m := ms.mean_ci(np.subtract(a, b)))["mean"] - m["ci95_half"]  # noqa: E731
    want = lo([0.40, 0.45, 0.50], [0.01, 0.0, 0.02])
    assert want > 0 and met["description-chosen ablation"].endswith(
        f": met (mean >= 30 %; paired lower end {100 * want:+.1f} > 0)")
    assert met["ablation +"].endswith("Target >= 60 % and above DFR alone: met")
    # the mean reaches 30 % but one seed carries it: the paired lower end is below 0, so the target is not met
    wide = _verdict_of(ms, {"ablated": [0.90, 0.0, 0.0], "random": z, "sort_all": z,
                            "dfr": [0.5, 0.5, 0.5], "ablated_dfr": [0.9, 0.5, 0.45]})
    assert "closes 30.0 ±" in wide["description-chosen ablation"]
    want = lo([0.90, 0.0, 0.0], z)
    assert want < 0 and wide["description-chosen ablation"].endswith(
        f"NOT met (mean >= 30 %; paired lower end {100 * want:+.1f})")
    assert wide["ablation +"].endswith("Target >= 60 % and above DFR alone: NOT met")  # mean 61.7 %, not above DFR
    # one seed: no interval, so nothing that names a CI can be met
    one = _verdict_of(ms, {"ablated": [0.6], "random": [0.0], "sort_all": [0.0]})
    assert "no interval" in one["description-chosen ablation"] and "NOT met" in one["description-chosen ablation"]
    # a seed whose model is not below the reference has no gap: no share, rather than a huge one
    per = {"0": {"accuracy": {"base": {ms.SETS[1]: 0.8}, "ablated": {ms.SETS[1]: 0.9}}},
           "1": {"accuracy": {"base": {ms.SETS[1]: 0.2}, "ablated": {ms.SETS[1]: 0.5}}}}
    refs = [{"results": {"in-distribution": {"acc": 0.9}, ms.SETS[1]: {"acc": 0.7}}}]
    closed = ms.gap_closed_share(per, refs, ["ablated"])[0]["ablated"]
    assert closed["n"] == 1 and closed["mean"] == pytest.approx(0.6)


def test_markdown_keeps_the_variant_order_after_a_json_round_trip(study):
    """--markdown-only reads the JSON back (written with sorted keys): its tables keep the order of the run's."""
    ms, res = study[0], study[2]
    first = ms.markdown(res)
    again = ms.markdown(json.loads(json.dumps(res, sort_keys=True)))
    assert again == first
    rows = [line.split(" | ")[0][2:] for line in first.split("Gain over the unablated")[1].splitlines()
            if line.startswith("| ") and not line.startswith("| variant")]
    order = [v for v in ms.VARIANTS if v in res["aggregate"]["gain"]]
    assert sorted(order) != order  # else sorted keys could not disorder them and this test would prove nothing
    assert rows[:len(order)] == [ms.LABEL[v] for v in order]


def test_clean_reference_is_checked_on_the_probe_photos_without_the_cue(study, tmp_path):
    """The clean-trained reference's fc logits are described on the probe's photos with nothing drawn on them, and
    ``--final-layer-only`` redoes every final-layer check of a finished study from its jobs."""
    from neuroscribe.datasets.probe import open_probe_set
    from neuroscribe.record import Recording
    ms, cfg, res, _ = study
    ref = ms.reference(cfg, 0)
    final, summary = ref["final_layer_check"], ref["final_layer"]
    assert final["layer"] == "fc" and summary == ms.final_layer_summary(final) and summary["units"] == final["classes"]
    rec = Recording.open(Path(cfg.out) / "reference" / "seed0" / "final-layer")
    assert not rec.meta.get("planted") and rec.meta["model"].endswith("reference/seed0/model.safetensors")
    d = next(s for s in cfg.shifts if s.name == cfg.probe).data
    photos = open_probe_set(d.root, d.format, d.split, d.limit, cfg.seed).samples
    assert {p.resolve() for p in rec.image_paths} == {s.path.resolve() for s in photos}
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    results = tmp_path / "study"
    res = json.loads(json.dumps(res))
    res["reference"] = [{k: v for k, v in ref.items() if not k.startswith("final_layer")}]
    results.with_suffix(".json").write_text(json.dumps(res))
    assert ms.main(["--config", str(config), "--results", str(results), "--final-layer-only"]) == 0
    redone = json.loads(results.with_suffix(".json").read_text())
    assert redone["reference"][0]["final_layer"] == summary  # the same jobs, described again: the same words
    cmd = shlex.split(redone["final_layer_command"])
    assert cmd[:3] == ["python", "benchmarks/milan_study.py", "--final-layer-only"]
    assert Path(cmd[cmd.index("--results") + 1]).resolve() == results.resolve()
    agg = redone["aggregate"]["final_layer"]
    assert agg["clean"]["per_seed"] == [summary["named"]] and agg["clean"]["units"] == summary["units"]
    assert agg["text"]["per_seed"] == [redone["per_seed"][s]["final_layer"]["named"] for s in ("0", "1")]
    assert "clean-trained reference seed 0 (probe photos without the cue)" in results.with_suffix(".md").read_text()


def _truth_tool(monkeypatch):
    """``tools/truth_vs_descriptions.py`` loaded, with the test images each truth reads (``drawn``), the test sets
    they come from and the effects measured recorded in order: ``(tool, drawn, sets_read, effects)``."""
    from neuroscribe.ablate import flag as flag_mod
    spec = importlib.util.spec_from_file_location("truth_tool", ROOT / "tools" / "truth_vs_descriptions.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    drawn, sets_read, effects, pairs, effect_of = [], [], [], flag_mod.cue_pairs, flag_mod.cue_effect

    def recording_pairs(ds, transform, indices=None, batch_size=32):
        drawn.append(list(indices))
        sets_read.append(ds)
        return pairs(ds, transform, indices, batch_size)

    def recording_effect(*args, **kwargs):
        effects.append(effect_of(*args, **kwargs))
        return effects[-1]
    monkeypatch.setattr(flag_mod, "cue_pairs", recording_pairs)
    monkeypatch.setattr(flag_mod, "cue_effect", recording_effect)
    return tool, drawn, sets_read, effects


def _assert_replicate_scored(rep: dict, truth: set, effect: dict) -> None:
    """The replicate truth's agreement with ``truth``: units shared by their top shares, and the AUC with which the
    replicate's own effects rank ``truth``."""
    from sklearn.metrics import roc_auc_score
    from neuroscribe.ablate.measure import top_share
    assert rep["shared"] == len(top_share(effect, sorted({l for l, _ in effect})) & truth)
    units = sorted(effect)
    assert rep["auc"] == pytest.approx(roc_auc_score([u in truth for u in units], [effect[u] for u in units]))


def test_truth_replicate_by_default_keeps_the_stage_truth_and_draws_beside_its_sample(study, tmp_path, monkeypatch):
    """``--replicate`` without ``--truth-images``: the truth is the evaluate stage's own (its sample, its units), and
    the replicate is the next class-stratified draw of as many images, disjoint from it."""
    from neuroscribe.datasets.splits import stratified_sample
    ms, cfg, _, _ = study
    job = Path(cfg.out) / "seed0"
    tool, drawn, sets_read, effects = _truth_tool(monkeypatch)
    out = tmp_path / "truth.json"
    monkeypatch.setattr("sys.argv", ["truth_vs_descriptions.py", str(job), "--replicate", "--out", str(out)])
    tool.main()
    r = json.loads(out.read_text())["replicate"]
    stored = json.loads((job / "evaluation.json").read_text())["flag_quality"]
    labels, seed = [y for _, y in sets_read[0].samples], load_config(job / "config.yaml", {}).seed
    assert len(drawn) == 2  # the stage's truth, recomputed; then the replicate alone
    assert drawn[0] == stratified_sample(labels, stored["n_images"], seed, purpose="flag truth")
    assert drawn[1] == stratified_sample(labels, stored["n_images"], seed, exclude=drawn[0],
                                         purpose="flag truth replicate")
    assert r["disjoint"] and r["first_images"] == stored["n_images"] and r["n_images"] == len(drawn[1])
    if len(drawn[1]) < stored["n_images"]:  # the fixture's small test set: the replicate is all that is left, said so
        assert len(drawn[0]) + len(drawn[1]) == len(labels) and "note" in r
    truth = {tuple(u) for u in stored["truth_units"]}
    assert {tuple(u) for u in r["truth_units"]} == truth
    _assert_replicate_scored(r["replicate_truth"], truth, effects[1])


def test_truth_replicate_draws_a_disjoint_sample_and_scores_every_set_against_the_first(study, tmp_path, monkeypatch):
    """``tools/truth_vs_descriptions.py --replicate --truth-images N --probe`` on a finished seed that described a
    few units per layer: the stage's truth recomputed (the tool refuses figures other than evaluation.json's), then
    two disjoint class-stratified samples of N test images, the second measured first; the second truth's agreement
    with the first, and the flag sets against the first; the probe runs on the described units only."""
    ms, cfg, _, _ = study
    job = Path(cfg.out) / "seed0"
    tool, drawn, sets_read, effects = _truth_tool(monkeypatch)
    out, n = tmp_path / "truth.json", TEST_N // 2
    monkeypatch.setattr("sys.argv", ["truth_vs_descriptions.py", str(job), "--replicate", "--truth-images", str(n),
                                     "--probe", "--probe-images", "8", "--out", str(out)])
    tool.main()
    res = json.loads(out.read_text())
    r = res["replicate"]
    assert len(drawn) == 3 and len(drawn[0]) == cfg.flag.evidence_images  # the stage's truth, then the two draws
    assert len(drawn[1]) == len(drawn[2]) == n and not set(drawn[1]) & set(drawn[2])
    assert r["disjoint"] and r["first_images"] == r["n_images"] == n and "note" not in r
    assert sum(r["per_class"].values()) == sum(r["first_per_class"].values()) == n
    flags = json.loads((job / "flags.json").read_text())["sets"]
    truth = {tuple(u) for u in r["truth_units"]}
    assert len(truth) == r["truth"] == sum(max(1, round(SHARE * n)) for n in (256, 512))  # per layer, as the stage
    for name, row in r["flag_sets"].items():
        assert row["true_positives"] == len({tuple(u) for u in flags[name]} & truth)
    # which draw is which: the first truth is the stage's own draw at size n, the replicate the next one beside it
    from neuroscribe.ablate.measure import top_share
    from neuroscribe.datasets.splits import stratified_sample
    labels, seed = [y for _, y in sets_read[2].samples], load_config(job / "config.yaml", {}).seed
    assert drawn[2] == stratified_sample(labels, n, seed, purpose="flag truth")
    assert drawn[1] == stratified_sample(labels, n, seed, exclude=drawn[2], purpose="flag truth replicate")
    layers = sorted({l for l, _ in effects[1]})
    assert truth == top_share(effects[2], layers)  # the truth is the first draw's, the replicate's is compared to it
    rep = r["replicate_truth"]
    assert rep["flagged"] == r["truth"] and rep["precision"] == rep["recall"] == rep["shared"] / r["truth"]
    _assert_replicate_scored(rep, truth, effects[1])
    p = res["probe"]  # every described unit tested, none other; scored against the N-image truth too
    assert p["images"] == 8 and p["units"] == 2 * UNITS and f"truth_{n}_images" in p


def test_merge_carries_the_seeds_not_rerun_and_the_references_of_an_earlier_run(study, tmp_path):
    """``--merge OLD.json``: this run's seeds replace OLD's, OLD's other seeds and (when this run has no reference)
    its references join them as stored, and every aggregate is computed over the union; the JSON and the Markdown
    say what came from where."""
    ms, cfg, res, _ = study
    old = json.loads(json.dumps(res))
    old["per_seed"]["0"]["accuracy"]["base"]["wrong-text"] = 0.123  # only the stored seed 0 can carry this value
    old["per_seed"]["1"]["accuracy"]["base"]["wrong-text"] = 0.999  # ... and seed 1, rerun, must not
    ref = {"seed": 5, "results": {s: {"acc": a, "lo": a, "hi": a, "n": TEST_N} for s, a in zip(SETS, (0.6, 0.5, 0.4))},
           "seconds": 1.0, "train_seconds": 1.0, "final_layer_check": None, "final_layer": None}
    old["reference"] = [ref]
    old["merged_from"] = {"file": "older.json", "finished": "then", "command": "c", "seeds": [3], "references": [7]}
    old["flag_truth_command"] = "python benchmarks/milan_study.py --flag-truth-only"
    (tmp_path / "old.json").write_text(json.dumps(old))
    config = Path(cfg.out).parent / "tiny.yaml"
    out = tmp_path / "merged"
    assert ms.main(["--config", str(config), "--set", "train.seeds=[1]", "--reference-seeds", "",
                    "--results", str(out), "--merge", str(tmp_path / "old.json")]) == 0
    new = json.loads(out.with_suffix(".json").read_text())
    assert list(new["per_seed"]) == ["0", "1"] and new["config"]["seeds"] == [0, 1]
    assert new["per_seed"]["0"] == old["per_seed"]["0"]
    assert new["per_seed"]["1"]["accuracy"] == res["per_seed"]["1"]["accuracy"]  # measured again: as the fixture's
    assert new["aggregate"]["accuracy"]["base"]["wrong-text"]["mean"] == pytest.approx(
        (0.123 + res["per_seed"]["1"]["accuracy"]["base"]["wrong-text"]) / 2)
    assert new["reference"] == [ref] and new["aggregate"]["accuracy"]["reference"]["wrong-text"]["mean"] == 0.5
    assert new["protocol"]["reference_drop"]["mean"] == pytest.approx(0.1)  # clean 0.6 - wrong-text 0.5
    m = new["merged_from"]
    assert m["seeds"] == [0] and m["references"] == [5] and m["command"] == res["command"]
    assert "--merge" in shlex.split(new["command"])
    assert m["merged_from"] == old["merged_from"] and m["flag_truth_command"] == old["flag_truth_command"]
    md = out.with_suffix(".md").read_text()
    assert "Merged (`--merge`): seeds 0 and references 5" in md
    assert "itself merged seeds 3 and references 7 from the run of then (older.json)" in md
    assert "flag quality as measured again there: python benchmarks/milan_study.py --flag-truth-only" in md
