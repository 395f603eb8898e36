"""A study seed's description ablation chosen again under a clean-accuracy tolerance (a labelled variant; the seed's
job is not touched).

    python tools/clean_tolerance.py JOBDIR/seed0 --tolerance 1.0 [--reference-wrong 0.579] [--out FILE.json]

The units' order is the seed's own (``ablation.json``); the validation curve is measured again with the clean images'
accuracy beside it (:func:`neuroscribe.ablate.select.accuracy_curve` with ``clean``; the mixed curve must equal the
seed's, which is checked), and N chosen with ``ablate.clean_tolerance``'s rule. When that N is 0 the ablated model is
the base model and nothing more is run; otherwise the job is copied to a scratch folder (``--scratch``) with
``ablate.clean_tolerance`` set and its ablate and evaluate stages rerun there (the controls and DFR after ablation
follow the new N). Prints both Ns, the clean validation accuracy each costs, and the test accuracies; with
``--reference-wrong`` (the clean-trained reference on ``--shift``) also the share of the gap closed.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from neuroscribe import pipeline
from neuroscribe.ablate.select import accuracy_curve, choose_n
from neuroscribe.ablate.stage import model_and_means, validation_batches
from neuroscribe.cli import _stage_cfg
from neuroscribe.config import load_config
from neuroscribe.datasets.sets import class_index


def clean_curve(cfg, units: list) -> list[tuple]:
    """``(n, validation accuracy, clean validation accuracy)`` for the first n of ``units``, n = 0..max_units."""
    lm, dev, _, means = model_and_means(cfg)
    val, clean, names, desc = validation_batches(cfg, lm)
    if clean is None:
        raise SystemExit(f"the validation set ({desc}) holds no clean image")
    return accuracy_curve(lm.module, units, val, cfg.ablate.max_units, method=cfg.ablate.method, means=means,
                          device=dev, class_index=class_index(lm, names), progress=False, clean=clean)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("job", type=Path, help="a study seed's job folder (config.yaml, ablation.json, evaluation.json)")
    ap.add_argument("--tolerance", type=float, default=1.0, help="points of clean validation accuracy (default 1)")
    ap.add_argument("--scratch", type=Path, help="where a copy goes if N > 0 (default JOB.tolerance-T beside it)")
    ap.add_argument("--reference-wrong", type=float, help="the clean-trained reference's accuracy on --shift")
    ap.add_argument("--shift", default="wrong-text", help="the shifted test set of the gap (default wrong-text)")
    ap.add_argument("--out", type=Path, help="also write the figures here (JSON)")
    a = ap.parse_args()
    cfg = _stage_cfg(load_config(str(a.job / "config.yaml"), {"out": str(a.job), "progress": False}))
    before = json.loads((a.job / "ablation.json").read_text())["variants"]["description"]
    ev = json.loads((a.job / "evaluation.json").read_text())["results"]
    rows = clean_curve(cfg, [(l, u) for l, u, _ in before["ordered"]])
    mixed = [r[1] for r in rows]
    if mixed != [acc for _, acc in before["curve"]]:
        raise SystemExit(f"the validation curve measured again differs from the job's: {mixed} vs {before['curve']}")
    n = choose_n(rows, a.tolerance / 100)
    test = {k: {s: r["acc"] for s, r in ev[k].items()} for k in ("base", "ablated", "ablated_dfr", "dfr") if k in ev}
    out = {"job": str(a.job), "tolerance_points": a.tolerance,
           "chosen_n": {"milan_rule": before["chosen_n"], "tolerance": n},
           "clean_validation": {"unablated": rows[0][2], "at_tolerance_n": rows[n][2],
                                "at_milan_n": rows[before["chosen_n"]][2]},
           "curve": [list(r) for r in rows], "test_milan_rule": test}
    if n == 0:
        out["test_tolerance"] = {"ablated": test["base"], "note": "N = 0: the ablated model is the base model"}
    else:
        scratch = a.scratch or a.job.with_name(f"{a.job.name}.tolerance-{a.tolerance:g}")
        if not scratch.exists():
            shutil.copytree(a.job, scratch, ignore=shutil.ignore_patterns("gallery", "report.*", "curve.png"))
        tcfg = cfg.model_copy(update={"out": scratch, "ablate": cfg.ablate.model_copy(
            update={"clean_tolerance": a.tolerance})})
        if pipeline.ablate(tcfg)["variants"]["description"]["chosen_n"] != n:
            raise SystemExit("the ablate stage chose another N than this script: report it")
        res = pipeline.evaluate(tcfg)["results"]
        out["test_tolerance"] = {k: {s: r["acc"] for s, r in res[k].items()} for k in ("ablated", "ablated_dfr")
                                 if k in res}
    if a.reference_wrong is not None:
        base = test["base"][a.shift]
        gap = a.reference_wrong - base
        out["gap_closed"] = {"milan_rule": (test["ablated"][a.shift] - base) / gap,
                             "tolerance": (out["test_tolerance"]["ablated"][a.shift] - base) / gap}
    print(json.dumps(out, indent=1))
    if a.out:
        a.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
