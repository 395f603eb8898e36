"""Read a study seed's counterfactual truth units against their descriptions (after the fact; chooses nothing).

    python tools/truth_vs_descriptions.py JOBDIR/seed0 [--out FILE.json] [--probe [--probe-images N]]
        [--replicate [--truth-images N]]

Recomputes the evaluate stage's flag-quality truth (:func:`neuroscribe.ablate.measure.cue_flag_quality`: the top 5 %
of each layer's units by the cue's effect on class-stratified paired test images) with the seed's trained checkpoint,
checks that it gives the flag figures ``evaluation.json`` holds, and prints, for the truth units: their count per
layer, their descriptions, how many have a word of the job's cue keywords (``flag.cues``) as the description or among
the candidates, and their verification verdicts. Jobs evaluated since ``flag_quality.truth_units`` exists need no
recomputation, but the script recomputes anyway (the check is the point).

``--probe`` also measures what the cue's own words do when every unit is tested with them, whatever its description
(a diagnostic, never a flag: units chosen this way are not chosen by their descriptions). Each keyword of
``flag.cues`` that a text or colour intervention of the verifier reads (``text`` -> common words against the same
drawing blurred; a colour -> a patch of it against another colour; keywords that make the same edit run once) is
applied to every unit with :func:`neuroscribe.describe.verify.verify_units` (the job's ``describe.verify`` images and
seed); a unit's probe effect is its largest effect over those edits. Printed: the AUC of the probe effect for the
per-layer and the pooled truth beside the description ranking's (``evaluation.json``), and how many truth units the
probe confirms. It tells apart the two reasons a truth unit is missed: the unit does not respond to the cue's kind
at all (the probe misses it too), or it does and its description does not say so.

``--replicate`` measures the truth's own reliability, the ceiling of any flag scored against it: the same truth rule on
a second class-stratified sample of the same test set, as large (or all the images left, with a ``note``) and
disjoint from the first (purpose "flag truth replicate"; ``per_class`` counts both draws). Printed: the flag sets'
figures against the first truth (with ``--truth-images``, one of that size: a labelled variant of the stage's), how
many units the two truths share (precision = recall of the replicate used as a flag set), the AUC of the replicate's
effect for the first truth, and, beside them, the flag stage's counterfactual evidence (``flags.json``, measured on
the training-side shift: a labelled variant, never a description; it holds evidence only for the units it lists, the
rest rank last, in unit order) with the same figures at the truth's size. A description-side flag cannot be expected
to agree with the truth better than the truth agrees with itself.
"""
from __future__ import annotations

import argparse
import csv
import json
from collections import Counter
from pathlib import Path

from neuroscribe import io
from neuroscribe.ablate.measure import cue_flag_quality
from neuroscribe.ablate.stage import model_and_means
from neuroscribe.config import load_config
from neuroscribe.datasets.sets import test_sets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("job", type=Path, help="a study seed's job folder (config.yaml, train/, evaluation.json ...)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--probe", action="store_true", help="also test every unit with the cue's own words (diagnostic)")
    ap.add_argument("--replicate", action="store_true", help="also the truth measured again on disjoint test images")
    ap.add_argument("--truth-images", type=int, help="with --replicate: both truths drawn at this size instead")
    ap.add_argument("--probe-images", type=int, help="with --probe: verification images (default: the job's)")
    a = ap.parse_args()
    if a.truth_images is not None and not a.replicate:
        ap.error("--truth-images needs --replicate")
    if a.probe_images is not None and not a.probe:
        ap.error("--probe-images needs --probe")
    for flag, n in (("--truth-images", a.truth_images), ("--probe-images", a.probe_images)):
        if n is not None and n < 1:
            ap.error(f"{flag} must be at least 1 (got {n})")
    ckpt = next((a.job / "train").glob("seed*/model.safetensors"))
    cfg = load_config(a.job / "config.yaml", {"model": f"checkpoint:{ckpt}"})
    lm, dev, rec, _ = model_and_means(cfg)
    q = cue_flag_quality(cfg, lm, dev, rec.layers, test_sets(cfg, lm.preprocess, lm.class_names))
    stored = json.loads((a.job / "evaluation.json").read_text())["flag_quality"]
    if q["sets"] != stored["sets"]:
        raise SystemExit(f"the recomputed truth gives other flag figures than {a.job}/evaluation.json")
    words = {w.lower() for ws in cfg.flag.cues.values() for w in ws}
    rows = {(r["layer"], int(r["unit"])): r for r in csv.DictReader(open(a.job / "descriptions.csv"))}
    truth = sorted(tuple(u) for u in q["truth_units"] if tuple(u) in rows)  # the described ones (all, in a study)

    def says(text: str) -> bool:  # the text holds one of the cue's keywords
        return bool(set(text.lower().split()) & words)
    out = {"job": str(a.job), "truth": len(q["truth_units"]), "truth_described": len(truth),
           "per_layer": dict(Counter(l for l, _ in q["truth_units"])),
           "descriptions": Counter(rows[u]["description"] for u in truth).most_common(),
           "cue_word_description": sum(says(rows[u]["description"]) for u in truth),
           "cue_word_in_candidates": sum(any(says(c["text"]) for c in json.loads(rows[u]["candidates"]))
                                         for u in truth),
           "verification": dict(Counter(f"{rows[u]['verify_kind']}/{rows[u]['verify_status']}" for u in truth)),
           "all_units_descriptions": Counter(r["description"] for r in rows.values()).most_common(10),
           "truth_units": [[l, u, rows[(l, u)]["description"]] for l, u in truth]}
    top = out["all_units_descriptions"][0][0]  # the commonest description: how many of its exemplars show that class
    ex = [int(i) for r in rows.values() if r["description"] == top for i in r["exemplar_ids"].split()]
    labels = [int(y) for y in rec.labels]
    same = sum(lm.class_names[labels[i]] == top for i in ex)
    out["commonest_description_exemplars_of_that_class"] = {
        "description": top, "exemplars": len(ex), "share": same / len(ex) if ex else None,
        "units_per_layer": dict(Counter(r["layer"] for r in rows.values() if r["description"] == top))}
    if a.replicate:
        out["replicate"] = replicate(cfg, lm, dev, rec.layers, q, a.job, a.truth_images)
    if a.probe:
        extra = {f"truth_{out['replicate']['first_images']}_images": out["replicate"]["truth_units"]} \
            if a.replicate and a.truth_images else {}
        out["probe"] = probe(cfg, lm, dev, rec, sorted(rows), q, words, a.probe_images, extra)
    print(json.dumps({k: v for k, v in out.items() if k != "truth_units"}, indent=1))
    if a.out:
        io.write_json(a.out, out)


def probe(cfg, lm, dev, rec, units: list, q: dict, words: set, images: int | None = None,
          extra: dict | None = None) -> dict:
    """Every unit tested with each edit the cue's keywords make (see ``--probe``; ``images``: verification images
    instead of the job's); AUCs against both truths and any ``extra`` ``{name: truth units}``."""
    from neuroscribe.describe.verify import Pools, intervention_for, verify_units
    edits = {}
    for w in sorted(words):
        iv = intervention_for(w, ("", -1), Pools(), ["text", "colour"])
        if iv is not None:
            edits.setdefault(iv.key, w)
    if not edits:
        raise SystemExit(f"no keyword of flag.cues ({sorted(words)}) makes a text or colour edit")
    best: dict = {}
    v = cfg.describe.verify if images is None else cfg.describe.verify.model_copy(update={"images": images})
    for key, w in sorted(edits.items()):
        res = verify_units(rec, lm, {u: w for u in units}, v, cfg.seed, dev)
        for u, r in res.items():
            if u not in best or r["effect"] > best[u]["effect"]:
                best[u] = {**r, "keyword": w}
    out = {"edits": sorted(edits.values()), "units": len(units), "images": v.images,
           "confirmed": sum(r["status"] == "confirmed" for r in best.values())}
    effect = [best[u]["effect"] for u in units]
    for name, truth in (extra or {}).items():
        t = {tuple(u) for u in truth}
        out[name] = {"truth": len(t), "probe_auc": _auc([u in t for u in units], effect)}
    for name, truth in (("per_layer", q["truth_units"]), ("pooled", q["pooled"]["truth_units"])):
        t = {tuple(u) for u in truth}
        stored = q["sets"]["description"] if name == "per_layer" else q["pooled"]["sets"]["description"]
        out[name] = {"truth": len(t), "truth_described": len(t & set(best)),
                     "probe_auc": _auc([u in t for u in units], effect), "description_auc": stored.get("auc"),
                     "truth_confirmed_by_probe": sum(best[u]["status"] == "confirmed" for u in t & set(best))}
    return out


def _auc(y: list, score: list) -> float | None:
    """ROC AUC of ``score`` for ``y``; None when ``y`` holds one kind only (a job that described few units)."""
    from sklearn.metrics import roc_auc_score
    return float(roc_auc_score(y, score)) if 0 < sum(y) < len(y) else None


def replicate(cfg, lm, dev, layers: list, q: dict, job: Path, n: int | None = None) -> dict:
    """The truth rule again on a disjoint sample (see ``--replicate``); agreement with the stored truth. With ``n``
    (``--truth-images``), both truths are drawn at that size instead (the first with the stored truth's purpose)."""
    from neuroscribe.ablate.flag import cue_effect, cue_pairs
    from neuroscribe.ablate.measure import _set_quality, description_ranking, top_share
    from neuroscribe.datasets.splits import stratified_sample
    ds = test_sets(cfg, lm.preprocess, lm.class_names)[q["test_set"]][0]
    labels = [y for _, y in ds.samples]
    first = stratified_sample(labels, n or cfg.flag.evidence_images, cfg.seed, purpose="flag truth")  # the stage's
    ids = stratified_sample(labels, len(first), cfg.seed, exclude=first, purpose="flag truth replicate")

    def effect_on(sample):
        return cue_effect(lm.module, {l: None for l in layers},
                          list(cue_pairs(ds, lm.preprocess.to_tensor(), sample, cfg.batch_size)), device=dev)
    effect = effect_on(ids)
    units = sorted(effect)
    truth = {tuple(u) for u in q["truth_units"]} if n is None else top_share(effect_on(first), layers)
    flags = json.loads((job / "flags.json").read_text())
    evidence = {(f["layer"], int(f["unit"])): f.get("evidence") for f in flags["flags"]}

    def agreement(score: dict) -> dict:  # the truth rule applied to ``score`` as a flag set, and the AUC
        full = {u: -1e9 if score.get(u) is None else score[u] for u in units}  # no score: ranked last
        top = top_share(full, layers)
        return {"flagged": len(top), "shared": len(top & truth), "precision": len(top & truth) / len(top),
                "recall": len(top & truth) / len(truth), "auc": _auc([u in truth for u in units], list(full.values()))}
    sets = _set_quality(flags["sets"], truth, len(units))
    rank = description_ranking(job)  # the evaluate stage's flag-score AUC, against this truth
    ranked = [u for u in units if u in rank]
    if "description" in sets:
        sets["description"]["auc"] = _auc([u in truth for u in ranked], [rank[u] for u in ranked])
    names = lm.class_names or []

    def per_class(sample):  # how the stratified draw spread over the classes
        return dict(sorted(Counter(names[labels[i]] if labels[i] < len(names) else str(labels[i])
                                   for i in sample).items()))
    return {"n_images": len(ids), "first_images": len(first), "disjoint": not set(ids) & set(first),
            "per_class": per_class(ids), "first_per_class": per_class(first),
            **({"note": f"the test set has {len(labels)} images: the replicate is all {len(ids)} left"}
               if len(ids) < len(first) else {}),
            "truth": len(truth), "truth_units": sorted([l, u] for l, u in truth), "flag_sets": sets,
            "replicate_truth": agreement(effect),
            "evidence_variant": {**agreement(evidence),
                                 "units_with_evidence": sum(v is not None for v in evidence.values()),
                                 "note": "flags.json holds evidence only for the units it lists; the rest rank last"}}


if __name__ == "__main__":
    main()
