"""A study seed's ablation chosen again under a clean-accuracy tolerance (a labelled variant; the seed's job is not
touched).

    python tools/clean_tolerance.py JOBDIR/seed0 --tolerance 1.0 [--reference-wrong 0.579] [--out FILE.json]

Copies the seed's job folder to a scratch folder (``--scratch``), sets ``ablate.clean_tolerance`` there, and reruns
the ablate and evaluate stages (the units' ordering and the validation curve are the same passes as the study's: only
the choice of N changes, and with it the controls and DFR after ablation). Prints, for the description variant, the
N chosen with and without the tolerance, the clean validation accuracy each costs, and the test accuracies of base,
ablated and ablated + DFR on every test set; with ``--reference-wrong`` (the clean-trained reference's accuracy on
the shifted set) also the share of the gap closed there.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from neuroscribe import pipeline
from neuroscribe.cli import _stage_cfg
from neuroscribe.config import load_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("job", type=Path, help="a study seed's job folder (config.yaml, flags.json, ablation.json ...)")
    ap.add_argument("--tolerance", type=float, default=1.0, help="points of clean validation accuracy (default 1)")
    ap.add_argument("--scratch", type=Path, help="where the copy goes (default JOB.tolerance-T beside the job)")
    ap.add_argument("--reference-wrong", type=float, help="the clean-trained reference's accuracy on --shift")
    ap.add_argument("--shift", default="wrong-text", help="the shifted test set of the gap (default wrong-text)")
    ap.add_argument("--out", type=Path, help="also write the figures here (JSON)")
    a = ap.parse_args()
    scratch = a.scratch or a.job.with_name(f"{a.job.name}.tolerance-{a.tolerance:g}")
    if not scratch.exists():
        shutil.copytree(a.job, scratch, ignore=shutil.ignore_patterns("gallery", "report.*", "curve.png"))
    cfg = load_config(str(a.job / "config.yaml"), {"out": str(scratch), "progress": False,
                                                   "ablate": {"clean_tolerance": a.tolerance}})
    cfg = _stage_cfg(cfg)
    before = json.loads((a.job / "ablation.json").read_text())["variants"]["description"]
    base_ev = json.loads((a.job / "evaluation.json").read_text())["results"]
    abl = pipeline.ablate(cfg)
    ev = pipeline.evaluate(cfg)
    v = abl["variants"]["description"]
    clean = dict(v["clean_curve"])
    res = ev["results"]
    out = {"job": str(a.job), "tolerance": a.tolerance, "validation": abl["validation"],
           "chosen_n": {"milan_rule": before["chosen_n"], "tolerance": v["chosen_n"]},
           "clean_validation": {"unablated": clean[0], "at_chosen_n": clean[v["chosen_n"]],
                                "at_milan_n": clean.get(before["chosen_n"])},
           "test": {k: {s: r["acc"] for s, r in res[k].items()} for k in ("base", "ablated", "ablated_dfr", "dfr")
                    if k in res},
           "test_milan_rule": {k: {s: r["acc"] for s, r in base_ev[k].items()} for k in ("ablated", "ablated_dfr")
                               if k in base_ev}}
    if a.reference_wrong is not None:
        gap = a.reference_wrong - res["base"][a.shift]["acc"]
        out["gap_closed"] = {k: (res[k][a.shift]["acc"] - res["base"][a.shift]["acc"]) / gap
                             for k in ("ablated", "ablated_dfr", "dfr") if k in res}
    print(json.dumps(out, indent=1))
    if a.out:
        a.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
