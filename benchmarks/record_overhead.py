"""Record overhead and memory benchmark (not a test).

Part 1 (ratio): the same pre-decoded batches go through (a) the bare forward pass and (b) the recording step
(hooks on every requested layer + running top-k + quantile + mean), alternating batch by batch so both see the
same machine load, with the heap settings the record pass uses (:mod:`neuroscribe.heap`) in force for
both. Prints, side by side, wall time, user and system CPU time, the system-time share and minor page faults per
image (``getrusage`` deltas) of each path, the per-batch ratios with their median, then ``ratio <record/bare>``
(target <= 1.10). A whole alternating pass is run and thrown away first, so that neither path pays first-touch page
faults that the other did not.
Part 2 (memory): full ``record()`` runs (data loading included) on N1 and N4 images in fresh subprocesses;
prints peak RSS, minor faults per image and the user/system split of each (the whole process, model loading
included; DataLoader workers not counted) and the peak-RSS ratio (target: flat -- the state is O(units x k) plus
the bounded quantile buffer).

    python benchmarks/record_overhead.py            # 256 images for the ratio, 1k and 4k for memory
    python benchmarks/record_overhead.py --quick    # well under two minutes
    ... --memory-repeats 3   # each memory size 3 times, alternating; the ratio of the median peaks
    ... --long-run   # also the ratio after 2 x batch x k photos folded in (untimed), sampling planned for 4,000

Both sizes of the headline measure a run's first photos: until a unit's top-k has seen about 2 x batch x k photos
most units change every batch (the top-k prefilter waits that long), and below ~4 x the sample size per unit every
layer keeps exact quantiles. ``--long-run`` measures the regime that most batches of a long run are in instead (a
labelled extra line; the headline is unchanged).

It measures the checkout it lives in (its ``neuroscribe`` comes first on ``sys.path``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

IMAGENETTE = ROOT.parent / "shared" / "data" / "imagenette"
LAYERS = [f"_blocks.{i}" for i in range(16)] + ["_conv_head", "_fc"]


def data_root() -> str:
    from neuroscribe.datasets.probe import sample_root
    return str(IMAGENETTE) if IMAGENETTE.is_dir() else str(sample_root())


def heap_settings():
    """The record pass's heap settings (a no-op context in checkouts that predate them)."""
    try:
        from neuroscribe.heap import reuse_freed_memory
    except ImportError:
        try:  # checkouts before the settings moved to the core
            from neuroscribe.record.heap import reuse_freed_memory
        except ImportError:
            return contextlib.nullcontext(False)
    return reuse_freed_memory()


def usage() -> tuple[int, float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_minflt, r.ru_utime, r.ru_stime


def setup(n: int, batch: int, crop: int | None, plan: int | None = None):
    """``(cfg, device, loaded model, probe set, batches)``: EfficientNet-Lite0 with every layer of ``LAYERS``, a probe
    set of ``max(plan, n)`` photos (``plan`` sizes the quantile sampling plan) and its first ``n`` photos decoded."""
    from neuroscribe.config import load_config
    from neuroscribe.datasets.probe import load_image
    from neuroscribe.record.recorder import prepare
    from neuroscribe.runtime import resolve_device
    cfg = load_config(None, {"model": "efficientnet-lite0", "layers": LAYERS, "progress": False,
                             "data": {"root": data_root(), "limit": max(plan or 0, n)}, "batch_size": batch,
                             "preprocess": {"crop": crop, "resize": crop}})
    dev = resolve_device(cfg.device)
    lm, probe = prepare(cfg, dev)
    if len(probe) < n:
        sys.exit(f"{len(probe)} photos under {data_root()}: fewer than the {n} this run needs")
    tf = lm.preprocess.transform()
    xs = [torch.stack([tf(load_image(s.path)) for s in probe.samples[i:min(i + batch, n)]])
          for i in range(0, n, batch)]
    return cfg, dev, lm, probe, xs


def ratio(n_images: int, batch: int, crop: int | None, warm: int = 0, plan: int | None = None) -> dict:
    """Record vs bare on ``n_images``; with ``warm``, measured only after the recorder has folded in ``warm`` images
    (not timed) of a probe set of ``plan`` images (its quantile sampling plan: what a long run of that size uses)."""
    from neuroscribe.record.recorder import Recorder
    cfg, dev, lm, probe, xs = setup(warm + n_images, batch, crop, plan)
    model = lm.module
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    acc = {p: {"s": 0.0, "faults": 0, "user_s": 0.0, "sys_s": 0.0} for p in ("bare", "record")}
    per_batch = []  # (bare s, record s) of each measured batch
    with heap_settings() as heap:
        for measured in (False, True):  # a whole throwaway pass first: both paths reach their memory high-water
            rec = Recorder(cfg, lm, probe, dev)  # mark, so neither pays first-touch page faults the other did not
            rec.probe_shapes()
            start = 0
            for x in xs:
                ids = torch.arange(start, start + len(x))
                start += len(x)
                if start <= warm:  # folded in, not timed
                    rec.step(x, ids)
                    continue
                pair = []
                for path in ("bare", "record"):
                    sync()
                    u0, t = usage(), time.perf_counter()
                    if path == "bare":
                        with torch.no_grad():
                            model(x.to(dev))
                    else:
                        rec.step(x, ids)
                    sync()
                    dt, u1 = time.perf_counter() - t, usage()
                    pair.append(dt)
                    if measured:
                        a = acc[path]
                        a["s"] += dt
                        a["faults"] += u1[0] - u0[0]
                        a["user_s"] += u1[1] - u0[1]
                        a["sys_s"] += u1[2] - u0[2]
                if measured:
                    per_batch.append(tuple(pair))
    n = sum(len(x) for x in xs) - warm
    for a in acc.values():
        a["faults_per_image"] = round(a.pop("faults") / n)
        a["sys_share"] = round(a["sys_s"] / max(a["user_s"] + a["sys_s"], 1e-9), 3)
        a.update({k: round(a[k], 2) for k in ("s", "user_s", "sys_s")})
    units = sum(m["units"] for m in rec.layer_meta.values())
    return {"images": n, "layers": len(LAYERS), "units": units, "device": str(dev), "heap_reuse": bool(heap),
            "bare": acc["bare"], "record": acc["record"], "ratio": round(acc["record"]["s"] / acc["bare"]["s"], 3),
            "batch_ratios": [round(r / b, 3) for b, r in per_batch],
            "median_batch_ratio": round(statistics.median(r / b for b, r in per_batch), 3),
            "bare_img_per_s": round(n / acc["bare"]["s"], 1)}


def record_run(n: int, crop: int | None, batch: int) -> dict:
    """A full ``record()`` of ``n`` images in a fresh process: peak RSS, faults per image, CPU time split."""
    code = f"""
import resource, sys, tempfile, json
sys.path.insert(0, {str(ROOT)!r})
from neuroscribe.config import load_config
from neuroscribe.record.recorder import record
with tempfile.TemporaryDirectory() as d:
    record(load_config(None, {{"model": "efficientnet-lite0", "layers": {LAYERS!r}, "progress": False,
        "data": {{"root": {data_root()!r}, "limit": {n}}}, "out": d, "batch_size": {batch}, "workers": 2,
        "preprocess": {{"crop": {crop!r}, "resize": {crop!r}}}}}))
r = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps([r.ru_maxrss / 1024, r.ru_minflt, r.ru_utime, r.ru_stime]))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT))
    if r.returncode:
        sys.exit(f"the record run of {n} images failed:\n{r.stderr[-3000:]}")
    rss, faults, user, sys_s = json.loads(r.stdout.strip().splitlines()[-1])
    return {"images": n, "peak_rss_mib": round(rss), "faults_per_image": round(faults / n), "user_s": round(user, 1),
            "sys_s": round(sys_s, 1), "sys_share": round(sys_s / max(user + sys_s, 1e-9), 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--images", type=int, help="images for the ratio (default 256; quick 48)")
    ap.add_argument("--batch", type=int, help="batch size for the ratio (default 32; quick 16)")
    ap.add_argument("--sizes", type=int, nargs=2, help="image counts of the memory runs (default 1000 4000; "
                                                        "quick 60 240)")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory runs")
    ap.add_argument("--memory-repeats", type=int, default=1, metavar="R",
                    help="run each memory size R times, alternating the sizes; the ratio is of the median peaks "
                         "(one size's peak RSS moved by up to ~160 MiB run to run here)")
    ap.add_argument("--long-run", action="store_true",
                    help="also the ratio in a long run's regime: measured after 2 x batch x k photos folded in, with "
                         "the quantile sampling plan of a 4,000-photo probe set (a labelled extra line; the headline "
                         "stays the first photos from an empty state)")
    a = ap.parse_args()
    torch.manual_seed(0)
    if a.quick:
        r = ratio(a.images or 48, a.batch or 16, 160)
        sizes, crop = tuple(a.sizes or (60, 240)), 96
    else:
        r = ratio(a.images or 256, a.batch or 32, None)
        sizes, crop = tuple(a.sizes or (1000, 4000)), None
    import neuroscribe
    from neuroscribe.runtime import cpu_name
    print(f"machine: {platform.machine()} ({cpu_name()}), {os.cpu_count()} cpus, load average "
          f"{os.getloadavg()[0]:.1f}, torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"neuroscribe from {Path(neuroscribe.__file__).parent}")
    print(f"record vs bare forward, EfficientNet-Lite0, {r['layers']} layers / {r['units']} units, "
          f"{r['images']} images on {r['device']}, alternating batch by batch; glibc heap reuse "
          f"{'on' if r['heap_reuse'] else 'off'} for both")
    print(f"{'':22s}{'bare':>10s}{'record':>10s}")
    for key, label in [("s", "wall s"), ("user_s", "user s"), ("sys_s", "system s"), ("sys_share", "system share"),
                       ("faults_per_image", "minor faults / image")]:
        print(f"{label:22s}{r['bare'][key]:>10}{r['record'][key]:>10}")
    print(f"bare forward: {r['bare_img_per_s']} images/s")
    print(f"record / bare per batch: {r['batch_ratios']} (median {r['median_batch_ratio']:.2f}; a batch that a "
          f"neighbouring job slowed shows as an outlier here)")
    out = {"ratio": r}
    if a.long_run:
        b = a.batch or (16 if a.quick else 32)
        warm = 2 * b * 15  # the top-k prefilter's start at the default record.k (15)
        lr = ratio(a.images or (48 if a.quick else 256), b, 160 if a.quick else None, warm=warm, plan=4000)
        print(f"long-run regime (a labelled variant): after {warm} photos folded in, sampling planned for 4,000: "
              f"wall {lr['bare']['s']} vs {lr['record']['s']} s, per batch {lr['batch_ratios']} (median "
              f"{lr['median_batch_ratio']:.2f}), ratio {lr['ratio']:.2f}")
        out["long_run"] = dict(lr, warm=warm, plan=4000)
    if not a.no_memory:
        runs = {n: [] for n in sizes}
        for _ in range(max(1, a.memory_repeats)):
            for n in sizes:
                runs[n].append(record_run(n, crop, 16 if a.quick else 32))
        px = f" at {crop} px" if crop else ""
        for n, ms in runs.items():
            for m in ms:
                print(f"full record of {n} images{px}: peak RSS {m['peak_rss_mib']} MiB, {m['faults_per_image']} "
                      f"minor faults / image, user {m['user_s']}s, system {m['sys_s']}s ({m['sys_share']:.0%})")
        peak = {n: statistics.median(m["peak_rss_mib"] for m in ms) for n, ms in runs.items()}
        ratio_mem = peak[sizes[1]] / peak[sizes[0]]
        of = f" (of the median peaks of {a.memory_repeats} runs each)" if a.memory_repeats > 1 else ""
        print(f"memory ratio {sizes[1]}/{sizes[0]} images: {ratio_mem:.2f}{of}")
        out.update(memory={n: ms[0] for n, ms in runs.items()}, memory_ratio=round(ratio_mem, 3))
        if a.memory_repeats > 1:
            out["memory_runs"] = runs
    print(f"ratio {r['ratio']:.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
