"""The recorder's state: per layer, the streaming top-k exemplars with their maps, the quantile sketch and the
exact mean (:class:`LayerState`), and the :class:`Recorder` that folds each batch's hooked outputs into them, in
unit chunks of about ``CHUNK_BYTES`` of scratch memory."""

from __future__ import annotations

import functools
import logging
import math
import re
from dataclasses import dataclass

import torch

from ..config import JobConfig
from ..datasets.probe import ImageDataset, ProbeSet, collate_skipping
from ..fusion import fold_for_inference, to_layout, uses_conv2d
from ..hooks import (LayoutError, declare_layouts, layer_layout, layout_from_resize, prefix_tokens, run, trace,
                     unit_view)
from ..models import LoadedModel
from .quantile import rank_error_of
from .stats import CascadeSum, QuantileSketch, TopK

CHUNK_BYTES = 256 * 2**20  # target scratch memory of one unit chunk
STATE_GPU_FRACTION = 0.25  # states stay on the GPU while they fit in this share of its free memory
FUSE_MAX_POSITIONS = 256  # same-shape layers with at most this many positions per map are folded in together
log = logging.getLogger("neuroscribe.record")


def layer_file(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) + ".safetensors"


class LayerState:
    """Everything kept for one layer during the pass; mergeable across shards."""

    def __init__(self, units: int, map_shape: tuple[int, int], k: int, q: float, n_images: int,
                 budget_bytes: float, device, chunk: int | None = None, rank_error: float = 0.0):
        self.topk = TopK(units, k, map_shape, device)
        self.quant = QuantileSketch(units, q, n_images, map_shape[0] * map_shape[1], budget_bytes, device,
                                    rank_error)
        self.sums = CascadeSum(units, device)
        self.units, self.map_shape = units, tuple(map_shape)
        self.n = 0
        self.chunk = chunk  # units per chunk (None: all at once)
        self._next_leaf = 0

    @staticmethod
    def chunk_units(units: int, positions: int, k: int, m: int, batch: int, target_bytes: float) -> int:
        """Units per chunk so that one chunk's scratch (activation copies, merges, map gathers) is ~target."""
        per_unit = 6 * batch * positions + 32 * m + 4 * k * positions + 64
        return int(max(1, min(units, target_bytes // per_unit)))

    @staticmethod
    def state_bytes(units: int, positions: int, k: int, q: float, n_images: int, budget_bytes: float,
                    rank_error: float = 0.0) -> int:
        m = QuantileSketch(1, q, n_images, positions, budget_bytes / max(units, 1), rank_error=rank_error).m
        quant = min(units * m * 4, int(budget_bytes * 1.2)) * 5 // 4  # + deferred candidates (up to ~m/4 a unit)
        return units * k * (positions * 2 + 12) + quant + units * 8 * 40

    @property
    def sum(self) -> torch.Tensor:
        """Per-unit sum of the per-image spatial means (float64)."""
        return self.sums.total()

    def update(self, acts: torch.Tensor, ids: torch.Tensor, leaf: int | None = None) -> None:
        """Fold in ``acts [B, U, H, W]`` of images ``ids``; ``leaf`` is the batch's global index (for the mean)."""
        b = acts.shape[0]
        if b == 0:
            return
        self.topk.update(acts, ids, self.chunk)
        self.quant.update(acts, ids, self.chunk)
        u = acts.shape[1]
        step = self.chunk or u
        total = torch.empty(u, dtype=torch.float64, device=acts.device)
        for u0 in range(0, u, step):
            total[u0:u0 + step] = acts[:, u0:u0 + step].float().mean((2, 3)).double().sum(0)
        leaf = self._next_leaf if leaf is None else int(leaf)
        self.sums.add(leaf, total)
        self._next_leaf = leaf + 1
        self.n += b

    @staticmethod
    def concat(states: list["LayerState"], chunk_bytes: float, batch: int) -> "LayerState":
        """One state over the units of ``states`` side by side (same map shape, k, quantile plan, batches seen):
        every statistic is per unit, so folding a batch into it equals folding each layer's part into its own."""
        first = states[0]
        units = sum(st.units for st in states)
        out = LayerState(units, first.map_shape, first.topk.k, first.quant.q, 1, math.inf, first.topk.scores.device)
        out.quant.m, out.quant.rate, out.quant.count = first.quant.m, first.quant.rate, first.quant.count
        out.topk.scores = torch.cat([st.topk.scores for st in states])
        out.topk.ids = torch.cat([st.topk.ids for st in states])
        out.topk._maps = torch.cat([st.topk._maps for st in states])
        out.topk.slot = torch.cat([st.topk.slot for st in states])
        for st in states:
            st.quant.flush()  # deferred candidates into the buffers that are joined
        out.quant.top = torch.cat([st.quant._top for st in states])
        out.sums.nodes = {key: torch.cat([st.sums.nodes[key] for st in states]) for key in first.sums.nodes}
        out.n, out._next_leaf = first.n, first._next_leaf
        out.chunk = LayerState.chunk_units(units, first.map_shape[0] * first.map_shape[1], first.topk.k,
                                           first.quant.m, batch, chunk_bytes)
        return out

    def show(self, states: list["LayerState"]) -> None:
        """Point each of ``states`` (the parts :meth:`concat` joined) at its units of this state (views)."""
        u0 = 0
        for st in states:
            u1 = u0 + st.units
            st.topk.scores, st.topk.ids = self.topk.scores[u0:u1], self.topk.ids[u0:u1]
            st.topk._maps, st.topk.slot = self.topk._maps[u0:u1], self.topk.slot[u0:u1]
            st.quant._top, st.quant._is_sorted = self.quant._top[u0:u1], self.quant._is_sorted
            st.quant._pending, st.quant._parent = {}, self.quant  # reads flush the parent's deferred merges
            st.quant.count = self.quant.count
            st.sums.nodes = {key: v[u0:u1] for key, v in self.sums.nodes.items()}
            st.n, st._next_leaf = self.n, self._next_leaf
            u0 = u1

    def merge(self, other: "LayerState") -> None:
        self.topk.merge(other.topk, self.chunk)
        self.quant.merge(other.quant, self.chunk)
        self.sums.merge(other.sums)
        self.n += other.n
        self._next_leaf = max(self._next_leaf, other._next_leaf)

    def state(self) -> dict[str, torch.Tensor]:
        st = {f"topk.{k}": v for k, v in self.topk.state().items()}
        st.update({f"quant.{k}": v for k, v in self.quant.state().items()})
        st.update({f"sum.{k}": v for k, v in self.sums.state().items()})
        st["n"] = torch.tensor([self.n, self._next_leaf])
        return st

    def load(self, st: dict[str, torch.Tensor]) -> None:
        self.topk.load({k[5:]: v for k, v in st.items() if k.startswith("topk.")})
        self.quant.load({k[6:]: v for k, v in st.items() if k.startswith("quant.")})
        self.sums.load({k[4:]: v for k, v in st.items() if k.startswith("sum.")})
        self.n, self._next_leaf = int(st["n"][0]), int(st["n"][1])


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
    chunk_bytes: float | None = None  # None: the module's CHUNK_BYTES
    state_device: torch.device | str | None = None  # None: decided per layer (see the module docstring)
    groups: list[tuple[list[str], LayerState | None]] | None = None  # layers folded in together (see _fuse)
    _buffers: dict | None = None  # a fused group's side-by-side outputs of the current batch (kept)
    _offsets: dict | None = None  # first unit of each fused layer in its group's buffer
    _run: tuple | None = None  # (module, channels-last) the pass runs: see run_module
    fold_info: dict | None = None  # what fold_for_inference did (None: record.fold_model off)

    def _state_devices(self, shapes: dict[str, tuple[int, int, int]]) -> dict[str, torch.device]:
        """Where each layer's state lives: the compute device while the states fit, else host memory."""
        cpu = torch.device("cpu")
        if self.state_device is not None:
            return {name: torch.device(self.state_device) for name in shapes}
        if self.device.type != "cuda":
            return {name: cpu for name in shapes}  # CPU; MPS has no float64
        free = torch.cuda.mem_get_info(self.device)[0] * STATE_GPU_FRACTION
        out = {}
        r = self.cfg.record
        for name, (u, h, w) in shapes.items():
            need = LayerState.state_bytes(u, h * w, r.k, r.quantile, len(self.probe), r.quantile_budget_mb * 2**20,
                                          r.quantile_rank_error)
            out[name] = self.device if need <= free else cpu
            free -= need if need <= free else 0
            if out[name] == cpu:
                log.info("layer %s: state (%.0f MiB) kept in host memory", name, need / 2**20)
        return out

    def _init_states(self, outputs: dict[str, torch.Tensor]) -> None:
        self.states, self.layer_meta = {}, {}
        r = self.cfg.record
        budget = r.quantile_budget_mb * 2**20
        views = {}
        for name in self.cfg.layers:
            raw = outputs[name]
            n_prefix = prefix_tokens(self.lm.module, raw.shape[1]) if raw.dim() == 3 else None
            layout = layer_layout(self.lm.module, name, tuple(raw.shape), self.cfg.layouts)
            views[name] = (raw, n_prefix, layout, unit_view(raw, n_prefix, layout))
        devices = self._state_devices({n: tuple(v.shape[1:]) for n, (*_, v) in views.items()})
        for name, (raw, n_prefix, layout, v) in views.items():
            kind = {4: "conv", 3: "tokens", 2: "flat"}[raw.dim()]
            units, shape = int(v.shape[1]), tuple(v.shape[2:])
            st = LayerState(units, shape, r.k, r.quantile, len(self.probe), budget, devices[name],
                            rank_error=r.quantile_rank_error)
            st.chunk = LayerState.chunk_units(units, shape[0] * shape[1], r.k, st.quant.m, self.cfg.batch_size,
                                              self.chunk_bytes or CHUNK_BYTES)
            planned = (rank_error_of(r.quantile, int(len(self.probe) * shape[0] * shape[1] * st.quant.rate))
                       if r.quantile_rank_error and st.quant.rate < 1 else 0.0)
            if planned > r.quantile_rank_error * 1.01:
                log.warning("layer %s: record.quantile_budget_mb (%g) holds a sample of rank error ~%.4f, above "
                            "record.quantile_rank_error %g: raise the budget for the target", name,
                            r.quantile_budget_mb, planned, r.quantile_rank_error)
            self.states[name] = st
            self.layer_meta[name] = {"kind": kind, "units": units, "map_shape": list(shape),
                                     "output_shape": list(raw.shape[1:]), "prefix_tokens": n_prefix,
                                     "layout": layout, "file": f"layers/{layer_file(name)}"}
        self._fuse()

    def _fuse(self) -> None:
        """Group layers whose maps are small (<= FUSE_MAX_POSITIONS positions) and alike (shape, state device,
        quantile plan): each group is folded in as one state over its units side by side, which costs one set of
        tensor operations instead of one per layer; the layers' own states are views of it (results identical)."""
        buckets: dict = {}
        for name, st in self.states.items():
            h, w = st.map_shape
            key = ((st.map_shape, str(st.topk.scores.device), st.quant.m, st.quant.rate)
                   if h * w <= FUSE_MAX_POSITIONS else name)
            buckets.setdefault(key, []).append(name)
        self.groups, self._buffers, self._offsets = [], {}, {}
        for names in buckets.values():
            fused = None
            if len(names) > 1:
                u0 = 0
                for n in names:
                    self._offsets[n], u0 = u0, u0 + self.states[n].units
                fused = LayerState.concat([self.states[n] for n in names], self.chunk_bytes or CHUNK_BYTES,
                                          self.cfg.batch_size)
                fused.show([self.states[n] for n in names])
            self.groups.append((names, fused))

    def _blank_pass(self, size: int):
        with torch.no_grad(), trace(self.lm.module, self.cfg.layers) as tr:
            run(self.lm.module, torch.zeros(1, 3, size, size, device=self.device))
        return tr

    def probe_shapes(self) -> None:
        """One blank forward pass: output shapes and how often each layer is called per pass. A 4-D output whose
        shape fits both layouts (channels = height = width) gets a second blank pass at another input size; the
        axis that kept its length is the channel axis, declared on the model for this recording and its edits."""
        crop = self.lm.preprocess.crop
        tr = self._blank_pass(crop)
        self.calls = dict(tr.calls)
        unsure = {}
        for name in self.cfg.layers:
            shape = tuple(tr.outputs[name].shape)
            try:
                layer_layout(self.lm.module, name, shape, self.cfg.layouts)
            except LayoutError as e:
                unsure[name] = (shape, e)
        if unsure:
            try:
                other = self._blank_pass(crop + 32).outputs
            except Exception:  # a model bound to one input size: the first error stands
                raise next(iter(unsure.values()))[1] from None
            found = {n: layout_from_resize(n, shape, tuple(other[n].shape)) for n, (shape, _) in unsure.items()}
            log.info("layouts told apart by a second blank pass at %d px: %s", crop + 32, found)
            declare_layouts(self.lm.module, found)
        self._init_states(tr.outputs)

    def run_module(self) -> tuple[torch.nn.Module, bool]:
        """The module the pass runs and whether its inputs go channels-last. With ``record.fold_model``: an
        inference copy with batch norm and symmetric zero pads folded into the convolutions (:func:`~neuroscribe.
        fusion.fold_for_inference`; every recorded layer kept, checked on a seeded noise batch, so every process and
        every resumed run folds alike), held in the channels-last layout (NHWC kernels; with the norms folded ~1.8x
        faster than the model as loaded on EfficientNet-Lite0, ``benchmarks/record_overhead.py``). Otherwise, or when
        nothing folds, the model as loaded, untouched."""
        if self._run is None:
            module, nhwc = self.lm.module, False
            if self.cfg.record.fold_model:
                crop = self.lm.preprocess.crop
                noise = torch.randn(2, 3, crop, crop, generator=torch.Generator().manual_seed(0)).to(self.device)
                module, self.fold_info = fold_for_inference(self.lm.module, noise, keep=self.cfg.layers)
                if module is not self.lm.module and uses_conv2d(module):  # a private copy: converted once, kept
                    module, nhwc = module.to(memory_format=torch.channels_last), True
            self._run = (module, nhwc)
        return self._run

    def step(self, x: torch.Tensor, ids: torch.Tensor, leaf: int | None = None) -> None:
        """Fold one batch in; ``leaf`` is its global batch index (the position of its sum in the mean's tree).

        Each layer is folded in inside its forward hook, while the model waits (:func:`trace`'s ``visit``): no
        copy of every output is kept until the end of the pass. The layers of a fused group are copied side by side
        into one buffer (kept between batches) and folded in when the last of them has run."""
        if self.states is None:
            self.probe_shapes()
        done: set[int] = set()
        visit = {}
        for g, (names, fused) in enumerate(self.groups):
            if fused is None:
                visit[names[0]] = functools.partial(self._fold_layer, g, ids, leaf, done)
            else:
                arrived: set[str] = set()
                for name in names:
                    visit[name] = functools.partial(self._fold_member, g, name, arrived, ids, leaf, done)
        module, nhwc = self.run_module()
        with torch.no_grad(), trace(module, visit=visit, stop=True, calls=self.calls):
            run(module, to_layout(x.to(self.device, non_blocking=True), nhwc))
        if len(done) < len(self.groups):
            missing = [n for g, (names, _) in enumerate(self.groups) if g not in done for n in names]
            raise RuntimeError(f"layers {missing} did not run in this forward pass (called fewer times than on the "
                               f"first blank pass): their outputs cannot be recorded")

    def _view(self, name: str, t: torch.Tensor) -> torch.Tensor:
        meta = self.layer_meta[name]
        return unit_view(t, meta["prefix_tokens"], meta["layout"])

    def _fold_layer(self, g: int, ids: torch.Tensor, leaf: int | None, done: set, t: torch.Tensor) -> None:
        name = self.groups[g][0][0]
        self.states[name].update(self._view(name, t), ids, leaf)
        done.add(g)

    def _fold_member(self, g: int, name: str, arrived: set, ids: torch.Tensor, leaf: int | None, done: set,
                     t: torch.Tensor) -> None:
        names, fused = self.groups[g]
        v = self._view(name, t)
        buf = self._buffers.get(g)
        shape = (v.shape[0], fused.units, *v.shape[2:])
        if buf is None or tuple(buf.shape) != shape or buf.dtype != v.dtype or buf.device != v.device:
            buf = self._buffers[g] = torch.empty(shape, dtype=v.dtype, device=v.device)
        u0 = self._offsets[name]
        buf[:, u0:u0 + v.shape[1]].copy_(v)
        arrived.add(name)
        if len(arrived) == len(names):
            fused.update(buf, ids, leaf)
            fused.show([self.states[n] for n in names])
            done.add(g)

    def state(self) -> dict[str, torch.Tensor]:
        """Every layer's state, flat (the layers of a fused group are views of one tensor: copied, so that no two
        tensors share memory)."""
        shared = {n for names, fused in self.groups or [] if fused is not None for n in names}
        return {f"{name}::{k}": v.clone() if name in shared else v
                for name, st in self.states.items() for k, v in st.state().items()}

    def load(self, flat: dict[str, torch.Tensor]) -> None:
        for name, st in self.states.items():
            pre = f"{name}::"
            part = {k[len(pre):]: v for k, v in flat.items() if k.startswith(pre)}
            if not part:
                raise KeyError(f"checkpoint holds no state for layer {name!r}")
            st.load(part)
        self._fuse()

    def loader(self, ids: list[int]):
        ds = ImageDataset(self.probe, self.lm.preprocess.transform(), ids, resize=self.lm.preprocess.resize)
        return torch.utils.data.DataLoader(ds, batch_size=self.cfg.batch_size, shuffle=False,
                                           num_workers=self.cfg.workers, collate_fn=collate_skipping,
                                           pin_memory=self.device.type == "cuda",
                                           persistent_workers=False)
