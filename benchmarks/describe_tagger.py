"""Describe and verify throughput of the offline tagger (not a test).

Records every block of EfficientNet-Lite0 (16 blocks + head + logits: 4,088 units) on N probe images, then
describes all units with the tagger backend and verifies every description by experiment (the defaults:
``describe.verify`` on), and prints units/s of each, their time against the record pass, and the projected time
for the whole model. Target (issue #13): every unit described and verified in under 10 minutes on 2 CPU cores.

    python benchmarks/describe_tagger.py                  # 2,000 images (full Imagenette val if present), all units
    python benchmarks/describe_tagger.py --quick          # 200 images, the first 16 units of each layer
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGENETTE = ROOT.parent / "shared" / "data" / "imagenette"
LAYERS = [f"_blocks.{i}" for i in range(16)] + ["_conv_head", "_fc"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--images", type=int)
    a = ap.parse_args()
    from neuroscribe.config import load_config
    from neuroscribe.datasets.probe import sample_root
    from neuroscribe.record.recorder import record
    from neuroscribe.describe.stage import describe
    n = a.images or (200 if a.quick else 2000)
    root = IMAGENETTE if IMAGENETTE.is_dir() else sample_root()
    with tempfile.TemporaryDirectory() as d:
        cfg = load_config(None, {"model": "efficientnet-lite0", "layers": LAYERS, "out": d, "progress": False,
                                 "data": {"root": str(root), "split": "val", "limit": n},
                                 "describe": {"units": 16 if a.quick else None, "faithfulness_images": 0,
                                              "gallery": False, "batch_units": 128}})
        t = time.perf_counter()
        record(cfg)
        t_rec = time.perf_counter() - t
        t = time.perf_counter()
        describe(cfg)
        t_all = time.perf_counter() - t
        s = json.loads((Path(d) / "describe.json").read_text())
        v = json.loads(next((Path(d) / "describe").glob("*/verify.json")).read_text())
    units, t_desc, t_ver = s["units"], s["seconds_this_run"], v["seconds"]
    print(f"machine: {os.cpu_count()} cpus; probe: {n} images from {root}")
    print(f"record ({len(LAYERS)} layers): {t_rec:.0f}s; describe stage {t_all:.0f}s for {units} units: describe "
          f"{t_desc:.0f}s ({units / t_desc:.2f} units/s, with model, OCR and embedder start-up), verify {t_ver:.0f}s "
          f"({units / t_ver:.2f} units/s; {s.get('verification')}), the rest {t_all - t_desc - t_ver:.0f}s "
          "(faithfulness, exports)")
    print(f"ratio to record: describe + verify = {(t_desc + t_ver) / t_rec:.1f}x the record pass; whole stage "
          f"{t_all / t_rec:.1f}x")
    print(f"whole model (4,088 units) projected {4088 * t_all / units / 60:.1f} min (linear in units: an upper "
          "bound, start-up and per-image OCR are paid once); target 10 min")


if __name__ == "__main__":
    main()
