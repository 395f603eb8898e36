"""What the drawn cue costs a clean-trained model, by cue size: the study's ``protocol.reference_drop`` (clean minus
cued accuracy on the val photos) of finished reference models, re-measured with the cued test set's cue (the study's
first test set that is not the probe: wrong-text, or wrong-patch in configs/milan_study_patch.yaml) at other sizes, or
with other settings of that cue (``--cue "size=0.15 opacity=0.7"``, repeatable; each is one line).
Nothing is trained; the training cue of the text-trained seeds is not changed here, so a cue chosen with this needs a
full study run.

    python tools/reference_drop.py JOBDIR/reference/seed0 [JOBDIR/reference/seed1 ...] [--sizes 0.15,0.12,0.10]
        [--cue "size=0.15 position=random-corner" ...] [--config configs/milan_study.yaml]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from neuroscribe import pipeline  # noqa: E402
from neuroscribe.ablate.evaluate import accuracy_report, predict  # noqa: E402
from neuroscribe.config import load_config, parse_overrides  # noqa: E402
from neuroscribe.datasets.sets import class_index, loader  # noqa: E402
from neuroscribe.models import load_model  # noqa: E402


def cued_set(cfg) -> str:
    """The study's cued test set: its first shift that is not the probe (as benchmarks/milan_study.py reads it)."""
    names = [s.name for s in cfg.shifts if s.name != cfg.probe and s.cue is not None]
    if not names:
        raise SystemExit(f"the config has no cued test set (shifts: {[s.name for s in cfg.shifts]})")
    return names[0]


def drop(cfg, checkpoint: Path, clean: dict) -> float:
    """Clean minus cued accuracy (points); ``clean`` keeps each checkpoint's clean accuracy (one pass)."""
    lm = load_model(f"checkpoint:{checkpoint}")
    sets = pipeline.test_sets(cfg, lm.preprocess, lm.class_names)
    acc = {"in-distribution": clean.get(checkpoint)}
    for name in ("in-distribution", cued_set(cfg)):
        if acc.get(name) is not None:
            continue
        ds, names, _ = sets[name]
        p = predict(lm.module, loader(cfg, ds), torch.device("cpu"), class_index=class_index(lm, names),
                    keep_logits=False, progress=False)
        acc[name] = accuracy_report(p.preds, p.labels, None, 0, cfg.seed)["acc"]
    clean[checkpoint] = acc["in-distribution"]
    return 100 * (acc["in-distribution"] - acc[cued_set(cfg)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("references", type=Path, nargs="+", help="clean-trained reference folders (model.safetensors)")
    ap.add_argument("--sizes", default="0.15,0.12,0.10", help="comma-separated cue sizes (share of the side)")
    ap.add_argument("--cue", action="append", default=[], metavar='"KEY=VALUE ..."',
                    help="the cued test set's cue settings to try (instead of --sizes), e.g. 'size=0.12 opacity=0.8'")
    ap.add_argument("--config", default="configs/milan_study.yaml")
    a = ap.parse_args()
    base = load_config(a.config, {})
    cued = cued_set(base)
    tries = [parse_overrides(c.split()) for c in a.cue] or [{"size": float(s)} for s in a.sizes.split(",")]
    clean: dict = {}
    for change in tries:
        shifts = [s.model_copy(update={"cue": dict(s.cue, **change)}) if s.name == cued
                  else s for s in base.shifts]
        cfg = base.model_copy(update={"shifts": shifts})
        drops = [drop(cfg, r / "model.safetensors", clean) for r in a.references]
        label = " ".join(f"{k}={v}" for k, v in change.items())
        print(f"{label}: reference_drop per seed {[round(d, 1) for d in drops]}, mean "
              f"{statistics.mean(drops):.2f} points", flush=True)


if __name__ == "__main__":
    main()
