"""Measuring the edits: ``evaluate`` -> ``evaluation.json`` (accuracy with bootstrap CIs of the base model, every
ablated variant and the controls on every test set, and each one's paired difference to the base model on the same
images, ``vs_base``: the only stage that reads the test sets) and
``export_edited`` (the chosen ablation baked into the weights)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from .. import io
from ..config import JobConfig
from ..datasets.sets import class_index, held_out, loader, shift_set, test_sets
from ..runtime import job_model
from .stage import model_and_means

log = logging.getLogger("neuroscribe.ablate")


_VARIANT = {"description": "ablated", "evidence": "ablated_evidence", "both": "ablated_both", "group": "ablated_group"}


def _acc(rep: dict) -> dict:
    out = {"acc": rep["acc"], "lo": rep["ci_low"], "hi": rep["ci_high"], "n": rep["n"]}
    if rep.get("per_group") and len(rep["per_group"]) > 1:
        out["groups"] = {g: {"acc": v["acc"], "lo": v["ci_low"], "hi": v["ci_high"], "n": v["n"]}
                         for g, v in rep["per_group"].items()}
        w, a = rep["worst_group"], rep["average_group"]  # their CIs: the min / mean over groups, bootstrapped
        out["worst_group"] = {"name": w["group"], "acc": w["acc"], "lo": w["ci_low"], "hi": w["ci_high"], "n": w["n"]}
        out["avg_group"] = {"acc": a["acc"], "lo": a["ci_low"], "hi": a["ci_high"], "n": a["n"]}
    return out


def evaluate(cfg: JobConfig) -> dict:
    """Accuracy with bootstrap CIs of the base model, every ablated variant and the controls on every test set."""
    from .edit import ablation_edits, as_unit_dict
    from .evaluate import accuracy_report, correct, paired_bootstrap_diff, predict
    job = Path(cfg.out)
    abl = json.loads((job / "ablation.json").read_text())
    key = io.artifact_key(abl["key"], cfg.evaluate.model_dump(mode="json"), cfg.data.model_dump(mode="json"),
               [s.model_dump(mode="json") for s in cfg.shifts], cfg.seed, cfg.ablate.refit, cfg.probe,
               *([cfg.ablate.dfr] if cfg.ablate.dfr else []))
    done = io.current(job / "evaluation.json", key)
    if done:
        return done
    lm, dev, rec, means = model_and_means(cfg)
    variants = {"base": []}
    for name, v in abl["variants"].items():
        variants[_VARIANT.get(name, name)] = [tuple(u) for u in v["units"]]
    variants["sort_all"] = [tuple(u) for u in abl["controls"]["sort_all"]]
    draws = [[tuple(u) for u in d] for d in abl["controls"]["random"]]
    runs = {k: (lm.module, u) for k, u in dict(variants, **{f"random/{i}": d for i, d in enumerate(draws)}).items()}
    if cfg.ablate.refit:  # after the ablation (MILAN's edit) and alone (nothing ablated), on the probe's images
        from .refit import refit_last_layer
        probe = next(s for s in cfg.shifts if s.name == cfg.probe)
        train_ds, _, _ = shift_set(probe, lm.preprocess, cfg.seed, lm.class_names, held_out(cfg.out))
        edits = ([("refit", variants["ablated"])] if variants.get("ablated") else []) + [("refit_only", [])]
        for vname, units in edits:
            runs[vname] = (refit_last_layer(lm.module, units, loader(cfg, train_ds), cfg.ablate.method, means,
                                            device=dev, seed=cfg.seed), units)
            variants[vname] = units
    dfr_info = {}
    if cfg.ablate.dfr:  # DFR alone and after the ablation: the last layer re-fitted on a group-balanced held-out slice
        from .refit import dfr_last_layer
        shift = next(s for s in cfg.shifts if s.name == cfg.ablate.dfr)
        dfr_ds, _, _ = shift_set(shift, lm.preprocess, cfg.seed, lm.class_names, held_out(cfg.out))
        for vname, units in [("dfr", [])] + ([("ablated_dfr", variants["ablated"])] if variants.get("ablated") else []):
            model, dfr_info[vname] = dfr_last_layer(lm.module, units, dfr_ds, lambda d: loader(cfg, d),
                                                    cfg.ablate.method, means, device=dev, seed=cfg.seed)
            runs[vname], variants[vname] = (model, units), units
    sets = test_sets(cfg, lm.preprocess, lm.class_names)
    quality = flag_quality(cfg, lm, dev, rec.layers, sets) if cfg.flag.group_cue else None
    if cfg.evaluate.limit:  # a seeded random subset (the same images for every variant): folders are class-sorted
        sets = {k: (torch.utils.data.Subset(ds, sorted(np.random.default_rng(cfg.seed).permutation(len(ds))
                                                       [:min(cfg.evaluate.limit, len(ds))].tolist())), nm, d)
                for k, (ds, nm, d) in sets.items()}
    out = {"key": key, "test_sets": {}, "results": {}, "vs_base": {}}
    for sname, (ds, names, desc) in sets.items():
        out["test_sets"][sname] = {"description": desc, "n": len(ds), "in_distribution": sname == "in-distribution"}
        batches = list(loader(cfg, ds))  # decoded once, reused by every variant
        ci = class_index(lm, names)
        hits = {}
        for vname, (model, units) in runs.items():
            edits = ablation_edits(model, as_unit_dict(units), cfg.ablate.method, means) if units else None
            p = predict(model, batches, dev, edits, class_index=ci, keep_logits=False, progress=False)
            rep = accuracy_report(p.preds, p.labels, p.groups, cfg.evaluate.bootstrap, cfg.seed)
            out["results"].setdefault(vname, {})[sname] = _acc(rep)
            hits[vname] = correct(p.preds, p.labels)
            log.info("evaluate %s on %s: %.3f", vname, sname, rep["acc"])
        for vname in runs:  # paired with the base model on the same images
            if vname != "base":
                d = paired_bootstrap_diff(hits[vname], hits["base"], cfg.evaluate.bootstrap, cfg.seed)
                out["vs_base"].setdefault(vname, {})[sname] = {"diff": d["diff"], "lo": d["ci_low"],
                                                               "hi": d["ci_high"], "n": d["n"]}
    if quality:
        out["flag_quality"] = quality
    if dfr_info:
        out["dfr"] = dict(dfr_info, shift=cfg.ablate.dfr)
    out["variants"] = {k: [list(u) for u in v] for k, v in variants.items()}
    out["random_draws"] = [[list(u) for u in d] for d in draws]
    io.write_json(job / "evaluation.json", out)
    return out


def export_edited(cfg: JobConfig, path: str | Path, variant: str = "description") -> Path:
    """Bake the chosen ablation (``ablation.json``, flag set ``variant``) into the weights and write
    ``path`` (safetensors) + ``PATH.spec.json``, loadable as ``checkpoint:PATH``. Units produced by layers
    without weights to edit (e.g. a residual block's output) cannot be baked: the error names them."""
    import warnings
    from .edit import as_unit_dict, permanent_edit, save_edited
    job = Path(cfg.out)
    abl = json.loads((job / "ablation.json").read_text())
    units = [tuple(u) for u in abl["variants"][variant]["units"]]
    if not units:
        raise ValueError(f"ablation.json chose no units for {variant!r}: nothing to bake into the weights")
    if cfg.ablate.method == "mean" or (job / "record.json").is_file():
        lm, _, _, means = model_and_means(cfg)  # the recorded layouts declared (and the means for 'mean')
    else:
        (lm, _), means = job_model(cfg), None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        edited = permanent_edit(lm.module, as_unit_dict(units), cfg.ablate.method, means)
    meta = {"arch": cfg.model.arch or (cfg.train.arch if cfg.train else cfg.model.spec),
            "num_classes": len(lm.class_names) if lm.class_names else cfg.model.num_classes,
            "class_names": lm.class_names,
            "preprocess": lm.preprocess.to_dict()}
    return save_edited(edited, path, meta)


def flag_quality(cfg: JobConfig, lm, dev, layers, sets: dict) -> dict | None:
    """How well each flag set of ``flags.json`` finds the units tied to the cue, against a ground truth measured on
    a TEST set with group labels (the first whose groups hold ``flag.group_cue``): the top 5% of each layer's units
    by class-stratified group AUC there, with the interval above 0.5 (:mod:`.groups`; ``flag.group_images`` test
    images, stratified by class x group, seeded). Per set: flagged, share of all units, precision, recall. None when
    no test set has the cue group."""
    from ..datasets.readers import group_value
    from .groups import group_flags
    from .stage import unit_group_auc
    flags = json.loads((Path(cfg.out) / "flags.json").read_text())
    for name, (ds, _, _) in sets.items():
        samples = getattr(ds, "samples", None) or []
        if not any(group_value(getattr(s, "group", None) or "") == cfg.flag.group_cue for s in samples):
            continue
        ge = unit_group_auc(cfg, lm, dev, layers, ds, name, cfg.flag.group_images)
        stats = {(u["layer"], u["unit"]): (u["auc"], u["lo"], u["hi"]) for u in ge["units"]}
        truth = set(group_flags(stats, 0.05))
        out = {"test_set": name, "n_images": ge["n_images"], "units": len(stats), "truth": len(truth),
               "rule": "ground truth: the top 5% of each layer's units by class-stratified group AUC on this test "
                       "set, interval above 0.5", "sets": {}}
        for set_name, units in flags["sets"].items():
            got = {tuple(u) for u in units}
            hit = len(got & truth)
            out["sets"][set_name] = {"flagged": len(got), "share": len(got) / max(len(stats), 1),
                                     "precision": hit / len(got) if got else None,
                                     "recall": hit / len(truth) if truth else None}
        return out
    return None
