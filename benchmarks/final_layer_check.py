"""The final-layer check on EfficientNet-Lite0 (not a test): are the logit units of the probe classes described by
their class?

Records the ``_fc`` layer on the 100 shipped val photos (10 Imagenette classes), describes it with the offline
tagger (``describe.units: 1``; the logit units of the 10 probe classes are added automatically) and prints the
check from ``describe.json`` with each unit's description, score (nats per view) and runners-up. About 3-5 minutes
on 2 CPU cores.

    python benchmarks/final_layer_check.py [--out DIR]     # DIR kept (default: a temporary folder)
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    from neuroscribe.config import load_config
    from neuroscribe.datasets.probe import sample_root
    from neuroscribe.record import record
    from neuroscribe.describe.stage import describe
    with tempfile.TemporaryDirectory() as tmp:
        out = a.out or Path(tmp) / "job"
        cfg = load_config(None, {"model": "efficientnet-lite0", "layers": ["_fc"], "out": str(out), "progress": False,
                                 "batch_size": 25, "workers": 0, "data": {"root": str(sample_root()), "split": "val"},
                                 "describe": {"units": 1, "faithfulness_images": 0, "gallery": False}})
        t = time.perf_counter()
        record(cfg)
        describe(cfg)
        check = json.loads((out / "describe.json").read_text())["final_layer_check"]
        rows = {}
        for log in (out / "describe").glob("*/units*.jsonl"):
            for line in log.read_text().splitlines():
                r = json.loads(line)
                rows[(r["layer"], r["unit"])] = r
        named = sum(v["names_class"] for v in check["per_class"].values())
        print(f"named {named} / {check['classes']} ({time.perf_counter() - t:.0f} s)")
        for name, v in check["per_class"].items():
            r = rows[(check["layer"], v["unit"])]
            print(f"{name:18s} unit {v['unit']:4d} {'ok  ' if v['names_class'] else 'MISS'} {v['description']!r:22s} "
                  f"{r['score']:.2f}  {r['candidates'][1:4]}")


if __name__ == "__main__":
    main()
