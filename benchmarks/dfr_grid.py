"""DFR's C grid with and without its two largest values, side by side on a finished study job (not a test).

    OMP_NUM_THREADS=2 python benchmarks/dfr_grid.py JOBDIR/seed2 [--rounds 1]

For DFR alone and after the job's description units, alternating which grid goes first each round: the fit over
the grid before 2026-12-05 (0.001-3.0, eight values) and over :data:`neuroscribe.ablate.refit.DFR_C` (0.001-0.3).
Prints each fit's seconds, the ratio, the L-BFGS iterations and seconds of every C of the grid and of the final
fits, the C each chose, and whether the two heads are bit-identical (they are whenever the chosen C is below the
values dropped: the grid is walked smallest first, each fit warm-started from the one before, and the final fits
start from the chosen C's)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from dfr_slice import job_config  # noqa: E402
from neuroscribe.ablate import refit  # noqa: E402
from neuroscribe.ablate.stage import model_and_means  # noqa: E402
from neuroscribe.datasets.sets import dfr_set, dfr_train_set, in_memory, loader  # noqa: E402

BEFORE = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)  # the grid until 2026-12-05


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("job", type=Path)
    ap.add_argument("--rounds", type=int, default=1)
    a = ap.parse_args()
    cfg, _ = job_config(a.job)
    if not cfg.ablate.dfr:
        raise SystemExit("the job needs ablate.dfr")
    units = [tuple(u) for u in json.loads((a.job / "ablation.json").read_text())["variants"]["description"]["units"]]
    lm, dev, _, means = model_and_means(cfg)
    extra = (dfr_train_set(cfg, lm.preprocess) or (None,))[0]
    held = (in_memory(cfg, dfr_set(cfg, lm.preprocess, lm.class_names)[0]), in_memory(cfg, extra))
    calls, fit0 = [], refit._fit

    def timed_fit(x, y, c, *args, **kw):
        t = time.perf_counter()
        clf = fit0(x, y, c, *args, **kw)
        calls.append((c, int(np.max(getattr(clf, "n_iter_", 0))), round(time.perf_counter() - t, 2)))
        return clf
    refit._fit = timed_fit
    print(f"{a.job}: {len(units)} description units, torch threads {torch.get_num_threads()}, grids {BEFORE} vs "
          f"{refit.DFR_C}", flush=True)
    total = {len(BEFORE): 0.0, len(refit.DFR_C): 0.0}
    for r in range(a.rounds):
        for name, us in (("dfr alone", []), (f"after {len(units)} units", units)):
            heads = {}
            for grid in (BEFORE, refit.DFR_C)[::1 if r % 2 == 0 else -1]:
                calls.clear()
                t = time.perf_counter()
                model, info = refit.dfr_last_layer(lm.module, us, held[0], lambda d: loader(cfg, d),
                                                   cfg.ablate.method, means, device=dev, seed=cfg.seed,
                                                   toward=cfg.ablate.dfr_toward, extra=held[1], cs=grid)
                s = time.perf_counter() - t
                total[len(grid)] += s
                lin = dict(model.named_modules())[refit.last_linear(model)]
                heads[len(grid)] = (lin.weight.detach().clone(), lin.bias.detach().clone())
                print(json.dumps({"round": r, "fit": name, "grid": len(grid), "seconds": round(s, 1), "C": info["C"],
                                  "per_C": [c for c in calls[:len(grid)]],
                                  "final_fits": [len(calls) - len(grid), sum(c[1] for c in calls[len(grid):]),
                                                 round(sum(c[2] for c in calls[len(grid):]), 1)]}), flush=True)
            (wa, ba), (wb, bb) = heads[len(BEFORE)], heads[len(refit.DFR_C)]
            print(f"round {r}, {name}: heads bit-identical: {bool(torch.equal(wa, wb) and torch.equal(ba, bb))}",
                  flush=True)
    print(f"eight-value grid / six-value grid, all fits: {total[len(BEFORE)] / total[len(refit.DFR_C)]:.2f}x")


if __name__ == "__main__":
    main()
