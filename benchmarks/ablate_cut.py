"""MILAN's ordering and the validation curve with and without the cut (:mod:`neuroscribe.ablate.cut`: one pass up to a
layer a batch scores all of that layer's units), measured side by side in one run, alternating (not a test):

    python benchmarks/ablate_cut.py JOBDIR [--units 40] [--rounds 2]     # a finished study seed job
    python benchmarks/ablate_cut.py [--units 40] [--rounds 2]            # EfficientNet-Lite0, no job needed

With a job (e.g. ``benchmarks/milan_study.py``'s ``seed0``): its model, its validation images (the ablate stage's
own, decoded once) and the first ``--units`` candidates of its description flag set, in the ablate stage's order.
Without: EfficientNet-Lite0 at 64 px on 1,000 Imagenette val photos (a class-stratified seeded sample; the shipped
sample without ../shared), their own labels, ``--units`` units drawn with a seed across ``_blocks.3``, ``_blocks.8``,
``_blocks.12`` and ``_conv_head``. Prints the seconds of each round, the ratio full / cut and whether the scores and
the curve are identical (they must be).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from neuroscribe.ablate.select import accuracy_curve, order_units
from neuroscribe.runtime import cpu_name


def job_setup(job: Path, n: int):
    from neuroscribe.ablate.stage import model_and_means, validation_batches
    from neuroscribe.cli import _stage_cfg
    from neuroscribe.config import load_config
    from neuroscribe.datasets.sets import class_index
    cfg = _stage_cfg(load_config(str(job / "config.yaml"), {"out": str(job), "progress": False}))
    lm, dev, _, means = model_and_means(cfg)
    val, _, names, desc = validation_batches(cfg, lm)
    ordered = json.loads((job / "ablation.json").read_text())["variants"]["description"]["ordered"]
    units = [(l, u) for l, u, _ in ordered][:n]
    kw = dict(method=cfg.ablate.method, means=means, device=dev, class_index=class_index(lm, names))
    return lm.module, val, units, kw, f"{job} ({desc}), {cfg.ablate.method} ablation"


def lite0_setup(n: int):
    from neuroscribe.datasets.probe import load_image, sample_root
    from neuroscribe.datasets.sets import class_index
    from neuroscribe.datasets.splits import stratified_sample
    from neuroscribe.models import load_model
    imagenette = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenette"
    root = (imagenette if imagenette.is_dir() else sample_root()) / "val"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [(f, c) for c, d in enumerate(classes) for f in sorted((root / d).iterdir())]
    ids = stratified_sample([c for _, c in files], min(1000, len(files)), 0, purpose="benchmark")
    lm = load_model("efficientnet-lite0")
    tf = lm.preprocess.with_overrides(resize=73, crop=64).transform()
    x = torch.stack([tf(load_image(files[i][0])) for i in ids])
    y = torch.tensor([files[i][1] for i in ids])
    val = [(x[i:i + 128], y[i:i + 128]) for i in range(0, len(ids), 128)]
    widths = {"_blocks.3": 40, "_blocks.8": 80, "_blocks.12": 112, "_conv_head": 1280}
    pool = [(l, u) for l, w in widths.items() for u in range(w)]
    units = random.Random(0).sample(pool, n)
    return lm.module, val, units, dict(device="cpu", class_index=class_index(lm, classes)), \
        f"EfficientNet-Lite0 at 64 px, {len(ids)} photos of {root}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("job", type=Path, nargs="?", help="a finished study seed job (default: EfficientNet-Lite0)")
    ap.add_argument("--units", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    model, val, units, kw, what = job_setup(a.job, a.units) if a.job else lite0_setup(a.units)
    print(f"{what}; {len(units)} units; {cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    seconds: dict[bool, list[float]] = {True: [], False: []}
    results = {}
    for r in range(a.rounds):
        for cut in (True, False) if r % 2 == 0 else (False, True):
            t = time.perf_counter()
            order = order_units(model, units, val, progress=False, cut=cut, **kw)
            curve = accuracy_curve(model, order, val, 20, progress=False, cut=cut, **kw)
            seconds[cut].append(time.perf_counter() - t)
            results[cut] = (order, curve)
            print(f"round {r} {'cut ' if cut else 'full'}: {seconds[cut][-1]:.1f} s", flush=True)
    full, cut = statistics.median(seconds[False]), statistics.median(seconds[True])
    print(f"order {len(units)} units + curve of {len(results[True][1])} points: full passes {full:.1f} s, cut "
          f"{cut:.1f} s, ratio full / cut {full / cut:.2f}; identical scores and curve: "
          f"{results[True] == results[False]}")


if __name__ == "__main__":
    main()
