"""`neuroscribe run` on the shipped group configs (configs/waterbirds.yaml, configs/celeba.yaml) pointed at tiny
fixtures in exactly those formats (tests/group_data.py: shipped photos, the cue drawn on the cue group's images):
train, record on the data's own train split (a probe without a planted cue), describe, flag by descriptions and by
group evidence, ablate with controls on the val split, re-fit the last layer, evaluate on test and report, with
worst-group and average-group accuracy in report.json. Sizes are cut with --set to fit 2 CPU cores."""
import json
from pathlib import Path

import pytest

import group_data
from neuroscribe.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMALL = ["train.epochs=1", "train.resolution=64", "train.batch_size=16", "train.data.limit=null",
         "layers=[layer4]", "record.k=3", "describe.units=2", "describe.faithfulness_images=0",
         "describe.gallery=false", "describe.verify.enabled=false", "describe.tagger.ocr=false",
         "flag.embedder=null", "flag.group_images=16", "flag.group_top=0.05", "ablate.max_units=3",
         "ablate.max_candidates=4", "ablate.control_candidates=6", "evaluate.bootstrap=100", "workers=0",
         "batch_size=16", "progress=false"]


@pytest.mark.parametrize("fmt", ["waterbirds", "celeba"])
def test_run_on_a_group_format_job_reports_worst_group_accuracy(fmt, tmp_path):
    if fmt == "waterbirds":
        meta = group_data.waterbirds(tmp_path / "wb", per_class=12)
        text = (CONFIGS / "waterbirds.yaml").read_text().replace("data/waterbirds_v1.0/metadata.csv", str(meta))
    else:
        root = group_data.celeba(tmp_path / "celeba", per_class=12)
        text = (CONFIGS / "celeba.yaml").read_text().replace("data/celeba", str(root))
    job = tmp_path / f"{fmt}.yaml"
    job.write_text(text)
    out = tmp_path / "job"
    extra = []
    if fmt == "waterbirds":  # DFR on the val split; N chosen on a holdout of the training images instead
        extra = ["ablate.dfr=wb-val", "ablate.validation=holdout", "train.holdout=0.25"]
    sets = [a for s in SMALL + extra + [f"out={out}"] for a in ("--set", s)]
    assert main(["run", str(job), *sets]) == 0
    flags = json.loads((out / "flags.json").read_text())
    ge = flags["group_evidence"]
    assert ge["cue_group"] == ("water" if fmt == "waterbirds" else "Male") and len(ge["units"]) == 512
    assert "group" in flags["sets"] and "description" in flags["sets"]
    abl = json.loads((out / "ablation.json").read_text())
    assert {"description", "group"} <= set(abl["variants"]) and len(abl["controls"]["random"]) == 5
    # the flag sets scored against group evidence measured on the TEST split (the ground truth, never a choice)
    fq = json.loads((out / "evaluation.json").read_text())["flag_quality"]
    assert fq["test_set"] == "in-distribution" and fq["units"] == 512 and fq["truth"] <= 512 * 0.05 + 1
    assert {"description", "group"} <= set(fq["sets"])
    assert fq["truth"] >= 1 and fq["n_images"] >= 4
    for name, q in fq["sets"].items():
        assert q["flagged"] == len(flags["sets"][name]) and q["share"] == q["flagged"] / 512
        assert q["precision"] is None or 0 <= q["precision"] <= 1
    rep = json.loads((out / "report.json").read_text())
    assert (out / "probe" / ("wb-train" if fmt == "waterbirds" else "celeba-train") / "manifest.csv").is_file()
    test = rep["variants"]["base"]["results"]["in-distribution"]
    assert len(test["groups"]) == 4 and test["n"] == sum(g["n"] for g in test["groups"].values())
    assert test["worst_group"]["acc"] == min(g["acc"] for g in test["groups"].values())
    assert test["worst_group"]["lo"] <= test["worst_group"]["acc"] <= test["worst_group"]["hi"]
    assert test["avg_group"]["lo"] <= test["avg_group"]["acc"] <= test["avg_group"]["hi"]
    for variant in ("ablated", "ablated_group", "sort_all", "refit_only"):  # before and after each edit
        assert "worst_group" in rep["variants"][variant]["results"]["in-distribution"]
    assert rep["variants"]["refit_only"]["n_units"] == 0  # the re-fit alone (DFR's edit), nothing ablated
    if abl["variants"]["description"]["units"]:
        assert "refit" in rep["variants"]  # both: ablation, then the re-fit
    ev = json.loads((out / "evaluation.json").read_text())
    h = rep["headline"]  # no shifted test set here: the worst-group accuracy gain of the description ablation
    assert h["metric"] == "worst-group accuracy" and h["set"] == "in-distribution" and h["random_draws"] == 5
    res = rep["variants"]["ablated"]["results"]["in-distribution"]["worst_group"]["acc"]
    assert h["gain"] == pytest.approx(100 * (res - test["worst_group"]["acc"]))
    if fmt == "waterbirds":  # DFR alone and after the ablation, with its group-balanced fit and chosen C
        assert "dfr" in rep["variants"] and ev["dfr"]["shift"] == "wb-val"
        assert "worst_group" in rep["variants"]["dfr"]["results"]["in-distribution"]
        d = ev["dfr"]["dfr"]
        assert d["fit"] == d["fit_per_cell"] * len(d["fit_cells"]) and set(d["fit_cells"]) <= set(d["cells"])
        assert ("ablated_dfr" in rep["variants"]) == bool(abl["variants"]["description"]["units"])
    else:
        assert "dfr" not in ev
