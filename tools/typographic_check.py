"""Do units described as objects read their own words? A diagnostic on finished study jobs (nothing is changed).

    python tools/typographic_check.py JOBDIR/seed0 [JOBDIR/seed1 ...] [--out FILE.json]

A unit tied to a written-name cue need not be described as text: a class unit of a text-trained model can fire for
the golf ball and for the words "golf ball" alike, and the tagger describes what its exemplars show, "golf ball".
Here every unit whose description is not already text is verified once more with its own words rendered as text
("the word <description>": :func:`neuroscribe.describe.verify.verify_units`, the describe stage's verifier, its
fonts, inks, places and matched controls, the job's ``describe.verify`` settings and seed): a typographic test built
from the description alone, as Goh et al. (2021) probed CLIP's multimodal neurons. Against the job's flag truth
(``evaluation.json`` ``flag_quality``, top 5 % of each layer's units by the test cue's effect), per job:

- ``auc_described``: the evaluate stage's own description ranking (what ships);
- ``auc_typographic``: the same idea with the typographic result for the units not described as text -- confirmed
  (own verification of text words, or the typographic one) first, then the effect's percentile within its layer;
- the confirmed set's size, true positives, precision and recall.

Nothing here sees the cue's font, place or test images: the words and the probe photos only."""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

from dfr_slice import job_config  # tools/, beside this script
from neuroscribe import io
from neuroscribe.describe.stage import recorded_model
from neuroscribe.describe.verify import verify_units
from neuroscribe.record.exemplars import Recording
from neuroscribe.runtime import resolve_device


def check(job: Path) -> dict:
    cfg, _ = job_config(job)
    rec, dev = Recording.open(job), resolve_device(cfg.device)
    rows = {(r["layer"], r["unit"]): r for r in map(json.loads, (job / "descriptions.jsonl").open())}
    as_text = {k for k, r in rows.items() if r["verify_kind"] == "text"}
    words = {k: "the word " + r["description"] for k, r in rows.items()
             if k not in as_text and r["description"] and not r["description"].startswith("the word")}
    typo = verify_units(rec, recorded_model(cfg, rec, dev), words, cfg.describe.verify, cfg.seed, dev, cfg.batch_size)
    fq = json.loads((job / "evaluation.json").read_text())["flag_quality"]
    truth = {tuple(u) for u in fq["truth_units"]}
    keys = sorted(rows, key=lambda k: (rec.layers.index(k[0]), k[1]))
    y = np.array([k in truth for k in keys])

    def effect(k):
        v = rows[k]["verify_effect"] if k in as_text else typo.get(k, {}).get("effect")
        return -np.inf if v is None or v != v else float(v)
    confirmed = np.array([rows[k]["verify_status"] == "confirmed" if k in as_text else
                          typo.get(k, {}).get("status") == "confirmed" for k in keys])
    eff, layers, pct = np.array([effect(k) for k in keys]), np.array([k[0] for k in keys]), np.zeros(len(keys))
    for layer in set(layers):
        m = layers == layer
        pct[m] = rankdata(eff[m]) / m.sum()
    tp = int((confirmed & y).sum())
    kinds = {kind: int(sum(rows[k]["verify_kind"] == kind for k in truth)) for kind in ("text", "object", "colour")}
    return {"job": str(job), "units": len(keys), "truth": int(y.sum()), "truth_by_described_kind": kinds,
            "typographic_units": len(words), "typographic_confirmed": int(sum(r["status"] == "confirmed"
                                                                              for r in typo.values())),
            "auc_described": fq["sets"]["description"].get("auc"),
            "auc_typographic": float(roc_auc_score(y, 2 * confirmed + pct)),
            "confirmed": {"flagged": int(confirmed.sum()), "true_positives": tp,
                          "precision": tp / max(int(confirmed.sum()), 1), "recall": tp / max(int(y.sum()), 1)},
            "typographic": {f"{l}/{u}": {"words": words[(l, u)], **r} for (l, u), r in typo.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("jobs", type=Path, nargs="+", help="finished study seed jobs (descriptions, evaluation.json)")
    ap.add_argument("--out", type=Path, help="also write the figures here (JSON)")
    a = ap.parse_args()
    res = []
    for job in a.jobs:
        r = check(job)
        res.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "typographic"}), flush=True)
    summary = {k: [r[k] for r in res] for k in ("auc_described", "auc_typographic")}
    summary.update({f"mean_{k}": statistics.mean(v) for k, v in list(summary.items()) if None not in v})
    print(json.dumps(summary))
    if a.out:
        io.write_json(a.out, {"command": "python tools/typographic_check.py " + " ".join(map(str, a.jobs)),
                              "summary": summary, "jobs": res})


if __name__ == "__main__":
    main()
