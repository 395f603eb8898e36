"""Choose ``describe.verify.effect_min`` / ``auc_min`` from the verifier's null distribution on real data.

EfficientNet-Lite0 (pretrained, offline wheel) is recorded on a seeded random subset of Imagenette val (the probe);
every unit of its layers gets, in turn, the descriptions below, and :func:`verify_units` is run twice per seed:
with the real treatment, and with ``null=True`` (the treatment replaced by a second, independent control draw: the
words play no part, so every "confirmed" there is a false positive). Printed per seed and description: the null
pass rate at the current defaults, the null 99th percentiles of effect and AUC, and the real pass rate. The
defaults are chosen so that the null pass rate stays below 1 % on every seed and description.

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
    ap.add_argument("--root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenette"))
    a = ap.parse_args()
    cfg_v = VerifyConfig()
    print(f"defaults: effect_min {cfg_v.effect_min}, auc_min {cfg_v.auc_min}, images {cfg_v.images}")
    print(f"{'seed':>4} {'description':16s} {'null pass':>9} {'null eff p99':>12} {'null auc p99':>12} "
          f"{'real pass':>9}")
    for seed in a.seeds:
        with tempfile.TemporaryDirectory() as d:
            cfg = load_config(None, {"model": "efficientnet-lite0", "layers": LAYERS, "out": d, "progress": False,
                                     "seed": seed, "workers": 0,
                                     "data": {"root": a.root, "split": "val", "limit": a.images}})
            rec = Recording(record(cfg))
            lm = load_model("efficientnet-lite0")
            units = [(l, u) for l in LAYERS for u in range(rec.units(l))]
            for text in DESCRIPTIONS:
                descs = {k: text for k in units}
                res = {null: verify_units(rec, lm, descs, cfg_v, seed, torch.device("cpu"), null=null)
                       for null in (True, False)}
                eff = np.array([r["effect"] for r in res[True].values()])
                auc = np.array([r["auc"] for r in res[True].values()])
                null_pass = np.mean([r["status"] == "confirmed" for r in res[True].values()])
                real_pass = np.mean([r["status"] == "confirmed" for r in res[False].values()])
                print(f"{seed:>4} {text:16s} {null_pass:>9.4f} {np.quantile(eff, 0.99):>12.2f} "
                      f"{np.quantile(auc, 0.99):>12.3f} {real_pass:>9.4f}", flush=True)


if __name__ == "__main__":
    main()
