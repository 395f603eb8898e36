"""The train stage: ``train(cfg)`` trains ``cfg.train`` into ``JOBDIR/train/seed<S>/`` and writes ``train.json``."""

from __future__ import annotations

from pathlib import Path

from .. import io
from ..config import JobConfig


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
    io.write_json(Path(cfg.out) / "train.json", info)
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"spec": f"checkpoint:{res.checkpoint}"})})
