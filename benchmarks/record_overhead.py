"""Record overhead and memory benchmark (not a test).

Part 1 (ratio): the same pre-decoded batches go through, alternating batch by batch so all see the same machine load,
with the heap settings the record pass uses (:mod:`neuroscribe.heap`) in force for all:
(a) the bare forward pass of the model as loaded;
(b) the recording step as the stage runs it (hooks on every requested layer + running top-k + quantile + mean, on the
    folded channels-last copy of ``record.fold_model``, the default);
(c) the bare forward of that same folded copy (what (b) costs beyond it is the hooks' own work);
(d) the recording step with ``record.fold_model: false`` (the model as loaded: the pass before the copy existed).
Prints, side by side, wall time, user and system CPU time, the system-time share and minor page faults per image
(``getrusage`` deltas) of each path, the per-batch ratios (b)/(a) with their median, the ratios (b)/(c) and (d)/(a),
then ``ratio <(b)/(a)>`` (the issue's record / bare forward; target <= 1.10). A whole alternating pass is run and
thrown away first, so that no path pays first-touch page faults that another did not.
Part 2 (memory): full ``record()`` runs (data loading included) on N1 and N4 images in fresh subprocesses; prints peak
RSS (the child's own ``VmHWM``: its ``ru_maxrss`` would be at least this benchmark's RSS at the fork, as Linux carries
it over exec -- what this benchmark printed before 2026-12-06 10:00 UTC), minor faults per image and the user/system
split of each (the whole process, model loading included; DataLoader workers not counted), the ratio of the median
peaks (target: flat -- the state is O(units x k) plus the bounded quantile buffer), and, within each N4 run, its peak
after N4 images over its peak after the first N1. Three kinds of run, alternating: (1) the record stage as shipped
(inside :mod:`neuroscribe.heap`'s settings: freed blocks stay on the heap); (2) the same with every block of 128 KiB
or more mmapped and unmapped (``MALLOC_MMAP_MAX_`` set for the child: heap.py stays out, and setting it also freezes
glibc's mmap threshold at its initial 128 KiB), so the peak is what is alive, the same in every run -- the growth with
images without the heap's fragmentation; ``--no-glibc-control`` skips it); (3) the control: the same process loads the
model and data the same way and runs only the pass's module (the folded copy) over the same batches under (1)'s
settings, recording nothing (the spread that the model's own forward gives the peak of (1): ~+-10 % run to run at 224
px, from the order in which the heap's blocks are freed; ``--no-bare-control`` skips it).

    python benchmarks/record_overhead.py            # 256 images for the ratio, 1k and 4k for memory
    python benchmarks/record_overhead.py --quick    # well under two minutes
    ... --memory-repeats 3   # each memory size 3 times, alternating; the ratio of the median peaks
    ... --long-run   # also the ratio after 2 x batch x k photos folded in (untimed), sampling planned for 4,000

Both sizes of the headline measure a run's first photos: until a unit's top-k has seen about 2 x batch x k photos
most units change every batch (the top-k prefilter waits that long), and below ~4 x the sample size per unit every
layer keeps exact quantiles. ``--long-run`` measures the regime that most batches of a long run are in instead (a
labelled extra line; the headline is unchanged).

It measures the checkout it lives in (its ``neuroscribe`` comes first on ``sys.path``); a checkout without
``record.fold_model`` measures (a) and (b) only.
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
    folds = hasattr(cfg.record, "fold_model")
    plain_cfg = (cfg.model_copy(update={"record": cfg.record.model_copy(update={"fold_model": False})})
                 if folds else None)
    model = lm.module
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    paths = ("bare", "record", "bare_folded", "record_plain") if folds else ("bare", "record")
    acc = {p: {"s": 0.0, "faults": 0, "user_s": 0.0, "sys_s": 0.0} for p in paths}
    per_batch = []  # (bare s, record s) of each measured batch
    with heap_settings() as heap:
        for measured in (False, True):  # a whole throwaway pass first: every path reaches its memory high-water
            rec = Recorder(cfg, lm, probe, dev)  # mark, so none pays first-touch page faults the others did not
            rec.probe_shapes()
            if folds:
                from neuroscribe.fusion import to_layout
                fast, nhwc = rec.run_module()
                plain = Recorder(plain_cfg, lm, probe, dev)
                plain.probe_shapes()
            start = 0
            for x in xs:
                ids = torch.arange(start, start + len(x))
                start += len(x)
                if start <= warm:  # folded in, not timed
                    rec.step(x, ids)
                    if folds:
                        plain.step(x, ids)
                    continue
                pair = {}
                for path in paths:
                    sync()
                    u0, t = usage(), time.perf_counter()
                    if path == "bare":
                        with torch.no_grad():
                            model(x.to(dev))
                    elif path == "bare_folded":
                        with torch.no_grad():
                            fast(to_layout(x.to(dev), nhwc))
                    elif path == "record":
                        rec.step(x, ids)
                    else:
                        plain.step(x, ids)
                    sync()
                    dt, u1 = time.perf_counter() - t, usage()
                    pair[path] = dt
                    if measured:
                        a = acc[path]
                        a["s"] += dt
                        a["faults"] += u1[0] - u0[0]
                        a["user_s"] += u1[1] - u0[1]
                        a["sys_s"] += u1[2] - u0[2]
                if measured:
                    per_batch.append((pair["bare"], pair["record"]))
    n = sum(len(x) for x in xs) - warm
    for a in acc.values():
        a["faults_per_image"] = round(a.pop("faults") / n)
        a["sys_share"] = round(a["sys_s"] / max(a["user_s"] + a["sys_s"], 1e-9), 3)
        a.update({k: round(a[k], 2) for k in ("s", "user_s", "sys_s")})
    units = sum(m["units"] for m in rec.layer_meta.values())
    extra = {} if not folds else {
        "bare_folded": acc["bare_folded"], "record_plain": acc["record_plain"], "fold": rec.fold_info,
        "ratio_to_folded_forward": round(acc["record"]["s"] / acc["bare_folded"]["s"], 3),
        "ratio_fold_off": round(acc["record_plain"]["s"] / acc["bare"]["s"], 3)}
    return {"images": n, "layers": len(LAYERS), "units": units, "device": str(dev), "heap_reuse": bool(heap),
            **extra, "bare": acc["bare"], "record": acc["record"],
            "ratio": round(acc["record"]["s"] / acc["bare"]["s"], 3),
            "batch_ratios": [round(r / b, 3) for b, r in per_batch],
            "median_batch_ratio": round(statistics.median(r / b for b, r in per_batch), 3),
            "bare_img_per_s": round(n / acc["bare"]["s"], 1)}


def record_run(n: int, crop: int | None, batch: int, fold: bool = True, mark: int | None = None,
               glibc: bool = False, bare: bool = False) -> dict:
    """A full ``record()`` of ``n`` images in a fresh process: peak RSS, faults per image, CPU time split (``fold``
    False: with ``record.fold_model`` off). With ``mark``, also the process's peak RSS once ``mark`` images have been
    folded in (``peak_at_mark_mib``): growth within one run, free of the run-to-run spread of the peak. ``glibc``:
    with ``MALLOC_MMAP_MAX_`` in the environment: :mod:`neuroscribe.heap` stays out and glibc's mmap threshold stays at
    128 KiB (setting the maximum turns its dynamic threshold off), so every larger block is mmapped and unmapped and the
    peak is what is alive, without the heap's fragmentation. ``bare``:
    instead of recording, the same process runs only the pass's module (the folded copy) over the same batches,
    loaded the same way (blank pass and states included), under the same heap settings -- the control for the peak's
    spread."""
    extra = "" if fold else ', "record": {"fold_model": False}'
    cfg = f"""load_config(None, {{"model": "efficientnet-lite0", "layers": {LAYERS!r}, "progress": False,
        "data": {{"root": {data_root()!r}, "limit": {n}}}, "out": d, "batch_size": {batch}, "workers": 2,
        "preprocess": {{"crop": {crop!r}, "resize": {crop!r}}}{extra}}})"""
    work = f"""
    from neuroscribe.record.recorder import prepare
    from neuroscribe.heap import reuse_freed_memory
    from neuroscribe.hooks import run
    from neuroscribe.fusion import to_layout
    from neuroscribe.runtime import resolve_device
    import torch
    c = {cfg}
    dev = resolve_device(c.device)
    lm, probe = prepare(c, dev)
    rec = state.Recorder(c, lm, probe, dev)
    with reuse_freed_memory(), torch.no_grad():
        rec.probe_shapes()  # what the stage's first step does: the blank pass, the states, then the fold
        module, nhwc = rec.run_module()
        for x, ids, failed in rec.loader(list(range(len(probe)))):
            if x is not None:  # a batch of unreadable images only: nothing to run
                run(module, to_layout(x.to(dev, non_blocking=True), nhwc))
            seen[0] += len(ids)
            if {mark!r} is not None and at_mark[0] is None and seen[0] >= {mark!r}:
                at_mark[0] = hwm()""" if bare else f"""
    record({cfg})"""
    code = f"""
import resource, sys, tempfile, json
sys.path.insert(0, {str(ROOT)!r})
from neuroscribe.config import load_config
from neuroscribe.record import state
from neuroscribe.record.recorder import record


def hwm():  # this process's own peak: ru_maxrss also holds the benchmark's RSS at the fork (kept over exec)
    try:
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024
    except OSError:
        return None


seen, at_mark, step = [0], [None], state.Recorder.step


def counted(self, x, ids, leaf=None):
    step(self, x, ids, leaf)
    seen[0] += len(ids)
    if {mark!r} is not None and at_mark[0] is None and seen[0] >= {mark!r}:
        at_mark[0] = hwm()


state.Recorder.step = counted
with tempfile.TemporaryDirectory() as d:{work}
r = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps([hwm(), at_mark[0], r.ru_maxrss / 1024, r.ru_minflt, r.ru_utime, r.ru_stime]))
"""
    env = dict(os.environ, **({"MALLOC_MMAP_MAX_": "65536"} if glibc else {}))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT), env=env)
    if r.returncode:
        sys.exit(f"the record run of {n} images failed:\n{r.stderr[-3000:]}")
    peak, at_mark, maxrss, faults, user, sys_s = json.loads(r.stdout.strip().splitlines()[-1])
    return {"images": n, "mmap_every_block": glibc, "bare": bare,
            "peak_rss_mib": round(peak if peak is not None else maxrss),
            "peak_from": "VmHWM" if peak is not None else "ru_maxrss (may hold this benchmark's own peak)",
            **({"mark": mark, "peak_at_mark_mib": round(at_mark)} if at_mark is not None else {}),
            "ru_maxrss_mib": round(maxrss), "faults_per_image": round(faults / n), "user_s": round(user, 1),
            "sys_s": round(sys_s, 1), "sys_share": round(sys_s / max(user + sys_s, 1e-9), 3)}


def median_peak(ms: list[dict]) -> float:
    return statistics.median(m["peak_rss_mib"] for m in ms)


def memory_section(a, sizes: tuple[int, int], crop: int | None, batch: int) -> dict:
    """Part 2: every kind of run at both sizes, ``--memory-repeats`` times, alternating; prints and returns them."""
    kinds = {"record": {}, "glibc": {"glibc": True}, "bare": {"bare": True}, "fold_off": {"fold": False}}
    if a.no_glibc_control:
        kinds.pop("glibc")
    if a.no_bare_control:
        kinds.pop("bare")
    if not a.memory_fold_off:
        kinds.pop("fold_off")
    runs = {k: {n: [] for n in sizes} for k in kinds}
    for _ in range(max(1, a.memory_repeats)):
        for n in sizes:
            for k, kw in kinds.items():
                runs[k][n].append(record_run(n, crop, batch, mark=sizes[0] if n == sizes[1] else None, **kw))
    px = f" at {crop} px" if crop else ""
    label = {"record": "full record", "glibc": "full record, every block >= 128 KiB mmapped (no heap reuse)",
             "bare": "bare forward of the pass's module alone (control)", "fold_off": "full record, fold_model off"}
    for k, by_n in runs.items():
        for n, ms in by_n.items():
            for m in ms:
                print(f"{label[k]} of {n} images{px}: peak RSS {m['peak_rss_mib']} MiB, {m['faults_per_image']} minor "
                      f"faults / image, user {m['user_s']}s, system {m['sys_s']}s ({m['sys_share']:.0%})")
    out = {}
    of = f" (of the median peaks of {a.memory_repeats} runs each)" if a.memory_repeats > 1 else ""
    for k, by_n in runs.items():
        ratio_k = median_peak(by_n[sizes[1]]) / median_peak(by_n[sizes[0]])
        spread = [m["peak_rss_mib"] for ms in by_n.values() for m in ms]
        print(f"memory ratio {sizes[1]}/{sizes[0]} images, {label[k]}: {ratio_k:.3f}{of}; peaks "
              f"{min(spread)}-{max(spread)} MiB")
        within = [m["peak_rss_mib"] / m["peak_at_mark_mib"] for m in by_n[sizes[1]] if m.get("peak_at_mark_mib")]
        if within:
            print(f"  within each {sizes[1]}-image run, peak after {sizes[1]} / after its first {sizes[0]} images: "
                  + ", ".join(f"{m['peak_rss_mib']}/{m['peak_at_mark_mib']} MiB" for m in by_n[sizes[1]])
                  + f" -> {statistics.median(within):.3f} (median)")
        key = "" if k == "record" else f"_{k}"
        out[f"memory_ratio{key}"] = round(ratio_k, 3)
        if within:
            out[f"memory_growth_within_run{key}"] = round(statistics.median(within), 4)
        out[f"memory_runs{key}"] = by_n
    out["memory"] = {n: ms[0] for n, ms in runs["record"].items()}
    return out


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
    ap.add_argument("--memory-fold-off", action="store_true",
                    help="also each memory run with record.fold_model off, alternating (peak RSS with and without "
                         "the folded copy)")
    ap.add_argument("--no-glibc-control", action="store_true",
                    help="skip the memory runs with every block >= 128 KiB mmapped (the peak without fragmentation)")
    ap.add_argument("--no-bare-control", action="store_true",
                    help="skip the memory runs of the bare forward alone (the spread of the model's own peak)")
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
    cols = [c for c in ("bare", "record", "bare_folded", "record_plain") if c in r]
    print(f"{'':22s}" + "".join(f"{c:>14s}" for c in cols))
    for key, label in [("s", "wall s"), ("user_s", "user s"), ("sys_s", "system s"), ("sys_share", "system share"),
                       ("faults_per_image", "minor faults / image")]:
        print(f"{label:22s}" + "".join(f"{r[c][key]:>14}" for c in cols))
    if "bare_folded" in r:
        print(f"bare = the model as loaded; record = the stage's pass (on the folded channels-last copy: {r['fold']}); "
              f"bare_folded = that copy's bare forward; record_plain = the pass with record.fold_model false")
        print(f"record / bare_folded (the hooks' own cost): {r['ratio_to_folded_forward']:.2f}; record_plain / bare "
              f"(the pass on the model as loaded): {r['ratio_fold_off']:.2f}")
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
              f"{lr['median_batch_ratio']:.2f}), ratio {lr['ratio']:.2f}"
              + (f" (record / bare_folded {lr['ratio_to_folded_forward']:.2f}, record_plain / bare "
                 f"{lr['ratio_fold_off']:.2f})" if "bare_folded" in lr else ""))
        out["long_run"] = dict(lr, warm=warm, plan=4000)
    if not a.no_memory:
        out.update(memory_section(a, sizes, crop, 16 if a.quick else 32))
    print(f"ratio {r['ratio']:.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
