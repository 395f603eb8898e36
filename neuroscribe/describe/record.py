"""Record stage: one streaming pass over the probe set that keeps, for every unit of every requested layer, its
top-k exemplar images (with low-resolution activation maps), its activation quantile (mask threshold) and its
mean activation (for mean ablation).

Artifacts (``JOBDIR/record/<key>/``, ``key`` = hash of everything that changes the result):

- ``meta.json``   model spec, weights fingerprint, preprocessing, layers (kind, units, map shape), k, quantile and
                  how it was computed, dataset fingerprint, image counts, skipped images with reasons;
- ``images.parquet``  one row per probe image: id, path (relative to the data root), label, group, skipped;
- ``layers/<layer>.safetensors``  ``scores [U,k] f32`` (spatial-max activation), ``ids [U,k] i64`` (image ids,
                  -1 where fewer than k images), ``maps [U,k,h,w] f16`` (the unit's activation map on each
                  exemplar at the layer's resolution), ``threshold [U] f32``, ``mean [U] f32``;
- ``run.json``    timings and throughput (the only file that differs between identical runs).

``JOBDIR/record.json`` points at the current key. Writes are atomic; state is checkpointed every
``record.checkpoint_every`` batches under ``<key>/partial`` and an interrupted run resumes from it, producing the
same bytes as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import io
from ..config import JobConfig
from ..datasets.probe import ImageDataset, ProbeSet, collate_skipping, open_probe_set
from ..hooks import prefix_tokens, resolve_layers, run, trace, unit_view
from ..models import LoadedModel, load_model
from .stats import QuantileSketch, TopK

FORMAT_VERSION = 1
log = logging.getLogger("neuroscribe.record")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available; use device: cpu or auto")
    return dev


def layer_file(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) + ".safetensors"


def prepare(cfg: JobConfig, device: torch.device | None = None) -> tuple[LoadedModel, ProbeSet]:
    """Load the model (with preprocessing overrides) and probe set, and check the layers: no work yet."""
    device = device or resolve_device(cfg.device)
    if not cfg.layers:
        raise ValueError(f"no layers to record: set `layers:` (run `neuroscribe layers {cfg.model.spec}`)")
    lm = load_model(cfg.model.spec, arch=cfg.model.arch, num_classes=cfg.model.num_classes,
                    allow_pickle=cfg.model.allow_pickle, device=device)
    lm.preprocess = lm.preprocess.with_overrides(**cfg.preprocess.model_dump())
    resolve_layers(lm.module, cfg.layers)
    probe = open_probe_set(cfg.data.root, cfg.data.format, cfg.data.split, cfg.data.limit, cfg.seed)
    return lm, probe


def cache_key(cfg: JobConfig, lm: LoadedModel, probe: ProbeSet) -> tuple[str, dict]:
    ident = {
        "format_version": FORMAT_VERSION, "model": lm.spec, "weights": lm.fingerprint(),
        "layers": list(cfg.layers), "preprocess": lm.preprocess.to_dict(), "k": cfg.record.k,
        "quantile": cfg.record.quantile, "quantile_budget_mb": cfg.record.quantile_budget_mb,
        "dataset": {"fingerprint": probe.fingerprint(), "n": len(probe), "limit": cfg.data.limit,
                    "split": cfg.data.split, "seed": cfg.seed},
    }
    import hashlib
    key = hashlib.blake2b(json.dumps(ident, sort_keys=True).encode(), digest_size=8).hexdigest()
    return key, ident


class LayerState:
    """Everything kept for one layer during the pass; mergeable across shards."""

    def __init__(self, units: int, map_shape: tuple[int, int], k: int, q: float, n_images: int,
                 budget_bytes: float, device):
        self.topk = TopK(units, k, map_shape, device)
        self.quant = QuantileSketch(units, q, n_images, map_shape[0] * map_shape[1], budget_bytes, device)
        self.sum = torch.zeros(units, dtype=torch.float64, device=device)
        self.n = 0

    def update(self, acts: torch.Tensor, ids: torch.Tensor) -> None:
        self.topk.update(acts, ids)
        self.quant.update(acts, ids)
        self.sum += acts.float().mean((2, 3)).sum(0).double()
        self.n += acts.shape[0]

    def merge(self, other: "LayerState") -> None:
        self.topk.merge(other.topk)
        self.quant.merge(other.quant)
        self.sum += other.sum
        self.n += other.n

    def state(self) -> dict[str, torch.Tensor]:
        st = {f"topk.{k}": v for k, v in self.topk.state().items()}
        st.update({f"quant.{k}": v for k, v in self.quant.state().items()})
        st["sum"] = self.sum
        st["n"] = torch.tensor([self.n])
        return st

    def load(self, st: dict[str, torch.Tensor]) -> None:
        self.topk.load({k[5:]: v for k, v in st.items() if k.startswith("topk.")})
        self.quant.load({k[6:]: v for k, v in st.items() if k.startswith("quant.")})
        self.sum, self.n = st["sum"].double(), int(st["n"][0])


@dataclass
class Recorder:
    """The streaming pass over a list of image ids (all of them, or one rank's shard)."""

    cfg: JobConfig
    lm: LoadedModel
    probe: ProbeSet
    device: torch.device
    states: dict[str, LayerState] | None = None
    layer_meta: dict[str, dict] | None = None
    calls: dict[str, int] | None = None

    def _init_states(self, outputs: dict[str, torch.Tensor]) -> None:
        self.states, self.layer_meta = {}, {}
        budget = self.cfg.record.quantile_budget_mb * 2**20
        for name in self.cfg.layers:
            raw = outputs[name]
            n_prefix = prefix_tokens(self.lm.module, raw.shape[1]) if raw.dim() == 3 else None
            v = unit_view(raw, n_prefix)
            kind = {4: "conv", 3: "tokens", 2: "flat"}[raw.dim()]
            self.states[name] = LayerState(v.shape[1], tuple(v.shape[2:]), self.cfg.record.k,
                                           self.cfg.record.quantile, len(self.probe), budget, self.device)
            self.layer_meta[name] = {"kind": kind, "units": int(v.shape[1]), "map_shape": list(v.shape[2:]),
                                     "output_shape": list(raw.shape[1:]), "prefix_tokens": n_prefix,
                                     "file": f"layers/{layer_file(name)}"}

    def probe_shapes(self) -> None:
        """One blank forward pass: output shapes and how often each layer is called per pass."""
        crop = self.lm.preprocess.crop
        with torch.no_grad(), trace(self.lm.module, self.cfg.layers) as tr:
            run(self.lm.module, torch.zeros(1, 3, crop, crop, device=self.device))
        self.calls = dict(tr.calls)
        self._init_states(tr.outputs)

    def step(self, x: torch.Tensor, ids: torch.Tensor) -> None:
        if self.states is None:
            self.probe_shapes()
        with torch.no_grad(), trace(self.lm.module, self.cfg.layers, stop=True, calls=self.calls) as tr:
            run(self.lm.module, x.to(self.device, non_blocking=True))
        for name, st in self.states.items():
            st.update(unit_view(tr.outputs[name], self.layer_meta[name]["prefix_tokens"]), ids)

    def state(self) -> dict[str, torch.Tensor]:
        return {f"{name}::{k}": v for name, st in self.states.items() for k, v in st.state().items()}

    def load(self, flat: dict[str, torch.Tensor]) -> None:
        for name, st in self.states.items():
            pre = f"{name}::"
            st.load({k[len(pre):]: v.to(self.device) for k, v in flat.items() if k.startswith(pre)})

    def loader(self, ids: list[int]):
        ds = ImageDataset(self.probe, self.lm.preprocess.transform(), ids)
        return torch.utils.data.DataLoader(ds, batch_size=self.cfg.batch_size, shuffle=False,
                                           num_workers=self.cfg.workers, collate_fn=collate_skipping,
                                           pin_memory=self.device.type == "cuda",
                                           persistent_workers=False)


def _progress(cfg: JobConfig, total: int, initial: int, desc: str):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, unit="img", desc=desc, disable=not cfg.progress,
                dynamic_ncols=True, smoothing=0.1)


def run_pass(rec: Recorder, ids: list[int], partial: Path | None, desc: str = "record") -> dict:
    """Feed ``ids`` through the recorder, checkpointing to ``partial`` and resuming from it."""
    cfg = rec.cfg
    done, skipped = 0, []
    if partial is not None and (partial / "progress.json").is_file():
        prog = json.loads((partial / "progress.json").read_text())
        if prog.get("ids_hash") == hash_ids(ids):
            from safetensors.torch import load_file
            rec.probe_shapes()
            rec.load(load_file(str(partial / "state.safetensors")))
            done, skipped = prog["done"], prog["skipped"]
            log.info("resuming %s after %d of %d images", desc, done, len(ids))
    bar = _progress(cfg, len(ids), done, desc)
    t0 = time.perf_counter()
    seen = 0
    for b, (x, bid, failed) in enumerate(rec.loader(ids[done:]), 1):
        for i, reason in failed:
            skipped.append([int(i), rec.probe.relpath(i), reason])
            log.warning("skipped image %s: %s", rec.probe.relpath(i), reason)
        if x is not None:
            rec.step(x, bid)
        n = len(bid) + len(failed)
        done += n
        seen += n
        bar.update(n)
        if partial is not None and b % cfg.record.checkpoint_every == 0 and done < len(ids):
            if rec.states is not None:
                io.save_tensors(partial / "state.safetensors", rec.state())
                io.write_json(partial / "progress.json", {"done": done, "skipped": skipped,
                                                          "ids_hash": hash_ids(ids)})
    bar.close()
    if rec.states is None:
        rec.probe_shapes()  # every image failed: still write (empty) artifacts
    return {"skipped": skipped, "seconds": time.perf_counter() - t0, "images_this_run": seen}


def hash_ids(ids: list[int]) -> str:
    import hashlib
    return hashlib.blake2b(",".join(map(str, ids)).encode(), digest_size=8).hexdigest()


def write_artifacts(rec: Recorder, out: Path, ident: dict, key: str, skipped: list, timing: dict) -> None:
    """Write the finished recording into ``out`` (a fresh directory)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    (out / "layers").mkdir(parents=True, exist_ok=True)
    layers = {}
    for name, st in rec.states.items():
        thr = st.quant.value()
        mean = (st.sum / max(st.n, 1)).float().cpu()
        scores, ids, maps = st.topk.scores, st.topk.ids, st.topk.maps
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
    })
    with io.atomic_path(out / "images.parquet") as tmp:
        pq.write_table(table, tmp)
    meta = dict(ident, key=key, layers=layers, data_root=str(probe.root), class_names=probe.class_names,
                n_images=len(probe), n_recorded=len(probe) - len(skipped), n_skipped=len(skipped),
                skipped=skipped, model_info=rec.lm.info, lm_class_names=rec.lm.class_names)
    io.write_json(out / "meta.json", meta)
    io.write_json(out / "run.json", timing)


def record(cfg: JobConfig) -> Path:
    """Run (or reuse) the record stage of ``cfg``; returns the recording directory."""
    device = resolve_device(cfg.device)
    lm, probe = prepare(cfg, device)
    key, ident = cache_key(cfg, lm, probe)
    job = Path(cfg.out)
    final = job / "record" / key
    job.mkdir(parents=True, exist_ok=True)
    io.write_text(job / "config.yaml", cfg.dump())
    if (final / "meta.json").is_file():
        log.info("record: artifacts for key %s are current; nothing to do", key)
        io.write_json(job / "record.json", {"key": key, "path": f"record/{key}"})
        return final
    partial = job / "record" / f"{key}.partial"
    partial.mkdir(parents=True, exist_ok=True)
    rec = Recorder(cfg, lm, probe, device)
    t0 = time.perf_counter()
    res = run_pass(rec, list(range(len(probe))), partial)
    timing = {"seconds": round(time.perf_counter() - t0, 3), "images_this_run": res["images_this_run"],
              "images_per_second": round(res["images_this_run"] / max(res["seconds"], 1e-9), 2),
              "device": str(device), "batch_size": cfg.batch_size, "workers": cfg.workers}
    with io.atomic_dir(final) as tmp:
        write_artifacts(rec, tmp, ident, key, res["skipped"], timing)
    shutil.rmtree(partial, ignore_errors=True)
    io.write_json(job / "record.json", {"key": key, "path": f"record/{key}"})
    n_units = sum(m["units"] for m in rec.layer_meta.values())
    log.info("record: %d units in %d layers, %d images (%d skipped) in %.1fs -> %s", n_units, len(rec.states),
             len(probe), len(res["skipped"]), timing["seconds"], final)
    return final
