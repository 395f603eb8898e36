"""How DFR's result depends on the size of its slice, on one study seed's finished job (a diagnostic; the job is not
touched).

    python tools/dfr_slice.py JOBDIR/seed0 [--fractions 0.3,0.6,1] [--toward zero|head] [--reference-wrong 0.58]
                              [--out FILE.json]

The job's DFR slice (``ablate.dfr``: its photos, each clean and with the decorrelated cue) is cut to a class-stratified
seeded share of its photos (a photo's two copies kept or dropped together; the share 1 is the job's own slice) and
DFR (:func:`neuroscribe.ablate.refit.dfr_last_layer`, the evaluate stage's own fit) is fitted there alone and after the
job's description-flag ablation (``ablation.json``'s units). Every model is scored on the job's test sets; on the
whole slice the figures should equal the job's own ``dfr`` and ``ablated_dfr`` (a row that does not is marked
``differs_from_job``: another thread count changes float rounding, which can flip DFR's choice of C). With the
clean-trained reference's accuracy on ``--shift``, also the share of the gap closed there. ``--toward head`` fits DFR
with its L2 penalty centred on the trained head (``ablate.dfr_toward: head``); rows are compared with the job's own
figures only when the job used the same centre."""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import yaml

from neuroscribe import io
from neuroscribe.ablate.edit import ablation_edits, as_unit_dict
from neuroscribe.ablate.evaluate import predict
from neuroscribe.ablate.refit import dfr_last_layer
from neuroscribe.ablate.stage import model_and_means
from neuroscribe.cli import _stage_cfg
from neuroscribe.config import load_config
from neuroscribe.datasets.sets import Labelled, class_index, dfr_set, loader, test_sets


def photo_share(ds: Labelled, share: float, seed: int) -> Labelled:
    """``ds`` (its photos clean first, then the same photos cued, in the same order) cut to ``share`` of its photos
    per class by a seeded draw; both copies of a kept photo are kept."""
    n = len(ds.samples) // 2
    if len(ds.samples) != 2 * n or [s.label for s in ds.samples[:n]] != [s.label for s in ds.samples[n:]]:
        raise SystemExit("the DFR slice is not its photos twice (clean, then cued, in the same order): this tool "
                         "needs ablate.dfr: holdout with a training cue")
    by_class: dict[int, list[int]] = {}
    for i, s in enumerate(ds.samples[:n]):
        by_class.setdefault(int(s.label), []).append(i)
    keep = sorted(i for y, ids in sorted(by_class.items())
                  for i in random.Random(f"{seed}/dfr share/{y}").sample(ids, max(1, round(share * len(ids)))))
    return Labelled([ds.samples[i] for i in keep] + [ds.samples[n + i] for i in keep], ds.transform,
                    ds.class_names, ds.geometry)


def job_config(job: Path, dfr_cue: str | None = None):
    """``(config, the job's own ablate.dfr_cue)`` of a finished job, ``ablate.dfr_cue`` set to ``dfr_cue`` (default:
    the job's own; jobs made before the option fitted DFR on wrong-class cues, so that is theirs)."""
    own = (yaml.safe_load((job / "config.yaml").read_text()).get("ablate") or {}).get("dfr_cue", "wrong")
    over = {"out": str(job), "progress": False, "ablate": {"dfr_cue": dfr_cue or own}}
    return _stage_cfg(load_config(str(job / "config.yaml"), over)), own


def decoded_test_sets(cfg, lm) -> dict:
    """The job's test sets, decoded once: ``{name: (batches, class_index)}``."""
    return {k: (list(loader(cfg, ds)), class_index(lm, names)) for k, (ds, names, _) in
            test_sets(cfg, lm.preprocess, lm.class_names).items()}


def accuracies(cfg, model, units, sets: dict, means, dev) -> dict:
    """Top-1 accuracy of ``model`` with ``units`` ablated (the job's method) on each of ``sets``."""
    edits = ablation_edits(model, as_unit_dict(units), cfg.ablate.method, means) if units else None
    acc = {}
    for s, (batches, ci) in sets.items():
        p = predict(model, batches, dev, edits, class_index=ci, keep_logits=False, progress=False)
        acc[s] = float((p.preds == p.labels).mean())
    return acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("job", type=Path, help="a study seed's finished job folder (config.yaml, ablation.json)")
    ap.add_argument("--fractions", default="0.3,0.6,1", help="shares of the slice's photos (default 0.3,0.6,1)")
    ap.add_argument("--reference-wrong", type=float, help="the clean-trained reference's accuracy on --shift")
    ap.add_argument("--shift", default="wrong-text", help="the shifted test set of the gap (default wrong-text)")
    ap.add_argument("--out", type=Path, help="also write the figures here (JSON)")
    ap.add_argument("--toward", choices=("zero", "head"), default="zero", help="DFR's L2 centre (default zero)")
    a = ap.parse_args()
    cfg, _ = job_config(a.job)
    units = [tuple(u) for u in json.loads((a.job / "ablation.json").read_text())["variants"]["description"]["units"]]
    ev = json.loads((a.job / "evaluation.json").read_text())["results"]
    lm, dev, _, means = model_and_means(cfg)
    full, _, desc = dfr_set(cfg, lm.preprocess, lm.class_names)
    sets = decoded_test_sets(cfg, lm)
    base = {s: r["acc"] for s, r in ev["base"].items()}
    rows = []
    for share in (float(f) for f in a.fractions.split(",")):
        part = photo_share(full, share, cfg.seed)
        for name, us in (("dfr", []), ("ablated_dfr", units)):
            model, info = dfr_last_layer(lm.module, us, part, lambda d: loader(cfg, d), cfg.ablate.method, means,
                                         device=dev, seed=cfg.seed, toward=a.toward)
            acc = accuracies(cfg, model, us, sets, means, dev)
            row = {"share": share, "photos": len(part) // 2, "variant": name, "units": len(us), "C": info["C"],
                   "toward": a.toward, "acc": acc}
            if a.reference_wrong is not None:
                row["gap_closed"] = (acc[a.shift] - base[a.shift]) / (a.reference_wrong - base[a.shift])
            same_fit = share == 1 and name in ev and a.toward == cfg.ablate.dfr_toward
            if same_fit and any(abs(acc[s] - r["acc"]) > 1e-9 for s, r in ev[name].items()):
                row["differs_from_job"] = True  # e.g. another thread count: float rounding can flip DFR's C choice
                print(f"warning: {name} on the whole slice gives other accuracies than the job's "
                      f"({ {s: r['acc'] for s, r in ev[name].items()} }); run with the job's thread count", flush=True)
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = {"job": str(a.job), "slice": desc, "base": base, "reference_wrong": a.reference_wrong,
           "job_results": {k: {s: r["acc"] for s, r in ev[k].items()} for k in ("dfr", "ablated_dfr") if k in ev},
           "rows": rows}
    if a.out:
        io.write_json(a.out, out)


if __name__ == "__main__":
    main()
