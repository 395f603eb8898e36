"""Group evidence (ablate/groups.py): the class-stratified AUC of a unit for the cue group vs the rest of each class,
with a bootstrap CI, and the stages on a Waterbirds-format job made on disk: group flags a variant of their own
beside the description flags, ablated and evaluated with worst- and average-group accuracy and their CIs."""
import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

import group_data
from neuroscribe import pipeline
from neuroscribe.ablate.groups import group_flags, stratified_auc
from neuroscribe.config import load_config


def test_stratified_auc_compares_within_each_class_only():
    """A unit that follows the label separates cue from rest over the pooled set (the cue goes with class 1) but
    not within a class: its stratified AUC is 0.5. A unit that follows the cue scores 1; a noisy one matches the
    per-class Mann-Whitney AUCs weighted by their pairs (sklearn's roc_auc_score per class)."""
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 40)
    cue = np.r_[rng.random(40) < 0.2, rng.random(40) < 0.8]
    noisy = cue + rng.normal(0, 1.0, 80)
    acts = np.stack([labels.astype(float), cue.astype(float), noisy, rng.normal(0, 1, 80)], 1)
    r = stratified_auc(acts, labels, cue, bootstrap=300, seed=3)
    assert roc_auc_score(cue, acts[:, 0]) > 0.75 and r["auc"][0] == pytest.approx(0.5)
    assert r["auc"][1] == pytest.approx(1.0)
    pairs = [(cue[labels == c].sum() * (~cue[labels == c]).sum()) for c in (0, 1)]
    want = sum(p * roc_auc_score(cue[labels == c], noisy[labels == c]) for c, p in zip((0, 1), pairs)) / sum(pairs)
    assert r["auc"][2] == pytest.approx(want)
    assert np.all(r["lo"] <= r["auc"] + 1e-12) and np.all(r["auc"] <= r["hi"] + 1e-12)
    assert r["lo"][2] > 0.5 and r["lo"][0] == r["hi"][0] == 0.5  # constant within each class: ties, always 0.5
    assert r["lo"][3] < 0.5 < r["hi"][3]  # unrelated to the cue
    again = stratified_auc(acts, labels, cue, bootstrap=300, seed=3)
    assert np.array_equal(again["lo"], r["lo"])
    assert r["per_class"] == {0: {"cue": int(cue[:40].sum()), "rest": int((~cue[:40]).sum())},
                              1: {"cue": int(cue[40:].sum()), "rest": int((~cue[40:]).sum())}}
    assert stratified_auc(acts, labels, cue, bootstrap=0)["lo"] is None
    with pytest.raises(ValueError, match="both in and out of the cue group"):
        stratified_auc(acts, labels, labels == 1)


def test_group_flags_top_share_with_interval_above_half():
    auc = {("a", 0): (0.9, 0.8, 0.97), ("a", 1): (0.7, 0.45, 0.9), ("a", 2): (0.6, 0.55, 0.65),
           ("a", 3): (0.2, 0.1, 0.3), ("b", 0): (0.55, 0.52, 0.6), ("b", 1): (0.4, 0.3, 0.5)}
    got = group_flags(auc, 0.5)  # top 2 of layer a, top 1 of layer b
    assert set(got) == {("a", 0), ("b", 0)}  # a:1 is second in a but its interval reaches 0.5
    assert "ranks 1 of 4 in layer 'a'" in got[("a", 0)]
    assert set(group_flags({k: (a, None, None) for k, (a, _, _) in auc.items()}, 0.5)) == {("a", 0), ("a", 1),
                                                                                          ("b", 0)}


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A Waterbirds-format job on disk: probe = the train split (written as it is), validation = val, test = test."""
    tmp = tmp_path_factory.mktemp("wbjob")
    meta = group_data.waterbirds(tmp / "wb", per_class=16)
    split = lambda s: {"root": str(meta), "format": "waterbirds", "split": s}  # noqa: E731
    cfg = load_config(None, {
        "model": {"spec": "torchvision:resnet18@none", "num_classes": 2}, "layers": ["layer1", "layer2"],
        "preprocess": {"resize": 64, "crop": 64}, "data": split("test"), "record": {"k": 3},
        "shifts": [{"name": "wb-train", "data": split("train")}, {"name": "wb-val", "data": split("val")}],
        "probe": "wb-train", "describe": {"units": 2, "faithfulness_images": 0, "gallery": False,
                                          "verify": {"enabled": False}, "tagger": {"ocr": False}},
        "flag": {"embedder": None, "verified": False, "cues": {"water": ["water"]}, "group_shift": "wb-train",
                 "group_cue": "water", "group_images": 16, "group_top": 0.05},
        "ablate": {"validation": "wb-val", "max_units": 3, "control_candidates": 6, "max_candidates": 4},
        "evaluate": {"bootstrap": 200}, "out": str(tmp / "job"), "progress": False, "workers": 0,
        "batch_size": 16})
    probe_cfg = pipeline.with_probe(cfg)
    pipeline.record(probe_cfg)
    pipeline.describe(probe_cfg)
    # a cue vocabulary sure to hit (a word of the first description), so the description set is not empty and must
    # stay apart from the group set; words alone (verification is tested in tests/test_verify.py)
    rows = [json.loads(l) for l in (tmp / "job" / "descriptions.jsonl").read_text().splitlines() if l.strip()]
    word = next(r["description"].split()[-1] for r in rows if r["description"])
    cfg = cfg.model_copy(update={"flag": cfg.flag.model_copy(update={"cues": {"picked": [word]}})})
    return cfg


def test_group_evidence_flags_a_variant_of_its_own(job):
    flags = pipeline.flag(job)
    ge = flags["group_evidence"]
    assert ge["shift"] == "wb-train" and ge["cue_group"] == "water" and ge["n_images"] == 16
    assert len(ge["units"]) == 64 + 128 and all(0 <= u["auc"] <= 1 for u in ge["units"])
    words = {(f["layer"], f["unit"]) for f in flags["flags"] if f["by_description"]}
    assert flags["sets"]["description"] == sorted([list(k) for k in words]) and words
    assert flags["sets"]["group"] == [[u["layer"], u["unit"]] for u in ge["units"] if u["flagged"]]
    assert flags["sets"]["group"], "a random ResNet has colour units that see the drawn patch"
    for u in ge["units"]:
        if u["flagged"]:
            assert u["lo"] > 0.5 and "group AUC" in u["reason"]
    top = max(ge["units"], key=lambda u: u["auc"])
    assert top["auc"] > 0.9  # the patch is in every cue-group image: some unit separates it almost perfectly


def test_worst_and_average_group_accuracy_reach_report_json(job):
    pipeline.flag(job)
    abl = pipeline.ablate(job)
    assert set(abl["variants"]) == {"description", "group"}
    ev = pipeline.evaluate(job)
    assert "ablated_group" in ev["results"] and "ablated" in ev["results"]
    for vname, sets in ev["results"].items():
        r = sets["in-distribution"]
        assert len(r["groups"]) == 4  # landbird/waterbird x land/water
        accs = [g["acc"] for g in r["groups"].values()]
        assert r["worst_group"]["acc"] == min(accs) and r["avg_group"]["acc"] == pytest.approx(np.mean(accs))
        assert r["worst_group"]["lo"] <= r["worst_group"]["acc"] <= r["worst_group"]["hi"]
        assert r["avg_group"]["lo"] <= r["avg_group"]["acc"] <= r["avg_group"]["hi"]
    paths = pipeline.report(job)
    rep = json.loads(open(paths["json"]).read())
    base = rep["variants"]["base"]["results"]["in-distribution"]
    assert base["worst_group"] == ev["results"]["base"]["in-distribution"]["worst_group"]
    assert base["avg_group"] == ev["results"]["base"]["in-distribution"]["avg_group"]
    assert "ablated_group" in rep["variants"] and rep["ablation"]["flagged_by"].startswith("descriptions")


def test_a_group_cue_naming_no_image_is_refused(job):
    from neuroscribe.ablate.stage import group_evidence
    lake = job.model_copy(update={"flag": job.flag.model_copy(update={"group_cue": "lake"})})
    with pytest.raises(ValueError, match=r"flag.group_cue 'lake' names no image of shift 'wb-train'.*'landbird/land'"):
        group_evidence(lake)
