"""DFR with ``ablate.dfr_train``'s training photos: the two speed-ups measured side by side on a finished study job.

    OMP_NUM_THREADS=2 python benchmarks/dfr_fit_speed.py JOBDIR/seed0 [--rounds 2] [--score]

For DFR alone and after the job's description units (the headline's N), alternating within each round:
- **cold, from disk**: every L2 fit from zero, the slice and the training photos read (decoded, cues drawn) for the
  fit, as before 2026-12-05;
- **warm, in memory**: the sets read once beforehand (:func:`neuroscribe.datasets.sets.in_memory`, its time printed
  apart, paid once per stage) and each fit started from the previous one
  (:func:`neuroscribe.ablate.refit.dfr_last_layer`'s ``warm_start``).
Prints seconds, the ratio, L-BFGS iterations, the C each chose and the largest coefficient difference; ``--score``
also scores both heads on the job's test sets (the same C and accuracies is what "the same fit" means here).
The job needs ``ablate.dfr`` and ``ablate.dfr_train`` (``--dfr-train`` sets the share otherwise)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from dfr_slice import accuracies, decoded_test_sets, job_config  # noqa: E402
from neuroscribe.ablate.refit import dfr_last_layer, last_linear  # noqa: E402
from neuroscribe.ablate.stage import model_and_means  # noqa: E402
from neuroscribe.datasets.sets import dfr_set, dfr_train_set, in_memory, loader  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("job", type=Path)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dfr-train", type=float, help="ablate.dfr_train (default: the job's own)")
    ap.add_argument("--score", action="store_true", help="score both heads on the job's test sets")
    a = ap.parse_args()
    cfg, _ = job_config(a.job)
    if a.dfr_train is not None:
        cfg = cfg.model_copy(update={"ablate": cfg.ablate.model_copy(update={"dfr_train": a.dfr_train})})
    if not cfg.ablate.dfr or not cfg.ablate.dfr_train:
        raise SystemExit("the job needs ablate.dfr and ablate.dfr_train (or pass --dfr-train SHARE)")
    abl = json.loads((a.job / "ablation.json").read_text())
    units = [tuple(u) for u in abl["variants"]["description"]["units"]]
    lm, dev, _, means = model_and_means(cfg)
    print(f"{a.job}: dfr_train {cfg.ablate.dfr_train}, {len(units)} description units, torch threads "
          f"{torch.get_num_threads()}", flush=True)
    disk = (dfr_set(cfg, lm.preprocess, lm.class_names)[0], dfr_train_set(cfg, lm.preprocess)[0])
    t = time.perf_counter()
    held = (in_memory(cfg, disk[0]), in_memory(cfg, disk[1]))
    print(f"reading the slice ({len(disk[0])}) and the training photos ({len(disk[1])}) into memory: "
          f"{time.perf_counter() - t:.1f} s (once per stage)", flush=True)
    sets = decoded_test_sets(cfg, lm) if a.score else None
    rows = []
    for r in range(a.rounds):
        for name, us in (("dfr alone", []), (f"after {len(units)} units", units)):
            fits = {}
            order = (("cold, from disk", disk, False), ("warm, in memory", held, True))
            for path, (slice_, extra), warm in order[::1 if r % 2 == 0 else -1]:
                t = time.perf_counter()
                model, info = dfr_last_layer(lm.module, us, slice_, lambda d: loader(cfg, d), cfg.ablate.method,
                                             means, device=dev, seed=cfg.seed, toward=cfg.ablate.dfr_toward,
                                             extra=extra, warm_start=warm)
                fits[path] = (time.perf_counter() - t, info, model)
            (tc, ic, mc), (tw, iw, mw) = fits["cold, from disk"], fits["warm, in memory"]
            head = last_linear(mc)
            wc, ww = dict(mc.named_modules())[head].weight, dict(mw.named_modules())[head].weight
            row = {"round": r, "fit": name, "cold_s": round(tc, 2), "warm_s": round(tw, 2),
                   "ratio": round(tc / tw, 2), "iterations": [ic["solver_iterations"], iw["solver_iterations"]],
                   "C": [ic["C"], iw["C"]], "max_coef_diff": float((wc - ww).detach().abs().max()),
                   "max_coef": float(wc.detach().abs().max())}
            if sets is not None and r == 0:
                row["acc"] = {"cold": accuracies(cfg, mc, us, sets, means, dev),
                              "warm": accuracies(cfg, mw, us, sets, means, dev)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    ratio = sum(r["cold_s"] for r in rows) / sum(r["warm_s"] for r in rows)
    print(f"cold from disk / warm in memory, all fits: {ratio:.2f}x (reading into memory not included)")


if __name__ == "__main__":
    main()
