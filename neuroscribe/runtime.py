"""Process-wide settings a job applies before any work: CPU threads and progress output.

Core module (no stage imports it for anything but :func:`apply`)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["apply", "cpu_name", "job_model", "physical_cores", "resolve_device"]


def physical_cores() -> int:
    """Physical cores this process may run on: distinct (package, core) pairs among the allowed CPUs.

    Hyper-threads share a core's arithmetic units, and a loaded small box slows badly when torch starts more
    threads than cores (one epoch took 14x longer on 2 busy cores), so jobs default to one thread per core."""
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1
    cores, cpu, package = set(), None, None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "processor":
                cpu, package = int(value), None
            elif key == "physical id":
                package = value
            elif key == "core id" and cpu in allowed:
                cores.add((package, value))
    except (OSError, ValueError):
        cores = set()
    return max(1, len(cores) or len(allowed))


def cpu_name() -> str:
    """The CPU's model name (results name it: the same seed trains other weights on another CPU)."""
    try:
        return next(line.partition(":")[2].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform
        return platform.processor() or "CPU model unknown"


def apply(threads: int | None = None, progress: bool = True) -> int:
    """Set torch's CPU threads (``threads``, else ``OMP_NUM_THREADS`` if set, else :func:`physical_cores`) and,
    with ``progress=False``, silence every progress bar (ours, Hugging Face's downloads and "Loading weights",
    sentence-transformers'). Returns the thread count used."""
    import torch
    n = threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or physical_cores()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    if not progress:
        silence_progress()
    return n


def silence_progress() -> None:
    """No progress bar from here on, in this process: ours (tqdm), Hugging Face's downloads and transformers'
    "Loading weights". The CLI's ``--quiet`` and every stage run with ``progress: false`` call it (a Python-API
    user's ``progress: false`` is honoured as the CLI's is)."""
    os.environ["TQDM_DISABLE"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass


def resolve_device(name: str):
    """``auto`` -> CUDA when available, else CPU; a named device is checked to exist."""
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available; use device: cpu or auto")
    return dev


def job_model(cfg):
    """The job's model (its layers' declared ``layouts`` on it, random weights seeded by the job, the job's
    ``preprocess`` overrides on its preprocessing) and device: every stage after record sees the images at the size
    the units were recorded at, whatever the model's own default."""
    from .hooks import declare_layouts
    from .models import load_model
    dev = resolve_device(cfg.device)
    lm = load_model(cfg.model.spec, arch=cfg.model.arch, num_classes=cfg.model.num_classes,
                    allow_pickle=cfg.model.allow_pickle, device=dev, seed=cfg.seed)
    lm.preprocess = lm.preprocess.with_overrides(**cfg.preprocess.model_dump())
    declare_layouts(lm.module, cfg.layouts)
    return lm, dev
