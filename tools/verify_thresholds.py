"""Choose ``describe.verify.effect_min`` / ``auc_min`` from the verifier's null distribution on real data.

EfficientNet-Lite0 (pretrained, offline wheel) is recorded on a seeded random subset of Imagenette val (the probe);
every unit of its layers gets, in turn, the descriptions below, and :func:`verify_units` is run twice per seed:
with the real treatment, and with ``null=True`` (the treatment replaced by a second, independent control draw: the
words play no part, so every "confirmed" there is a false positive). Printed per seed and description: the null
99th percentiles of effect and AUC under the null and with the real treatment, and the share of units that pass
under the null and for real at a grid of (effect_min, auc_min). The defaults are the loosest grid point whose null
pass rate stays below 0.1 % on every seed and description.

Usage: ``python tools/verify_thresholds.py [--seeds 0 1 2] [--images 300] [--root ../shared/data/imagenette]``
(a few minutes a seed on 2 CPU cores). Objects are not covered (their pools depend on the descriptions).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from neuroscribe.config import VerifyConfig, load_config
from neuroscribe.describe.verify import verify_units
from neuroscribe.models import load_model
from neuroscribe.record.exemplars import Recording
from neuroscribe.record.recorder import record

LAYERS = ["_blocks.4", "_blocks.10", "_blocks.15", "_fc"]
DESCRIPTIONS = ["text", "the word house", "number", "blue", "red", "green"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--images", type=int, default=300, help="probe images (seeded subset of val)")
    ap.add_argument("--descriptions", nargs="+", default=DESCRIPTIONS)
    ap.add_argument("--root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenette"))
    a = ap.parse_args()
    cfg_v = VerifyConfig()
    print(f"defaults: effect_min {cfg_v.effect_min}, auc_min {cfg_v.auc_min}, images {cfg_v.images}")
    grid = [(0.5, 0.7), (0.5, 0.75), (0.75, 0.75), (1.0, 0.8)]
    print(f"{'seed':>4} {'description':16s} {'null eff p99':>12} {'null auc p99':>12} {'real eff p99':>12} "
          f"{'real auc p99':>12}  " + "  ".join(f"null/real pass at {e:g},{u:g}" for e, u in grid))
    for seed in a.seeds:
        with tempfile.TemporaryDirectory() as d:
            cfg = load_config(None, {"model": "efficientnet-lite0", "layers": LAYERS, "out": d, "progress": False,
                                     "seed": seed, "workers": 0,
                                     "data": {"root": a.root, "split": "val", "limit": a.images}})
            rec = Recording(record(cfg))
            lm = load_model("efficientnet-lite0")
            units = [(l, u) for l in LAYERS for u in range(rec.units(l))]
            for text in a.descriptions:
                descs = {k: text for k in units}
                res = {null: verify_units(rec, lm, descs, cfg_v, seed, torch.device("cpu"), null=null)
                       for null in (True, False)}
                eff = {n: np.array([r["effect"] for r in res[n].values()]) for n in res}
                auc = {n: np.array([r["auc"] for r in res[n].values()]) for n in res}
                rates = "  ".join(f"{np.mean((eff[True] >= e) & (auc[True] >= u)):.4f}/"
                                  f"{np.mean((eff[False] >= e) & (auc[False] >= u)):.4f}".rjust(28) for e, u in grid)
                print(f"{seed:>4} {text:16s} {np.quantile(eff[True], 0.99):>12.2f} "
                      f"{np.quantile(auc[True], 0.99):>12.3f}"
                      f" {np.quantile(eff[False], 0.99):>12.2f} {np.quantile(auc[False], 0.99):>12.3f}  {rates}",
                      flush=True)


if __name__ == "__main__":
    main()
