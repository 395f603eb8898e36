"""Record overhead and memory benchmark (not a test).

Part 1 (ratio): the same pre-decoded batches go through (a) the bare forward pass and (b) the recording step
(hooks on every requested layer + running top-k + quantile + mean), alternating batch by batch so both see the
same machine load. Prints ``ratio <record/bare>`` (target <= 1.10).
Part 2 (memory): full ``record()`` runs (data loading included) on N1 and N4 images in fresh subprocesses; prints
peak RSS for each (target: flat -- state is O(units x k), not O(images)).

    python benchmarks/record_overhead.py            # 256 images for the ratio, 1k and 4k for memory
    python benchmarks/record_overhead.py --quick    # ends within about a minute
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
IMAGENETTE = ROOT.parent / "shared" / "data" / "imagenette"
LAYERS = [f"_blocks.{i}" for i in range(16)] + ["_conv_head", "_fc"]


def data_root() -> str:
    from neuroscribe.datasets.probe import sample_root
    return str(IMAGENETTE) if IMAGENETTE.is_dir() else str(sample_root())


def ratio(n_images: int, batch: int, crop: int | None) -> dict:
    from neuroscribe.config import load_config
    from neuroscribe.datasets.probe import load_image, open_probe_set
    from neuroscribe.record.recorder import Recorder, prepare
    from neuroscribe.runtime import resolve_device
    cfg = load_config(None, {"model": "efficientnet-lite0", "layers": LAYERS, "progress": False,
                             "data": {"root": data_root(), "limit": n_images}, "batch_size": batch,
                             "preprocess": {"crop": crop, "resize": crop}})
    dev = resolve_device(cfg.device)
    lm, probe = prepare(cfg, dev)
    tf = lm.preprocess.transform()
    xs = [torch.stack([tf(load_image(s.path)) for s in probe.samples[i:i + batch]])
          for i in range(0, len(probe), batch)]
    rec = Recorder(cfg, lm, probe, dev)
    rec.probe_shapes()
    model = lm.module
    with torch.no_grad():  # warm-up both paths
        model(xs[0].to(dev))
    rec.step(xs[0], torch.arange(len(xs[0])))
    rec = Recorder(cfg, lm, probe, dev)
    rec.probe_shapes()
    bare = recd = 0.0
    start = 0
    for x in xs:
        ids = torch.arange(start, start + len(x))
        start += len(x)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            model(x.to(dev))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        bare += time.perf_counter() - t
        t = time.perf_counter()
        rec.step(x, ids)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        recd += time.perf_counter() - t
    units = sum(m["units"] for m in rec.layer_meta.values())
    return {"images": len(probe), "layers": len(LAYERS), "units": units, "bare_s": round(bare, 2),
            "record_s": round(recd, 2), "ratio": round(recd / bare, 3), "device": str(dev),
            "bare_img_per_s": round(len(probe) / bare, 1)}


def peak_memory(n: int, crop: int | None, batch: int) -> float:
    code = f"""
import resource, tempfile, json
from neuroscribe.config import load_config
from neuroscribe.record.recorder import record
with tempfile.TemporaryDirectory() as d:
    record(load_config(None, {{"model": "efficientnet-lite0", "layers": {LAYERS!r}, "progress": False,
        "data": {{"root": {data_root()!r}, "limit": {n}}}, "out": d, "batch_size": {batch}, "workers": 2,
        "preprocess": {{"crop": {crop!r}, "resize": {crop!r}}}}}))
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--images", type=int, help="images for the ratio (default 256; quick 48)")
    ap.add_argument("--batch", type=int, help="batch size for the ratio (default 32; quick 16)")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory runs")
    a = ap.parse_args()
    torch.manual_seed(0)
    if a.quick:
        r = ratio(a.images or 48, a.batch or 16, 160)
        sizes, crop = (60, 240), 96
    else:
        r = ratio(a.images or 256, a.batch or 32, None)
        sizes, crop = (1000, 4000), None
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch "
          f"{torch.__version__}, threads {torch.get_num_threads()}")
    print(f"record vs bare forward, EfficientNet-Lite0, {r['layers']} layers / {r['units']} units, "
          f"{r['images']} images on {r['device']}: bare {r['bare_s']}s, record {r['record_s']}s")
    print(f"bare forward: {r['bare_img_per_s']} images/s")
    if a.no_memory:
        print(f"ratio {r['ratio']:.2f}")
        return
    mem = {n: peak_memory(n, crop, 16 if a.quick else 32) for n in sizes}
    for n, m in mem.items():
        print(f"peak RSS, full record of {n} images{' at ' + str(crop) + ' px' if crop else ''}: {m:.0f} MiB")
    print(f"memory ratio {sizes[1]}/{sizes[0]} images: {mem[sizes[1]] / mem[sizes[0]]:.2f}")
    print(f"ratio {r['ratio']:.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"ratio": r, "peak_rss_mib": mem}, indent=1))


if __name__ == "__main__":
    main()
