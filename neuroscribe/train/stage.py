"""The train stage: ``train(cfg)`` trains ``cfg.train`` into ``JOBDIR/train/seed<S>/`` and writes ``train.json``."""

from __future__ import annotations

import shutil
from pathlib import Path

from .. import io
from ..config import JobConfig


def copy_checkpoint(model: Path, spec: Path, dest: str | Path, seed: int) -> Path:
    """Copy the trained ``model`` and its ``spec`` to ``dest`` (``{seed}`` in it is replaced by the seed; the spec goes
    beside it as ``<dest>.spec.json``, where ``checkpoint:<dest>`` looks for it), each written atomically."""
    path = Path(str(dest).replace("{seed}", str(seed)))
    if path.suffix != ".safetensors":
        raise ValueError(f"train.checkpoint must name a .safetensors file (got {str(dest)!r}); use {{seed}} in it to "
                         "keep one file per seed")
    path.parent.mkdir(parents=True, exist_ok=True)
    for src, dst in ((spec, path.with_name(path.name + ".spec.json")), (model, path)):
        with io.atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)
    return path


def train(cfg: JobConfig) -> JobConfig:
    """Train ``cfg.train`` (first seed) into ``JOBDIR/train/seed<S>``; return cfg with model.spec pointing at it."""
    from ..datasets.labels import check_job_labels
    from .classifier import train_classifier
    if cfg.train is None:
        return cfg
    check_job_labels(cfg)  # a label problem of a test set stops the job now, not after training
    seed = cfg.train.seeds[0]
    out = Path(cfg.out) / "train" / f"seed{seed}"
    res = train_classifier(cfg.train, out, device=cfg.device, seed=seed, progress=cfg.progress,
                           workers=cfg.workers)
    info = {"checkpoint": str(res.checkpoint), "holdout_manifest": str(res.holdout_manifest or ""),
            "holdout_n": len(res.holdout_ids), "train_n": len(res.train_ids), "history": res.history,
            "class_names": res.class_names}
    if cfg.train.checkpoint is not None:  # a copy where the user asked for it (the job keeps its own)
        info["copy"] = str(copy_checkpoint(res.checkpoint, res.spec_path, cfg.train.checkpoint, seed))
    io.write_json(Path(cfg.out) / "train.json", info)
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"spec": f"checkpoint:{res.checkpoint}"})})
