"""Record stage: one streaming pass over the probe set that keeps, for every unit of every requested layer, its
top-k exemplar images (with low-resolution activation maps), its activation quantile (mask threshold) and its
mean activation (for mean ablation).

Artifacts (``JOBDIR/record/<key>/``, ``key`` = hash of everything that changes the result):

- ``meta.json``   model spec, weights fingerprint, preprocessing, layers (kind, units, map shape, layout: 'nchw' or
                  'nhwc' for a map as :func:`neuroscribe.hooks.layer_layout` decided, null for tokens and flat
                  outputs), k, quantile and how it was computed, dataset fingerprint, image counts, skipped images
                  with reasons;
- ``images.parquet``  one row per probe image: id, path (relative to the data root), label, group, skipped;
- ``layers/<layer>.safetensors``  ``scores [U,k] f32`` (spatial-max activation), ``ids [U,k] i64`` (image ids,
                  -1 where fewer than k images), ``maps [U,k,h,w] f16`` (the unit's activation map on each
                  exemplar at the layer's resolution), ``threshold [U] f32``, ``mean [U] f32``;
- ``run.json``    timings and throughput (the only file that differs between identical runs).

``JOBDIR/record.json`` points at the current key. Every file is written atomically and the key directory appears
whole (it is built under a temporary name and renamed): a directory without ``meta.json`` is never a recording.

Crash safety: every ``record.checkpoint_every`` batches each rank writes its whole state *and* its progress as one
file, ``<key>.partial/rank{r}-of-{N}/state.safetensors`` (atomic rename, so a checkpoint is either the old or the
new one, never a mix). A killed run -- at any point, SIGKILL included -- resumes from it and writes the same bytes
as an uninterrupted run (``run.json`` aside). A checkpoint from another batch size, world size or probe set, or one
that cannot be read, is ignored and the shard starts over.

Several processes: ``torchrun --nproc-per-node N -m neuroscribe record JOB.yaml`` (see
:mod:`neuroscribe.distributed`). The probe set is cut into contiguous blocks of whole batches, one per rank, so
every image goes through the model in exactly the batch it would meet in a single process. Each rank keeps its
own running state and checkpoints; at the end rank 0 gathers the others' states unit-chunk by unit-chunk, merges
them and writes the artifacts. Top-k exemplars, their maps, exact-mode thresholds and the image counts are
order-independent, and so is the sampled quantile (its sample is a hash of image id and position); the per-unit
mean is a float64 sum along a fixed binary tree over batch indices (:class:`~neuroscribe.record.stats.CascadeSum`),
so its rounding does not depend on the split either. Hence N ranks write byte-identical artifacts to one process
with the same config (batch size included) -- provided each process computes the same activations. On CPU that
means the same number of intra-op threads: oneDNN kernels (EfficientNet's, for one) round differently with 1 and
2 threads; torchrun sets ``OMP_NUM_THREADS=1`` per rank, so compare with a single process run with
``OMP_NUM_THREADS=1``. On CUDA, recording sets ``cudnn.deterministic``.

Memory (per process):

- model: weights (twice with ``record.fold_model``: the folded copy the pass runs) + the forward pass up to the
  last recorded layer, for one batch;
- recorded outputs: none are copied for a layer of its own (each is folded in inside its forward hook, while the
  model waits); the layers of a fused group (same small map shape, see ``Recorder._fuse``) are copied side by side
  into one buffer of ``batch_size x sum of their U*H*W x 4`` bytes, kept between batches -- with a very wide layer,
  its own output for one batch is the term to shrink, with ``batch_size``;
- state, per layer: top-k ``U*k*(h*w*2 + 12)`` bytes + quantile ``U*m*4`` bytes (``m ~ (1-q) * s`` values per
  unit for a sample of s values: fixed by ``record.quantile_rank_error``; exact, ``(1-q) * images * h*w``; capped
  by ``record.quantile_budget_mb`` either way, see :mod:`.quantile`) + ``O(U log images)``
  for the mean. On a CUDA device the state of each layer stays on the GPU while all states fit in a quarter of
  the memory free at the start, and is kept in host memory otherwise (computation stays on the GPU);
- scratch: each batch is folded in unit chunks sized so one chunk's temporaries stay near ``CHUNK_BYTES``
  (256 MiB), whatever the number of units; only exemplars that enter a unit's top-k are copied.

So memory is independent of the number of images (exact quantiles apart), linear in units, and
a layer with tens of thousands of units and large maps needs ``U*k*h*w*2`` bytes of top-k maps plus one batch of
its output.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from pathlib import Path

import torch

from .. import distributed, io
from ..config import JobConfig
from ..datasets.probe import ProbeSet, open_probe_set
from ..heap import reuse_freed_memory
from ..hooks import resolve_layers
from ..models import LoadedModel, load_model
from ..runtime import resolve_device
from . import state as state_mod
from .state import LayerState, Recorder, layer_file  # noqa: F401 (LayerState, layer_file re-exported)
from .stats import CascadeSum

FORMAT_VERSION = 4  # 2: mean summed along a fixed tree; 3: channels-last maps read as such (per-layer layout);
# 4: the pass runs on the folded channels-last copy (record.fold_model)
log = logging.getLogger("neuroscribe.record")


def prepare(cfg: JobConfig, device: torch.device | None = None) -> tuple[LoadedModel, ProbeSet]:
    """Load the model (with preprocessing overrides) and probe set, and check the layers: no work yet."""
    device = device or resolve_device(cfg.device)
    if not cfg.layers:
        raise ValueError(f"no layers to record: set `layers:` (run `neuroscribe layers {cfg.model.spec}`)")
    lm = load_model(cfg.model.spec, arch=cfg.model.arch, num_classes=cfg.model.num_classes,
                    allow_pickle=cfg.model.allow_pickle, device=device, seed=cfg.seed)
    native = lm.preprocess.crop
    lm.preprocess = lm.preprocess.with_overrides(**cfg.preprocess.model_dump())
    if lm.preprocess.crop < native / 2:
        log.warning("recording %s at %d px, under half of its native input (%d px): units tuned to fine detail "
                    "(text, small objects) may not fire; set preprocess.crop/resize nearer %d", cfg.model.spec,
                    lm.preprocess.crop, native, native)
    resolve_layers(lm.module, cfg.layers, spec=cfg.model.spec)
    probe = open_probe_set(cfg.data.root, cfg.data.format, cfg.data.split, cfg.data.limit, cfg.seed,
                           lm.class_names)
    return lm, probe


def cache_key(cfg: JobConfig, lm: LoadedModel, probe: ProbeSet) -> tuple[str, dict]:
    ident = {
        "format_version": FORMAT_VERSION, "model": lm.spec, "weights": lm.fingerprint(),
        "layers": list(cfg.layers), "layouts": dict(sorted(cfg.layouts.items())),
        "preprocess": lm.preprocess.to_dict(), "k": cfg.record.k,
        "quantile": cfg.record.quantile, "quantile_budget_mb": cfg.record.quantile_budget_mb,
        "fold_model": cfg.record.fold_model,
        **({"quantile_rank_error": cfg.record.quantile_rank_error} if cfg.record.quantile_rank_error else {}),
        "dataset": {"fingerprint": probe.fingerprint(), "n": len(probe), "limit": cfg.data.limit,
                    "split": cfg.data.split, "seed": cfg.seed},
    }
    import hashlib
    key = hashlib.blake2b(json.dumps(ident, sort_keys=True).encode(), digest_size=8).hexdigest()
    return key, ident


def _progress(cfg: JobConfig, total: int, initial: int, desc: str):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, unit="img", desc=desc,
                disable=not cfg.progress or not distributed.is_main_process(), dynamic_ncols=True, smoothing=0.1)


PROGRESS_KEY = "__progress__"


def save_checkpoint(rec: Recorder, path: Path, progress: dict) -> None:
    """State and progress in one file, written atomically: a checkpoint is whole and self-consistent or absent."""
    blob = torch.frombuffer(bytearray(json.dumps(progress, sort_keys=True).encode()), dtype=torch.uint8)
    io.save_tensors(path, {**rec.state(), PROGRESS_KEY: blob}, metadata={"format_version": str(FORMAT_VERSION)})


def load_checkpoint(rec: Recorder, path: Path, resume_id: str) -> dict | None:
    """Load ``path`` into ``rec`` if it is a readable checkpoint of this very shard; else leave ``rec`` fresh."""
    if not path.is_file():
        return None
    from safetensors.torch import load_file
    try:
        flat = load_file(str(path))
        prog = json.loads(bytes(flat.pop(PROGRESS_KEY).numpy()).decode())
        if prog.get("resume_id") != resume_id:
            log.warning("checkpoint %s is for another shard, batch size or probe set: starting over", path)
            return None
        rec.load(flat)
        return prog
    except Exception as e:  # unreadable or foreign: never trusted, never fatal
        log.warning("ignoring unreadable checkpoint %s (%s: %s): starting over", path, type(e).__name__, e)
        rec.probe_shapes()  # a half-loaded state is thrown away
        return None


def run_pass(rec: Recorder, ids: list[int], partial: Path | None, desc: str = "record", *, leaf_offset: int = 0,
             final_checkpoint: bool = False) -> dict:
    """Feed ``ids`` through the recorder, checkpointing to ``partial`` and resuming from it.

    ``ids`` must start at a batch boundary of the whole probe set (``leaf_offset`` = its batch index there), so
    every batch holds the same images as in a single-process run. ``final_checkpoint`` also saves the state once
    the shard is done (ranks do, so a crash while merging does not cost the pass).
    """
    cfg = rec.cfg
    bs = cfg.batch_size
    if rec.states is None:
        rec.probe_shapes()
    done, skipped = 0, []
    resume_id = hash_ids(ids, f"bs={bs}", f"leaf={leaf_offset}")
    ckpt = partial / "state.safetensors" if partial is not None else None
    if ckpt is not None:
        prog = load_checkpoint(rec, ckpt, resume_id)
        if prog is not None:
            done, skipped = prog["done"], prog["skipped"]
            log.info("resuming %s after %d of %d images", desc, done, len(ids))

    def save():
        save_checkpoint(rec, ckpt, {"done": done, "skipped": skipped, "resume_id": resume_id, "n": len(ids)})

    bar = _progress(cfg, len(ids), done, desc)
    t0 = time.perf_counter()
    seen = 0
    with reuse_freed_memory():  # each batch reuses the pages the previous one freed (neuroscribe/heap.py)
        for b, (x, bid, failed) in enumerate(rec.loader(ids[done:]), 1):
            leaf = leaf_offset + done // bs
            for i, reason in failed:
                skipped.append([int(i), rec.probe.relpath(i), reason])
                log.warning("skipped image %s: %s", rec.probe.relpath(i), reason)
            if x is not None:
                rec.step(x, bid, leaf)
            n = len(bid) + len(failed)
            done += n
            seen += n
            bar.update(n)
            if ckpt is not None and b % cfg.record.checkpoint_every == 0 and done < len(ids):
                save()
    bar.close()
    if ckpt is not None and final_checkpoint and seen:
        save()
    return {"skipped": skipped, "seconds": time.perf_counter() - t0, "images_this_run": seen}


def hash_ids(ids: list[int], *extra: str) -> str:
    import hashlib
    return hashlib.blake2b(",".join([*map(str, ids), *extra]).encode(), digest_size=8).hexdigest()


def merge_ranks(rec: Recorder, res: dict, ctx: distributed.Context) -> dict:
    """Gather every rank's state into rank 0's recorder (unit chunk by unit chunk); returns the merged results.

    Memory on rank 0: its own state + one chunk from every rank (chunks of ~``chunk_bytes`` per rank).
    """
    info = {"skipped": res["skipped"], "images": res["images_this_run"], "seconds": res["seconds"],
            "layers": {name: {"topk_w": st.topk.width, "quant_w": st.quant.width, "count": st.quant.count,
                              "n": st.n, "sums": {k: v.cpu() for k, v in st.sums.state().items()}}
                       for name, st in rec.states.items()}}
    infos = distributed.gather_objects(info, dst=0)
    main = ctx.is_main
    for name, st in rec.states.items():
        if main:
            ls = [i["layers"][name] for i in infos]
            st.topk.grow(min(st.topk.k, sum(x["topk_w"] for x in ls)))
            st.quant.grow(min(st.quant.m, sum(x["quant_w"] for x in ls)))
            st.quant.count = sum(x["count"] for x in ls)
            st.n = sum(x["n"] for x in ls)
            for x in ls[1:]:
                other = CascadeSum(st.units, st.sums.device)
                other.load(x["sums"])
                st.sums.merge(other)
        # the same chunking on every rank (from config-sized maxima, not from per-rank widths)
        per_unit = st.topk.k * (st.map_shape[0] * st.map_shape[1] * 2 + 12) + st.quant.m * 4
        chunk = int(max(1, min(st.units, (rec.chunk_bytes or state_mod.CHUNK_BYTES) // per_unit)))
        for u0 in range(0, st.units, chunk):
            u1 = min(st.units, u0 + chunk)
            piece = None
            if not main:
                piece = {"scores": st.topk.scores[u0:u1].cpu().clone(), "ids": st.topk.ids[u0:u1].cpu().clone(),
                         "maps": st.topk.maps_of(u0, u1).cpu(), "top": st.quant.top[u0:u1].cpu().clone()}
            got = distributed.gather_objects(piece, dst=0)
            if main:
                for p in got[1:]:
                    st.topk.add(p["scores"], p["ids"], p["maps"], start=u0, grow=False)
                    st.quant.add(p["top"], start=u0, grow=False)
            del got, piece
    if not main:
        return {}
    return {"skipped": [s for i in infos for s in i["skipped"]], "images_this_run": sum(i["images"] for i in infos),
            "seconds": max(i["seconds"] for i in infos)}


def write_artifacts(rec: Recorder, out: Path, ident: dict, key: str, skipped: list, timing: dict) -> None:
    """Write the finished recording into ``out`` (a fresh directory)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    (out / "layers").mkdir(parents=True, exist_ok=True)
    layers = {}
    for name, st in rec.states.items():
        thr = st.quant.value()
        mean = (st.sum / max(st.n, 1)).float().cpu()
        scores, ids, maps = st.topk.scores.cpu(), st.topk.ids.cpu(), st.topk.maps.cpu()
        k = rec.cfg.record.k
        if scores.shape[1] < k:  # fewer images than k: pad
            pad = k - scores.shape[1]
            scores = torch.cat([scores, torch.full((scores.shape[0], pad), float("nan"))], 1)
            ids = torch.cat([ids, torch.full((ids.shape[0], pad), -1, dtype=torch.long)], 1)
            maps = torch.cat([maps, torch.zeros(maps.shape[0], pad, *maps.shape[2:], dtype=maps.dtype)], 1)
        io.save_tensors(out / rec.layer_meta[name]["file"],
                        {"scores": scores, "ids": ids, "maps": maps, "threshold": thr, "mean": mean},
                        metadata={"layer": name})
        layers[name] = dict(rec.layer_meta[name], quantile_method="exact" if st.quant.rate >= 1 else "sampled",
                            quantile_sample_rate=st.quant.rate, quantile_rank_error=st.quant.rank_error())
    skipped = sorted(skipped)
    bad = {i: r for i, _, r in skipped}
    probe = rec.probe
    table = pa.table({
        "id": list(range(len(probe))),
        "path": [probe.relpath(i) for i in range(len(probe))],
        "label": [s.label for s in probe.samples],
        "group": [s.group for s in probe.samples],
        "skipped": [bad.get(i) for i in range(len(probe))],
        **({"cue_class": [None if s.cue is None else s.cue[0] for s in probe.samples],  # what redraws a
            "draw_seed": [None if s.cue is None else s.cue[1] for s in probe.samples]}  # planted probe's cue
           if probe.planting is not None else {}),
    })
    with io.atomic_path(out / "images.parquet") as tmp:
        pq.write_table(table, tmp)
    meta = dict(ident, key=key, layers=layers, data_root=str(probe.root), class_names=probe.class_names,
                n_images=len(probe), n_recorded=len(probe) - len(skipped), n_skipped=len(skipped),
                skipped=skipped, model_info=rec.lm.info, lm_class_names=rec.lm.class_names, fold=rec.fold_info,
                planted=None if probe.planting is None else probe.planting.to_dict())
    io.write_json(out / "meta.json", meta)
    io.write_json(out / "run.json", timing)


def _remove_stale(record_dir: Path, key: str) -> None:
    """Temporary directories a killed run left behind for this key (never mistaken for results: no final name)."""
    for p in record_dir.glob(f".{key}.*.tmp"):
        shutil.rmtree(p, ignore_errors=True)
    shutil.rmtree(record_dir / f".{key}.old", ignore_errors=True)


def record(cfg: JobConfig) -> Path:
    """Run (or reuse) the record stage of ``cfg``; returns the recording directory.

    Under torchrun every rank calls this; rank 0 writes the artifacts and all ranks return the same path.
    """
    with distributed.session(cfg.device) as ctx:
        return _record(cfg, ctx)


def _record(cfg: JobConfig, ctx: distributed.Context) -> Path:
    t_start = time.perf_counter()
    device = distributed.compute_device(cfg.device, ctx) or resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    lm, probe = prepare(cfg, device)
    key, ident = cache_key(cfg, lm, probe)
    job = Path(cfg.out)
    record_dir = job / "record"
    final = record_dir / key
    partial_root = record_dir / f"{key}.partial"
    if ctx.is_main:
        record_dir.mkdir(parents=True, exist_ok=True)  # the config this recording was made with (its data is the
        io.write_text(record_dir / "config.yaml", cfg.dump())  # probe set), not the job's: see JOBDIR/config.yaml
    current = distributed.broadcast_object((final / "meta.json").is_file() if ctx.is_main else None)
    if current:
        if ctx.is_main:
            log.info("record: artifacts for key %s are current; nothing to do", key)
            shutil.rmtree(partial_root, ignore_errors=True)  # left by a run killed after its final write
            io.write_json(job / "record.json", {"key": key, "path": f"record/{key}"})
        distributed.barrier()
        return final
    partial = partial_root / f"rank{ctx.rank}-of-{ctx.world}"
    partial.mkdir(parents=True, exist_ok=True)
    rec = Recorder(cfg, lm, probe, device)
    bs = cfg.batch_size
    start, stop = distributed.shard_range(len(probe), ctx.world, ctx.rank, align=bs)
    desc = "record" if ctx.world == 1 else f"record (rank 0 of {ctx.world})"
    t_pass = time.perf_counter()
    res = run_pass(rec, list(range(start, stop)), partial, desc, leaf_offset=start // bs,
                   final_checkpoint=ctx.enabled)
    if ctx.enabled:
        res = merge_ranks(rec, res, ctx)
    if ctx.is_main:
        timing = {"seconds": round(time.perf_counter() - t_pass, 3), "pass_seconds": round(res["seconds"], 3),
                  "total_seconds": round(time.perf_counter() - t_start, 3),
                  "images_this_run": res["images_this_run"],
                  "images_per_second": round(res["images_this_run"] / max(res["seconds"], 1e-9), 2),
                  "device": str(device), "world_size": ctx.world, "batch_size": cfg.batch_size,
                  "workers": cfg.workers}
        _remove_stale(record_dir, key)
        with io.atomic_dir(final) as tmp:
            write_artifacts(rec, tmp, ident, key, res["skipped"], timing)
        shutil.rmtree(partial_root, ignore_errors=True)
        io.write_json(job / "record.json", {"key": key, "path": f"record/{key}"})
        n_units = sum(m["units"] for m in rec.layer_meta.values())
        log.info("record: %d units in %d layers, %d images (%d skipped) on %d rank(s) in %.1fs -> %s", n_units,
                 len(rec.states), len(probe), len(res["skipped"]), ctx.world, timing["seconds"], final)
    distributed.barrier()
    if not ctx.is_main:  # node-local job directories (multi-node without a shared file system)
        shutil.rmtree(partial, ignore_errors=True)
        with contextlib.suppress(OSError):
            partial_root.rmdir()
    return final
