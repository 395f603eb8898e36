"""Read a study seed's counterfactual truth units against their descriptions (after the fact; chooses nothing).

    python tools/truth_vs_descriptions.py JOBDIR/seed0 [--out FILE.json]

Recomputes the evaluate stage's flag-quality truth (:func:`neuroscribe.ablate.measure.cue_flag_quality`: the top 5 %
of each layer's units by the cue's effect on class-stratified paired test images) with the seed's trained checkpoint,
checks that it gives the flag figures ``evaluation.json`` holds, and prints, for the truth units: their count per
layer, their descriptions, how many have a word of the job's cue keywords (``flag.cues``) as the description or among
the candidates, and their verification verdicts. Jobs evaluated since ``flag_quality.truth_units`` exists need no
recomputation, but the script recomputes anyway (the check is the point).
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
    a = ap.parse_args()
    ckpt = next((a.job / "train").glob("seed*/model.safetensors"))
    cfg = load_config(a.job / "config.yaml", {"model": f"checkpoint:{ckpt}"})
    lm, dev, rec, _ = model_and_means(cfg)
    q = cue_flag_quality(cfg, lm, dev, rec.layers, test_sets(cfg, lm.preprocess, lm.class_names))
    stored = json.loads((a.job / "evaluation.json").read_text())["flag_quality"]
    if q["sets"] != stored["sets"]:
        raise SystemExit(f"the recomputed truth gives other flag figures than {a.job}/evaluation.json")
    words = {w.lower() for ws in cfg.flag.cues.values() for w in ws}
    rows = {(r["layer"], int(r["unit"])): r for r in csv.DictReader(open(a.job / "descriptions.csv"))}
    truth = sorted(tuple(u) for u in q["truth_units"])

    def says(text: str) -> bool:  # the text holds one of the cue's keywords
        return bool(set(text.lower().split()) & words)
    out = {"job": str(a.job), "truth": len(truth), "per_layer": dict(Counter(l for l, _ in truth)),
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
    out["commonest_description_exemplars_of_that_class"] = {
        "description": top, "exemplars": len(ex), "share": sum(lm.class_names[labels[i]] == top for i in ex) / len(ex),
        "units_per_layer": dict(Counter(r["layer"] for r in rows.values() if r["description"] == top))}
    print(json.dumps({k: v for k, v in out.items() if k != "truth_units"}, indent=1))
    if a.out:
        io.write_json(a.out, out)


if __name__ == "__main__":
    main()
