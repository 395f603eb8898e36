"""A study seed under a clean budget (a labelled variant; the seed's job is not touched): N chosen by
``ablate.clean_tolerance``'s rule on the job's own validation curves, then DFR after those units.

    python tools/clean_budget.py JOBDIR/seed0 [--tolerance 1|milan|dfr] [--toward zero,head] [--dfr-cue random|wrong]
                                 [--penalty l2|l1] [--dfr-train 1] [--draws 5] [--reference-wrong 0.532]
                                 [--out FILE.json]

The description variant's ordering and its validation curves (``ablation.json``: ``curve`` and ``clean_curve``, the
clean images' accuracy from the same passes) are the job's; N is :func:`neuroscribe.ablate.select.choose_n` with the
tolerance, so nothing here sees a test image before the choice. Scored on the job's test sets: the first N units
ablated; DFR alone and after them for each centre of ``--toward`` (:func:`neuroscribe.ablate.refit.dfr_last_layer`,
``ablate.dfr_toward``); the random-unit control at that N (the job's own draws rule: ``random_units`` with the job's
seed and number of draws; ``--draws 0`` skips it). The sort-all control is not rerun. ``--tolerance milan`` takes
MILAN's rule (the job's own N), ``--tolerance dfr`` the N chosen for ablation + DFR together on validation (the ablate
stage's ``dfr_curve`` over ``ablate.dfr_ns``, with this run's DFR slice); ``--dfr-cue`` sets ``ablate.dfr_cue``
(the class the DFR slice's cued copies name) instead of the job's; ``--penalty l1`` fits DFR as DFR's own
script does (L1 one-vs-rest, its C grid; toward zero only) instead of the product's L2 multinomial fit;
``--dfr-train SHARE`` sets ``ablate.dfr_train`` (that share of the training photos joins every DFR fit). With
``--reference-wrong`` (the clean-trained reference on ``--shift``) also the share of the gap closed."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from dfr_slice import accuracies, decoded_test_sets, job_config  # tools/, beside this script
from neuroscribe import io
from neuroscribe.ablate.refit import dfr_last_layer
from neuroscribe.ablate.select import choose_n, random_units
from neuroscribe.ablate.stage import dfr_curve, model_and_means, validation_batches
from neuroscribe.datasets.sets import class_index, dfr_set, dfr_train_set, loader


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("job", type=Path, help="a study seed's finished job folder (config.yaml, ablation.json)")
    ap.add_argument("--tolerance", default="1", help="points of clean validation accuracy, 'milan' or 'dfr' "
                    "(default 1)")
    ap.add_argument("--dfr-cue", choices=("random", "wrong"), help="ablate.dfr_cue for DFR (default: the job's)")
    ap.add_argument("--penalty", choices=("l2", "l1"), default="l2", help="DFR's fit (default l2, the product's)")
    ap.add_argument("--dfr-train", type=float, help="ablate.dfr_train: share of the training photos that join DFR's "
                    "fits (default: the job's own; 0 = the held-out slice alone)")
    ap.add_argument("--draws", type=int, help="random-unit draws at that N (default: the job's; 0 = none)")
    ap.add_argument("--toward", default="zero,head", help="DFR's L2 centres to fit (default zero,head)")
    ap.add_argument("--reference-wrong", type=float, help="the clean-trained reference's accuracy on --shift")
    ap.add_argument("--shift", default="wrong-text", help="the shifted test set of the gap (default wrong-text)")
    ap.add_argument("--out", type=Path, help="also write the figures here (JSON)")
    a = ap.parse_args()
    cfg, job_cue = job_config(a.job, a.dfr_cue)
    job_train = cfg.ablate.dfr_train
    if a.dfr_train is not None:
        cfg = cfg.model_copy(update={"ablate": cfg.ablate.model_copy(update={"dfr_train": a.dfr_train})})
    tol = None if a.tolerance in ("milan", "dfr") else float(a.tolerance)
    abl = json.loads((a.job / "ablation.json").read_text())
    desc = abl["variants"]["description"]
    if "clean_curve" not in desc:
        raise SystemExit("ablation.json has no clean_curve: the job's validation holds no clean image")
    if [r[0] for r in desc["curve"]] != [r[0] for r in desc["clean_curve"]]:
        raise SystemExit("ablation.json's curve and clean_curve list other Ns")
    rows = [(n, acc, clean) for (n, acc), (_, clean) in zip(desc["curve"], desc["clean_curve"])]
    n = choose_n(rows, None if tol is None else tol / 100)
    ev = json.loads((a.job / "evaluation.json").read_text())["results"]
    lm, dev, rec, means = model_and_means(cfg)
    if a.tolerance == "dfr":  # N chosen for the pair on validation (the evaluate stage's ablated_dfr_tuned)
        if not cfg.ablate.dfr_ns:
            raise SystemExit("--tolerance dfr needs ablate.dfr_ns in the job")
        val, _, val_names, _ = validation_batches(cfg, lm)
        n = dfr_curve(cfg, lm, dev, means, [(l, u) for l, u, _ in desc["ordered"]], val,
                      class_index(lm, val_names))["chosen_n"]
        if cfg.ablate.dfr_cue == job_cue and n != abl.get("dfr_tuned", {}).get("chosen_n"):
            print(f"warning: N = {n} here but {abl.get('dfr_tuned', {}).get('chosen_n')} in the job", flush=True)
    units = [(l, u) for l, u, _ in desc["ordered"][:n]]
    sets = decoded_test_sets(cfg, lm)

    def score(model, us) -> dict:
        return accuracies(cfg, model, us, sets, means, dev)

    acc = {"base": score(lm.module, []), "ablated": score(lm.module, units)}
    if any(abs(acc["base"][s] - r["acc"]) > 1e-9 for s, r in ev["base"].items()):
        raise SystemExit(f"the base model scores {acc['base']} here but {ev['base']} in the job: another model?")
    dfr_ds, _, _ = dfr_set(cfg, lm.preprocess, lm.class_names)
    extra, extra_desc = dfr_train_set(cfg, lm.preprocess) or (None, None)
    info = {}
    for toward in a.toward.split(","):
        for name, us in ((f"dfr/{toward}", []), (f"ablated_dfr/{toward}", units)):
            model, info[name] = dfr_last_layer(lm.module, us, dfr_ds, lambda d: loader(cfg, d), cfg.ablate.method,
                                               means, device=dev, seed=cfg.seed, toward=toward, penalty=a.penalty,
                                               extra=extra)
            acc[name] = score(model, us)
            print(name, info[name]["C"], acc[name], flush=True)
    job_dfr = {s: r["acc"] for s, r in ev.get("dfr", {}).items()}
    same_fit = cfg.ablate.dfr_cue == job_cue and a.penalty == "l2" and cfg.ablate.dfr_train == job_train
    if "dfr/zero" in acc and job_dfr and same_fit:  # the job's own slice and fit: compared (else null: not compared)
        info["dfr/zero"]["differs_from_job"] = any(abs(acc["dfr/zero"][s] - v) > 1e-9 for s, v in job_dfr.items())
    if info.get("dfr/zero", {}).get("differs_from_job"):  # e.g. another thread count: rounding can flip DFR's C
        print("warning: DFR alone differs from the job's own figures (run with the job's thread count)", flush=True)
    n_draws = cfg.ablate.random_draws if a.draws is None else a.draws
    draws = random_units({l: rec.units(l) for l in rec.layers}, n, n_draws, cfg.seed) if n and n_draws else []
    for i, d in enumerate(draws):
        acc[f"random/{i}"] = score(lm.module, d)
    out = {"job": str(a.job), "tolerance_points": tol, "dfr_cue": cfg.ablate.dfr_cue, "penalty": a.penalty,
           "dfr_train": cfg.ablate.dfr_train, "dfr_training_photos": extra_desc,
           "chosen_n": {"milan_rule": desc["chosen_n"], "tolerance" if tol is not None else a.tolerance: n},
           "clean_validation": {"unablated": rows[0][2], "at_n": dict((r[0], r[2]) for r in rows).get(n)},
           "units": [list(u) for u in units],
           "acc": acc,
           "dfr": {k: {"C": v["C"], "differs_from_job": v.get("differs_from_job")} for k, v in info.items()},
           "clean_change_points": {k: 100 * (v["in-distribution"] - acc["base"]["in-distribution"])
                                   for k, v in acc.items()}}
    if a.reference_wrong is not None:
        base = acc["base"][a.shift]
        out["gap_closed"] = {k: (v[a.shift] - base) / (a.reference_wrong - base) for k, v in acc.items()}
    print(json.dumps({k: out[k] for k in ("chosen_n", "clean_change_points", "gap_closed") if k in out}, indent=1))
    if a.out:
        io.write_json(a.out, out)


if __name__ == "__main__":
    main()
