"""What the drawn cue costs a clean-trained model, by cue size: the study's ``protocol.reference_drop`` (clean minus
wrong-text accuracy on the val photos) of finished reference models, re-measured with the wrong-text test set's cue at
other sizes, or with other settings of that cue (``--cue "size=0.15 opacity=0.7"``, repeatable; each is one line).
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


def drop(cfg, checkpoint: Path, clean: dict) -> float:
    """Clean minus wrong-text accuracy (points); ``clean`` keeps each checkpoint's clean accuracy (one pass)."""
    lm = load_model(f"checkpoint:{checkpoint}")
    sets = pipeline.test_sets(cfg, lm.preprocess, lm.class_names)
    acc = {"in-distribution": clean.get(checkpoint)}
    for name in ("in-distribution", "wrong-text"):
        if acc.get(name) is not None:
            continue
        ds, names, _ = sets[name]
        p = predict(lm.module, loader(cfg, ds), torch.device("cpu"), class_index=class_index(lm, names),
                    keep_logits=False, progress=False)
        acc[name] = accuracy_report(p.preds, p.labels, None, 0, cfg.seed)["acc"]
    clean[checkpoint] = acc["in-distribution"]
    return 100 * (acc["in-distribution"] - acc["wrong-text"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("references", type=Path, nargs="+", help="clean-trained reference folders (model.safetensors)")
    ap.add_argument("--sizes", default="0.15,0.12,0.10", help="comma-separated cue sizes (share of the side)")
    ap.add_argument("--cue", action="append", default=[], metavar='"KEY=VALUE ..."',
                    help="settings of the wrong-text cue to try (instead of --sizes), e.g. 'size=0.12 opacity=0.8'")
    ap.add_argument("--config", default="configs/milan_study.yaml")
    a = ap.parse_args()
    base = load_config(a.config, {})
    tries = [parse_overrides(c.split()) for c in a.cue] or [{"size": float(s)} for s in a.sizes.split(",")]
    clean: dict = {}
    for change in tries:
        shifts = [s.model_copy(update={"cue": dict(s.cue, **change)}) if s.name == "wrong-text"
                  else s for s in base.shifts]
        cfg = base.model_copy(update={"shifts": shifts})
        drops = [drop(cfg, r / "model.safetensors", clean) for r in a.references]
        label = " ".join(f"{k}={v}" for k, v in change.items())
        print(f"{label}: reference_drop per seed {[round(d, 1) for d in drops]}, mean "
              f"{statistics.mean(drops):.2f} points", flush=True)


if __name__ == "__main__":
    main()
