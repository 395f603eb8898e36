"""Several processes with PyTorch's own engine: ``torchrun --nproc-per-node N -m neuroscribe record JOB.yaml``.

torchrun (also across nodes, with its rendezvous: ``--nnodes 2 --rdzv-backend c10d --rdzv-endpoint HOST:PORT``)
starts one process per rank and sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`session` reads them and
joins the process group (NCCL when the ranks compute on CUDA GPUs, gloo on CPU; override with the environment
variable ``NEUROSCRIBE_DIST_BACKEND=gloo|nccl``). Without those variables everything here is a no-op for a single
process, so the same code runs with and without torchrun.

Work is split in contiguous blocks (:func:`shard_range`): concatenating the ranks' results in rank order gives
the single-process order back. Python objects travel through a gloo group on the CPU whatever the main backend
(:func:`gather_objects`, :func:`broadcast_object`), so they never need to fit on a GPU. A collective waits at most
``NEUROSCRIBE_DIST_TIMEOUT`` seconds (default 7200) for the slowest rank.

For later stages: ``shard_units(items)`` is this rank's share of a list of units and ``gather_objects(x)`` the
list of every rank's ``x`` (on rank 0, or on every rank with ``dst=None``).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("neuroscribe.distributed")

DEFAULT_TIMEOUT_S = 7200


@dataclass
class Context:
    """Where this process stands: rank, world size, and the groups it talks through."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None
    object_group: Any = None  # a gloo group for Python objects (None: the default group)
    owned: bool = False  # this module initialised the default group and tears it down

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_CTX: Context | None = None


def env_world() -> tuple[int, int, int]:
    """``(rank, world, local_rank)`` from torchrun's environment (``(0, 1, 0)`` without torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return rank, world, local


def wants_cuda(device: str) -> bool:
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def _timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get("NEUROSCRIBE_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))


def init(device: str = "auto", backend: str | None = None) -> Context:
    """Join the process group torchrun describes (or reuse one already joined); single process: a no-op."""
    global _CTX
    if dist.is_available() and dist.is_initialized():
        ctx = Context(dist.get_rank(), dist.get_world_size(), env_world()[2], dist.get_backend())
    else:
        rank, world, local = env_world()
        if world <= 1 or not dist.is_available():
            _CTX = Context()
            return _CTX
        backend = backend or os.environ.get("NEUROSCRIBE_DIST_BACKEND") or (
            "nccl" if wants_cuda(device) and torch.cuda.is_available() and dist.is_nccl_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(local % torch.cuda.device_count())
        dist.init_process_group(backend=backend, timeout=_timeout())
        ctx = Context(rank, world, local, backend, owned=True)
        log.info("rank %d of %d joined (%s)", rank, world, backend)
    if ctx.world > 1 and ctx.backend != "gloo":
        ctx.object_group = dist.new_group(backend="gloo", timeout=_timeout())
    _CTX = ctx
    return ctx


def shutdown(wait: bool = True) -> None:
    """Leave the process group if :func:`init` joined it (``wait``: after a barrier with the other ranks).

    A rank that fails does not wait: it leaves at once, so torchrun sees it exit and stops the others, instead
    of every rank blocking in mismatched collectives until the timeout.
    """
    global _CTX
    ctx, _CTX = _CTX, None
    if ctx is not None and ctx.owned and dist.is_initialized():
        if wait:
            with contextlib.suppress(Exception):
                dist.barrier(group=ctx.object_group)
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


@contextlib.contextmanager
def session(device: str = "auto", backend: str | None = None) -> Iterator[Context]:
    """``with session(cfg.device) as ctx:`` joins the group for the block (and leaves it if it joined)."""
    outer = _CTX
    ctx = init(device, backend)
    ok = False
    try:
        yield ctx
        ok = True
    finally:
        if ctx.owned:
            shutdown(wait=ok)
        else:
            globals()["_CTX"] = outer


def context() -> Context:
    """The current context (single process unless inside :func:`session` / after :func:`init`)."""
    if _CTX is not None:
        return _CTX
    if dist.is_available() and dist.is_initialized():
        return Context(dist.get_rank(), dist.get_world_size(), env_world()[2], dist.get_backend())
    return Context()


def is_main_process() -> bool:
    """Rank 0 (or no torchrun): the process that writes shared artifacts and prints summaries."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return env_world()[0] == 0


def compute_device(name: str, ctx: Context) -> torch.device | None:
    """The device a rank computes on: with several ranks, ``auto``/``cuda`` become ``cuda:LOCAL_RANK``.

    ``None`` means: resolve ``name`` as for one process.
    """
    if ctx.world > 1 and wants_cuda(name) and torch.cuda.is_available():
        dev = torch.device("cuda", ctx.local_rank % torch.cuda.device_count())
        if name.startswith("cuda:") and torch.device(name) != dev:
            log.warning("device %s ignored under torchrun: rank %d uses %s (its LOCAL_RANK)", name, ctx.rank, dev)
        return dev
    return None


# --------------------------------------------------------------------------------------------- sharding
def shard_range(n: int, world: int, rank: int, align: int = 1) -> tuple[int, int]:
    """Rank ``rank``'s contiguous block ``[start, stop)`` of ``n`` items, cut at multiples of ``align``.

    Blocks are whole ``align``-sized batches split as evenly as possible; ranks past the end get empty blocks.
    """
    if world <= 1:
        return 0, n
    align = max(1, align)
    nb = -(-n // align)  # batches
    b0, b1 = nb * rank // world, nb * (rank + 1) // world
    return min(n, b0 * align), min(n, b1 * align)


def shard(items: Sequence, rank: int | None = None, world: int | None = None, align: int = 1) -> list:
    ctx = context()
    rank = ctx.rank if rank is None else rank
    world = ctx.world if world is None else world
    a, b = shard_range(len(items), world, rank, align)
    return list(items[a:b])


def shard_units(items: Sequence) -> list:
    """This rank's share (a contiguous block) of ``items``; all of them without torchrun."""
    return shard(items)


# --------------------------------------------------------------------------------------------- collectives
def gather_objects(obj: Any, dst: int | None = 0) -> list | None:
    """Every rank's ``obj`` in rank order: on rank ``dst`` (``None`` elsewhere), or on every rank if ``dst=None``.

    Tensors inside ``obj`` are pickled with their whole storage: send compact (cloned) CPU tensors.
    """
    ctx = context()
    if ctx.world <= 1:
        return [obj]
    if dst is None:
        out: list = [None] * ctx.world
        dist.all_gather_object(out, obj, group=ctx.object_group)
        return out
    out = [None] * ctx.world if ctx.rank == dst else None
    dist.gather_object(obj, out, dst=dst, group=ctx.object_group)
    return out


def broadcast_object(obj: Any = None, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    ctx = context()
    if ctx.world <= 1:
        return obj
    box = [obj if ctx.rank == src else None]
    dist.broadcast_object_list(box, src=src, group=ctx.object_group)
    return box[0]


def barrier() -> None:
    ctx = context()
    if ctx.world > 1:
        dist.barrier(group=ctx.object_group)
