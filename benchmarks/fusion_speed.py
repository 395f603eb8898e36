"""The describe stage's inference passes with and without :func:`neuroscribe.fusion.fold_for_inference` (batch norm
and symmetric pads folded into the convolutions), measured side by side in one run, alternating, on the same batch
of real photos, both in the channels-last layout the stage uses (not a test):

    python benchmarks/fusion_speed.py [--model efficientnet-lite0] [--batch 32] [--repeats 5]

Prints what was folded, the largest difference of the logits, and the median seconds per batch of each with the
ratio unfolded / folded (> 1: folding is faster).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from PIL import Image

from neuroscribe.datasets.probe import sample_root
from neuroscribe.fusion import fold_for_inference
from neuroscribe.models import channels_last, load_model, to_layout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="efficientnet-lite0")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    lm = load_model(a.model)
    photos = sorted((sample_root() / "test").rglob("*.jpg"))[:: max(1, 300 // a.batch)][: a.batch]
    x = torch.stack([lm.preprocess.transform()(Image.open(p).convert("RGB")) for p in photos])
    t0 = time.perf_counter()
    folded, info = fold_for_inference(lm.module, x[:2])
    t_fold = time.perf_counter() - t0
    times: dict[str, list[float]] = {"unfolded": [], "folded": []}
    with torch.no_grad():
        diff = float((lm.module(x) - folded(x)).abs().max())
        for _ in range(a.repeats):
            for name, m in (("unfolded", lm.module), ("folded", folded)):
                with channels_last(m) as nhwc:
                    xx = to_layout(x, nhwc)
                    m(xx)  # warm-up in this layout
                    t = time.perf_counter()
                    m(xx)
                    times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{a.model}: {info} (traced and checked in {t_fold:.2f}s); max |logit difference| {diff:.2e}")
    print(f"batch {len(photos)} at {x.shape[-1]} px, {torch.get_num_threads()} threads, median of {a.repeats}: "
          f"unfolded {med['unfolded']:.3f}s, folded {med['folded']:.3f}s, ratio {med['unfolded'] / med['folded']:.2f}x")


if __name__ == "__main__":
    main()
