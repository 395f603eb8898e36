"""Deferred quantile merges, on and off, side by side (not a test).

Three paths alternate batch by batch over the same pre-decoded photos, so all see the same machine load: the bare
forward, the record step merging each batch's quantile candidates right away (the way before deferral), and the record
step as it is (a full buffer's candidates merged many batches at once). The two recorders are fed the same batches;
only batches after ``--warm`` photos (folded in untimed) are timed, and the quantile sampling plan is that of a
``--plan``-photo probe set, i.e. the regime of most batches of a long run. Prints both ratios to the bare forward and
whether the two recorders' quantile buffers are identical (they must be).

    python benchmarks/quantile_deferral.py                      # 224 px, batch 32, 960 warm-up + 256 timed photos
    python benchmarks/quantile_deferral.py --crop 160 --batch 16 --warm 480 --images 160
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from record_overhead import LAYERS, heap_settings, setup  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--warm", type=int, default=960, help="photos folded in before timing (untimed)")
    ap.add_argument("--images", type=int, default=256, help="photos timed")
    ap.add_argument("--plan", type=int, default=4000, help="probe size the quantile sampling plan is made for")
    a = ap.parse_args()
    from neuroscribe.record import quantile
    from neuroscribe.record.recorder import Recorder
    cfg, dev, lm, probe, xs = setup(a.warm + a.images, a.batch, a.crop, a.plan)
    deferred = quantile.QuantileSketch._defer

    def every_batch(self, u0, cand):
        self._merge_chunk(u0, cand)
    recs = {"every_batch": Recorder(cfg, lm, probe, dev), "deferred": Recorder(cfg, lm, probe, dev)}
    for r in recs.values():
        r.probe_shapes()
    times = {"bare": [], "every_batch": [], "deferred": []}
    try:
        with heap_settings():
            for j, x in enumerate(xs):
                ids = torch.arange(j * a.batch, j * a.batch + len(x))
                for path in times:
                    quantile.QuantileSketch._defer = every_batch if path == "every_batch" else deferred
                    t = time.perf_counter()
                    if path == "bare":
                        with torch.no_grad():
                            lm.module(x.to(dev))
                    else:
                        recs[path].step(x, ids)
                    if j * a.batch >= a.warm:
                        times[path].append(time.perf_counter() - t)
    finally:
        quantile.QuantileSketch._defer = deferred
    same = all(torch.equal(recs["every_batch"].states[name].quant.top, recs["deferred"].states[name].quant.top)
               for name in LAYERS)
    bare = sum(times["bare"])
    print(f"EfficientNet-Lite0, {len(LAYERS)} layers, {a.crop} px, batch {a.batch}: {a.warm} photos folded in "
          f"untimed, {a.images} timed, sampling planned for {a.plan}; torch threads {torch.get_num_threads()}")
    for path in ("every_batch", "deferred"):
        med = statistics.median(t / b for t, b in zip(times[path], times["bare"]))
        print(f"record / bare, quantile candidates merged {path.replace('_', ' ')}: {sum(times[path]) / bare:.3f} "
              f"(median per batch {med:.3f})")
    print(f"quantile buffers identical: {same}")
    if not same:
        sys.exit("the deferred merges changed the quantile buffers")


if __name__ == "__main__":
    main()
