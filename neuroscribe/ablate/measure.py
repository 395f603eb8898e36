"""Measuring the edits: ``evaluate`` -> ``evaluation.json`` (accuracy with bootstrap CIs of the base model, every
ablated variant and the controls on every test set, and each one's paired difference to the base model on the same
images, ``vs_base``: the only stage that reads the test sets) and
``export_edited`` (the chosen ablation baked into the weights)."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from .. import io
from ..config import JobConfig
from ..heap import reuse_freed_memory
from ..datasets.sets import (class_index, dfr_set, dfr_train_set, held_out, in_memory, loader, shift_set,
                             test_sets)
from ..runtime import job_model
from .refit import dfr_rule
from .stage import dfr_cue_matters, dfr_retrains, model_and_means

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


@reuse_freed_memory()  # every batch reuses the pages the one before freed (heap.py)
def evaluate(cfg: JobConfig) -> dict:
    """Accuracy with bootstrap CIs of the base model, every ablated variant and the controls on every test set."""
    from .edit import ablation_edits, as_unit_dict
    from .evaluate import accuracy_report, correct, paired_bootstrap_diff, predict
    job = Path(cfg.out)
    abl = json.loads((job / "ablation.json").read_text())
    key = io.artifact_key(abl["key"], cfg.evaluate.model_dump(mode="json"), cfg.data.model_dump(mode="json"),
               [s.model_dump(mode="json") for s in cfg.shifts], cfg.seed, cfg.ablate.refit, cfg.probe,
               *([cfg.ablate.dfr, dfr_rule(cfg)] if cfg.ablate.dfr else []),
               *([cfg.ablate.dfr_toward] if cfg.ablate.dfr and cfg.ablate.dfr_toward != "zero" else []),
               *([cfg.ablate.dfr_cue] if dfr_cue_matters(cfg) else []),
               *([f"dfr_train {cfg.ablate.dfr_train}"] if cfg.ablate.dfr and cfg.ablate.dfr_train else []),
               *([f"dfr_retrains {cfg.ablate.dfr_retrains}"] if cfg.ablate.dfr and cfg.ablate.dfr_retrains else []))
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
        from .refit import dfr_last_layer, with_head_weights
        from .stage import stored_dfr_fits
        dfr_ds, _, _ = dfr_set(cfg, lm.preprocess, lm.class_names)
        extra, extra_desc = dfr_train_set(cfg, lm.preprocess) or (None, None)
        fits = [("dfr", [])] + ([("ablated_dfr", variants["ablated"])] if variants.get("ablated") else [])
        if "dfr_tuned" in abl:  # N chosen for ablation + DFR together on validation (ablate.dfr_ns)
            fits.append(("ablated_dfr_tuned", [tuple(u) for u in abl["dfr_tuned"]["units"]]))
        # the same units give the same fit (seeded): fitted once, or taken from the ablation stage's curve
        stored, fitted = stored_dfr_fits(cfg, abl, {tuple(u) for _, u in fits}), {}
        if any(tuple(u) not in stored for _, u in fits):
            dfr_ds, extra = in_memory(cfg, dfr_ds), in_memory(cfg, extra)  # read once for the fits below
        for vname, units in fits:
            chosen = tuple(units)
            if chosen in stored and chosen not in fitted:
                w, b, info = stored[chosen]
                fitted[chosen] = with_head_weights(lm.module, w, b), info
            elif chosen not in fitted:
                fitted[chosen] = dfr_last_layer(lm.module, units, dfr_ds, lambda d: loader(cfg, d), cfg.ablate.method,
                                               means, device=dev, seed=cfg.seed, toward=cfg.ablate.dfr_toward,
                                               extra=extra, retrains=dfr_retrains(cfg))
            model, dfr_info[vname] = fitted[chosen]
            runs[vname], variants[vname] = (model, units), units
        del dfr_ds, extra, stored  # the images held for the fits
    head, passes = shared_passes(lm.module, runs)
    sets = test_sets(cfg, lm.preprocess, lm.class_names)
    quality = flag_quality(cfg, lm, dev, rec.layers, sets) if (job / "flags.json").is_file() else None
    if cfg.evaluate.limit:  # a seeded random subset (the same images for every variant): folders are class-sorted
        sets = {k: (torch.utils.data.Subset(ds, sorted(np.random.default_rng(cfg.seed).permutation(len(ds))
                                                       [:min(cfg.evaluate.limit, len(ds))].tolist())), nm, d)
                for k, (ds, nm, d) in sets.items()}
    out = {"key": key, "test_sets": {}, "results": {}, "vs_base": {}}
    for sname, (ds, names, desc) in sets.items():
        out["test_sets"][sname] = {"description": desc, "n": len(ds), "in_distribution": sname == "in-distribution"}
        batches = list(loader(cfg, ds))  # decoded once, reused by every variant
        ci = class_index(lm, names)
        hits, seen = {}, {}
        for (model, units), names_ in passes.items():  # one pass per body and edit, scored by each variant's head
            edits = ablation_edits(model, as_unit_dict(units), cfg.ablate.method, means) if units else None
            heads = {v: dict(runs[v][0].named_modules())[head] for v in names_ if runs[v][0] is not model}
            got = predict(model, batches, dev, edits, class_index=ci, keep_logits=False, progress=False,
                          heads=heads, head=head)
            seen.update({v: got[v if v in heads else ""] if heads else got for v in names_})
        for vname in runs:
            p = seen[vname]
            rep = accuracy_report(p.preds, p.labels, p.groups, cfg.evaluate.bootstrap, cfg.seed)
            out["results"].setdefault(vname, {})[sname] = _acc(rep)
            hits[vname] = correct(p.preds, p.labels)
            log.info("evaluate %s on %s: %.3f", vname, sname, rep["acc"])
        out.setdefault("forward_passes", {})[sname] = len(passes)
        for vname in runs:  # paired with the base model on the same images
            if vname != "base":
                d = paired_bootstrap_diff(hits[vname], hits["base"], cfg.evaluate.bootstrap, cfg.seed)
                out["vs_base"].setdefault(vname, {})[sname] = {"diff": d["diff"], "lo": d["ci_low"],
                                                               "hi": d["ci_high"], "n": d["n"]}
    if quality:
        out["flag_quality"] = quality
    if dfr_info:
        out["dfr"] = dict(dfr_info, shift=cfg.ablate.dfr, **({"training_photos": extra_desc} if extra_desc else {}))
    out["variants"] = {k: [list(u) for u in v] for k, v in variants.items()}
    out["random_draws"] = [[list(u) for u in d] for d in draws]
    io.write_json(job / "evaluation.json", out)
    return out


def shared_passes(base: torch.nn.Module, runs: dict) -> tuple[str | None, dict]:
    """``(head, {(model, units): [variant, ...]})``: the forward passes that score every variant of ``runs``
    (``{variant: (model, units)}``). Variants whose model is ``base`` or a copy of it that differs in the last linear
    layer only (a re-fit or DFR head) and that ablate the same units share one pass of ``base``'s body, each scored by
    its own head (:func:`.evaluate.predict`'s ``heads``): the same predictions as a pass of each, in fewer passes.
    ``head`` is None for a model without a linear layer (then only variants of one model and edit share)."""
    from .refit import last_linear
    try:
        head = last_linear(base)
    except ValueError:
        head = None
    mine = base.state_dict()
    body = {k: v for k, v in mine.items() if not k.startswith(f"{head}.")} if head else {}

    def same_body(model) -> bool:
        if model is base:
            return True
        if head is None:
            return False
        try:
            if last_linear(model) != head:
                return False
        except ValueError:
            return False
        theirs = model.state_dict()
        return theirs.keys() == mine.keys() and all(torch.equal(theirs[k], v) for k, v in body.items())
    passes: dict = {}
    for vname, (model, units) in runs.items():
        owner = base if same_body(model) else model
        passes.setdefault((owner, tuple(sorted(units))), []).append(vname)
    return head, passes


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
    """How well each flag set of ``flags.json`` finds the units tied to the cue, against a ground truth measured on a
    TEST set (evaluation only: nothing is chosen with it). With ``flag.group_cue``, the first test set whose groups
    hold that cue: the top 5% of each layer's units by class-stratified group AUC, with the interval above 0.5
    (:mod:`.groups`; ``flag.group_images`` test images, stratified by class x group, seeded). Else the first test
    set with a planted cue (:func:`cue_flag_quality`). Per set: flagged, share of all units, precision, recall.
    None when no test set has either."""
    from ..datasets.readers import group_value
    from .groups import group_flags
    from .stage import unit_group_auc
    if not cfg.flag.group_cue:
        return cue_flag_quality(cfg, lm, dev, layers, sets)
    flags = json.loads((Path(cfg.out) / "flags.json").read_text())
    for name, (ds, _, _) in sets.items():
        samples = getattr(ds, "samples", None) or []
        if not any(group_value(getattr(s, "group", None) or "") == cfg.flag.group_cue for s in samples):
            continue
        ge = unit_group_auc(cfg, lm, dev, layers, ds, name, cfg.flag.group_images)
        stats = {(u["layer"], u["unit"]): (u["auc"], u["lo"], u["hi"]) for u in ge["units"]}
        truth = set(group_flags(stats, TRUTH_SHARE))
        out = {"test_set": name, "n_images": ge["n_images"], "units": len(stats), "truth": len(truth),
               "truth_units": sorted([l, u] for l, u in truth),
               "rule": "ground truth: the top 5% of each layer's units by class-stratified group AUC on this test "
                       "set, interval above 0.5", "sets": _set_quality(flags["sets"], truth, len(stats))}
        return out
    return None


#: share of each layer's units that form a flag-quality ground truth (the study's and the issue's 5 %)
TRUTH_SHARE = 0.05


def top_share(score: dict, layers) -> set:
    """The flag-quality truth rule: the top :data:`TRUTH_SHARE` (at least one) of each layer's units by ``score``
    (``{(layer, unit): value}``), ties to the lower unit."""
    top = set()
    for layer in layers:
        ranked = sorted((-e, u) for (l, u), e in score.items() if l == layer)
        top |= {(layer, u) for _, u in ranked[:max(1, round(TRUTH_SHARE * len(ranked)))]}
    return top


def _set_quality(sets: dict, truth: set, total: int) -> dict:
    out = {}
    for set_name, units in sets.items():
        got = {tuple(u) for u in units}
        hit = len(got & truth)
        out[set_name] = {"flagged": len(got), "share": len(got) / max(total, 1), "true_positives": hit,
                         "precision": hit / len(got) if got else None, "recall": hit / len(truth) if truth else None}
    return out


def description_ranking(job: Path) -> dict:
    """Every described unit's rank by what its words say, for the flag-score AUC: words that name a cue and were
    confirmed by experiment first, then words that name one, then the rest; within each, the verification's response
    (how far the words' edit moves the unit from the unedited image; its effect for a verification without one), then
    the cosine of the description to the cues' keywords (``flags.json`` ``words``: description-side figures of every
    described unit, never the cue evidence). Higher = more cue-like; ties share a rank."""
    from .stage import described_rows, verify_score
    words = {(l, u): (conf, named, sim) for l, u, conf, named, sim in
             json.loads((job / "flags.json").read_text()).get("words", [])}
    keys = {}
    for unit, r in described_rows(job).items():
        conf, named, sim = words.get(unit, (False, False, None))
        keys[unit] = (2 if conf else 1 if named else 0, verify_score(r), -np.inf if sim is None else sim)
    order = {k: i for i, k in enumerate(sorted(set(keys.values())))}
    return {u: order[k] for u, k in keys.items()}


def cue_flag_quality(cfg: JobConfig, lm, dev, layers, sets: dict) -> dict | None:
    """Flag quality against counterfactual ground truth: on the first test set with a planted cue, ``flag.
    evidence_images`` images (class-stratified, seeded, "flag truth"; the evidence itself comes from a training-side
    shift) drawn with and without the cue; each unit's cue effect (:func:`~.flag.cue_effect`); truth = the top 5%
    of each layer's units by effect. Per flag set: flagged, share, precision, recall; and the AUC of the description
    ranking (:func:`description_ranking`) for the truth over all described units. None when no test set has a cue."""
    from sklearn.metrics import roc_auc_score
    from ..datasets.splits import stratified_sample
    from .flag import cue_effect, cue_pairs
    for name, (ds, _, _) in sets.items():
        if getattr(ds, "cue", None) is None or not hasattr(ds, "pair"):
            continue
        ids = stratified_sample([y for _, y in ds.samples], cfg.flag.evidence_images, cfg.seed, purpose="flag truth")
        pairs = list(cue_pairs(ds, lm.preprocess.to_tensor(), ids, cfg.batch_size))  # unreadable images skipped
        effect = cue_effect(lm.module, {l: None for l in layers}, pairs, device=dev)
        truth = top_share(effect, layers)
        flags = json.loads((Path(cfg.out) / "flags.json").read_text())
        names = getattr(ds, "class_names", None) or []
        per_class = Counter(names[y] if y < len(names) else str(y) for y in (ds.samples[i][1] for i in ids))
        out = {"test_set": name, "n_images": sum(len(c) for c, _ in pairs),
               "per_class": dict(sorted(per_class.items())), "units": len(effect),
               "truth": len(truth), "truth_units": sorted([l, u] for l, u in truth),
               "rule": "ground truth: the top 5% of each layer's units by the cue's effect on paired images (with and "
                       "without the cue) of this test set, class-stratified", "sets": _set_quality(flags["sets"], truth,
                                                                                                 len(effect))}
        # the same truth share over all units at once (effects are in clean-image SDs, so comparable across
        # layers): the issue's literal rule, reported beside the per-layer one, which stays the headline
        ranked = sorted((-e, u) for u, e in effect.items())
        pooled = {u for _, u in ranked[:max(1, round(TRUTH_SHARE * len(ranked)))]}
        out["pooled"] = {"truth": len(pooled), "truth_units": sorted([l, u] for l, u in pooled),
                         "truth_per_layer": {layer: sum(l == layer for l, _ in pooled) for layer in layers},
                         "rule": "the top 5% of all units (every layer together) by the same effect",
                         "sets": _set_quality(flags["sets"], pooled, len(effect))}
        rank = description_ranking(Path(cfg.out))
        units = sorted(u for u in rank if u in effect)
        for body, truth_set in ((out, truth), (out["pooled"], pooled)):
            y = [u in truth_set for u in units]
            if units and 0 < sum(y) < len(y) and "description" in body["sets"]:
                body["sets"]["description"]["auc"] = float(roc_auc_score(y, [rank[u] for u in units]))
                body["sets"]["description"]["auc_units"] = len(units)
        return out
    return None
