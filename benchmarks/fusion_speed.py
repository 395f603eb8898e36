"""The describe stage's inference passes with and without :func:`neuroscribe.fusion.fold_for_inference` (batch norm
and symmetric pads folded into the convolutions), measured side by side in one run, alternating, on the same batch
of real photos, both in the channels-last layout the stage uses (not a test):

    python benchmarks/fusion_speed.py [--model efficientnet-lite0] [--batch 32] [--repeats 5]
    python benchmarks/fusion_speed.py --describe [--images 500] [--units 128] [--rounds 2]

Prints what was folded, the largest difference of the logits, and the median seconds per batch of each with the
ratio unfolded / folded (> 1: folding is faster). ``--describe`` times the whole describe stage instead (offline
tagger, verification on), EfficientNet-Lite0's ``_blocks.6``, ``_blocks.12`` and ``_conv_head`` (``--units`` each)
recorded once on ``--images`` Imagenette val photos (the shipped sample without ../shared), described alternately
with folding and with it switched off, in fresh job folders; it also checks that both give the same descriptions and
verification statuses.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from neuroscribe.datasets.probe import sample_root
from neuroscribe.fusion import fold_for_inference
from neuroscribe.models import channels_last, load_model, to_layout


def describe_stage(a) -> None:
    import shutil
    from neuroscribe.config import load_config
    from neuroscribe.describe import offline, verify
    from neuroscribe.describe.stage import describe
    from neuroscribe.record.recorder import record
    imagenette = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenette"
    root = imagenette if imagenette.is_dir() else sample_root()
    seconds: dict[str, list[float]] = {"unfolded": [], "folded": []}
    outcome = {}
    with tempfile.TemporaryDirectory() as d:
        over = {"model": "efficientnet-lite0", "layers": ["_blocks.6", "_blocks.12", "_conv_head"], "progress": False,
                "data": {"root": str(root), "split": "val", "limit": a.images},
                "describe": {"units": a.units, "faithfulness_images": 0, "gallery": False, "batch_units": 128}}
        record(load_config(None, {**over, "out": f"{d}/rec"}))
        for r in range(a.rounds):
            for name, fold in (("folded", fold_for_inference), ("unfolded", lambda m, x, keep=(): (m, {}))):
                verify.fold_for_inference = offline.fold_for_inference = fold
                job = Path(d) / f"{name}{r}"
                shutil.copytree(f"{d}/rec", job)
                t = time.perf_counter()
                describe(load_config(None, {**over, "out": str(job)}))
                seconds[name].append(time.perf_counter() - t)
                rows = [json.loads(line) for line in (job / "descriptions.jsonl").read_text().splitlines()]
                outcome[name] = [(x["layer"], x["unit"], x["description"], x.get("verify_status")) for x in rows]
                print(f"round {r} {name}: {seconds[name][-1]:.1f}s", flush=True)
    med = {k: statistics.median(v) for k, v in seconds.items()}
    print(f"describe stage, {len(outcome['folded'])} units, {a.images} photos from {root}: unfolded "
          f"{med['unfolded']:.1f}s, folded {med['folded']:.1f}s, ratio {med['unfolded'] / med['folded']:.2f}x; "
          f"descriptions and verification statuses identical: {outcome['folded'] == outcome['unfolded']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="efficientnet-lite0")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--describe", action="store_true")
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--units", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    if a.describe:
        return describe_stage(a)
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
