"""The choosing stages: ``flag`` -> ``flags.json`` (units whose descriptions, or cue evidence, tie them to a cue) and
``ablate`` -> ``ablation.json`` (MILAN's ordering, the validation curve over N, N chosen on validation only, the
random and sort-all controls). Neither reads a test set."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from .. import io
from ..config import JobConfig
from ..heap import reuse_freed_memory
from ..datasets.sets import HOLDOUT_RULE, class_index, held_out, loader, shift_set, validation_set
from ..runtime import job_model, silence_progress

log = logging.getLogger("neuroscribe.ablate")


def model_and_means(cfg: JobConfig):
    """The job's model (the recorded layouts declared on it), its device, its recording and (for mean ablation) the
    recorded per-unit means."""
    from ..record.exemplars import Recording
    from ..hooks import declare_layouts
    lm, dev = job_model(cfg)
    rec = Recording.open(cfg.out)
    declare_layouts(lm.module, rec.layouts)  # ablation edits the axis the recording read
    means = {l: rec.tensors(l)["mean"] for l in rec.layers} if cfg.ablate.method == "mean" else None
    return lm, dev, rec, means


@reuse_freed_memory()  # every batch reuses the pages the one before freed (heap.py)
def flag(cfg: JobConfig) -> dict:
    """Flag units from ``descriptions.jsonl`` (and cue evidence where ``flag.evidence_shift`` pairs images)."""
    from .flag import cue_effect, cue_pairs, flag_units
    from ..record.exemplars import Recording
    if not cfg.progress:
        silence_progress()  # the sentence embedder's loading bar too
    job = Path(cfg.out)
    rows = [json.loads(l) for l in (job / "descriptions.jsonl").read_text().splitlines() if l.strip()]
    key = io.artifact_key(io.file_key(job / "descriptions.jsonl"), cfg.flag.model_dump(mode="json"), cfg.model.spec,
               [s.model_dump(mode="json") for s in cfg.shifts if s.name == cfg.flag.evidence_shift],
               *([[s.model_dump(mode="json") for s in cfg.shifts if s.name == cfg.flag.group_shift],
                  cfg.evaluate.bootstrap, cfg.seed] if cfg.flag.group_shift else []))
    done = io.current(job / "flags.json", key)
    if done:
        return done
    evidence = None
    if cfg.flag.evidence_shift:
        from ..hooks import declare_layouts
        lm, dev = job_model(cfg)
        rec = Recording.open(job)
        declare_layouts(lm.module, rec.layouts)
        shift = next(s for s in cfg.shifts if s.name == cfg.flag.evidence_shift)
        ds, _, _ = shift_set(shift, lm.preprocess, cfg.seed, lm.class_names, held_out(cfg.out))
        from ..datasets.splits import stratified_sample
        ids = stratified_sample([y for _, y in ds.samples], cfg.flag.evidence_images, cfg.seed, purpose="evidence")
        pairs = cue_pairs(ds, lm.preprocess.to_tensor(), ids, cfg.batch_size)
        evidence = cue_effect(lm.module, {l: None for l in rec.layers}, pairs, device=dev)
    embedder = None
    if cfg.flag.embedder:
        from ..text import SentenceEmbedder
        embedder = SentenceEmbedder(cfg.flag.embedder)
    all_rows = flag_units(rows, cfg.flag.model_copy(update={"use": "either" if evidence else "description"}),
                          embedder, evidence, all_rows=True)
    sets = {"description": sorted({f.key for f in all_rows if f.by_description})}  # words (and their experiment)
    if evidence is not None:
        sets["evidence"] = sorted({f.key for f in all_rows if f.by_evidence})
        sets["both"] = sorted(set(sets["description"]) | set(sets["evidence"]))
    words = {}  # description-side figures of every described unit (the best over cues), never the evidence
    for f in all_rows:
        if f.description is not None:
            w = words.setdefault((f.layer, f.unit), [False, False, -math.inf])
            sim = f.similarity if f.similarity == f.similarity else -math.inf
            w[:] = [w[0] or f.by_description, w[1] or f.by_keyword or f.by_embedding, max(w[2], sim)]
    out = {"key": key, "sets": {k: [list(u) for u in v] for k, v in sets.items()},
           "flags": [f.to_dict() for f in all_rows if f.flagged or f.by_keyword or f.by_embedding or f.by_evidence],
           "words": [[l, u, *w[:2], None if w[2] == -math.inf else w[2]] for (l, u), w in sorted(words.items())]}
    if cfg.flag.group_shift:  # a variant of its own: never part of the description set
        out["group_evidence"] = group_evidence(cfg)
        out["sets"]["group"] = [[u["layer"], u["unit"]] for u in out["group_evidence"]["units"] if u["flagged"]]
    io.write_json(job / "flags.json", out)
    return out


def group_evidence(cfg: JobConfig) -> dict:
    """Class-stratified AUC of every recorded unit for ``flag.group_cue`` vs the rest of each class, on
    ``flag.group_images`` images of ``flag.group_shift`` (stratified by class x group, seeded; never the trained job's
    validation holdout), with 95% bootstrap intervals (``evaluate.bootstrap``) and the units it flags
    (:mod:`neuroscribe.ablate.groups`)."""
    from ..hooks import declare_layouts
    from ..record.exemplars import Recording
    lm, dev = job_model(cfg)
    rec = Recording.open(cfg.out)
    declare_layouts(lm.module, rec.layouts)
    shift = next(s for s in cfg.shifts if s.name == cfg.flag.group_shift)
    ds, _, _ = shift_set(shift, lm.preprocess, cfg.seed, lm.class_names, held_out(cfg.out))
    return unit_group_auc(cfg, lm, dev, rec.layers, ds, shift.name, cfg.flag.group_images)


def unit_group_auc(cfg: JobConfig, lm, dev, layers, ds, name: str, images: int) -> dict:
    """:func:`group_evidence` on any labelled dataset with groups ``ds`` (``images`` of it, stratified by class x
    group, seeded): also the ground truth that :func:`~neuroscribe.ablate.measure.evaluate` scores flags against."""
    import numpy as np
    import torch
    from .groups import group_activations, group_flags, stratified_auc
    from .refit import labels_and_groups
    from ..datasets.readers import group_value
    from ..datasets.splits import stratified_sample
    labels, groups = labels_and_groups(ds)
    cells = {c: k for k, c in enumerate(sorted(set(zip(labels, groups))))}
    ids = stratified_sample([cells[c] for c in zip(labels, groups)], images, cfg.seed, purpose="group evidence")
    acts, y, g = group_activations(lm.module, layers, loader(cfg, torch.utils.data.Subset(ds, ids)), device=dev)
    cue = np.array([group_value(x) == cfg.flag.group_cue for x in g])
    if not cue.any():
        raise ValueError(f"flag.group_cue {cfg.flag.group_cue!r} names no image of shift {name!r}: its groups "
                         f"(CLASS/VALUE) are {sorted(set(groups))[:12]}")
    units, stats = [], {}
    for layer, a in acts.items():
        r = stratified_auc(a, y, cue, cfg.evaluate.bootstrap, cfg.seed)
        for u in range(a.shape[1]):
            stats[(layer, u)] = (float(r["auc"][u]), *((float(r["lo"][u]), float(r["hi"][u])) if r["lo"] is not None
                                                      else (None, None)))
    flagged = group_flags(stats, cfg.flag.group_top)
    for (layer, u), (auc, lo, hi) in stats.items():
        units.append({"layer": layer, "unit": u, "auc": auc, "lo": lo, "hi": hi, "flagged": (layer, u) in flagged,
                      "reason": flagged.get((layer, u))})
    return {"shift": name, "cue_group": cfg.flag.group_cue, "n_images": int(len(y)),
            "per_class": {str(k): v for k, v in r["per_class"].items()}, "bootstrap": cfg.evaluate.bootstrap,
            "units": units}


def described_rows(job: Path) -> dict:
    """(layer, unit) -> its describe log row, from every rank's log (``units.jsonl``, ``units.rank<r>.jsonl``),
    with ``verify_status`` / ``verify_effect`` from ``verify.json``."""
    ddir = job / "describe" / json.loads((job / "describe.json").read_text())["key"]
    rows = {}
    for log_file in sorted(ddir.glob("units*.jsonl")):
        for line in log_file.read_text().splitlines():
            if line.strip().endswith("}"):
                r = json.loads(line)
                rows[(r["layer"], r["unit"])] = r
    ver = ddir / "verify.json"  # the words' own experiment (describe.verify), when it ran
    for v in json.loads(ver.read_text())["units"] if ver.is_file() else []:
        if (v["layer"], v["unit"]) in rows:
            rows[(v["layer"], v["unit"])].update(verify_status=v["status"], verify_effect=v["effect"],
                                                 verify_response=v.get("response"))
    return rows


def verify_score(row: dict) -> float:
    """A described unit's own experiment as one number, for ordering units by their words: the verification's
    response (how far the edit the words became moves the unit from the unedited image, in unit sds), its effect
    when the verification predates the response, -inf without either."""
    v = row.get("verify_response")
    v = row.get("verify_effect") if v is None else v
    return -math.inf if v is None or v != v else float(v)


def capped_candidates(name: str, units: list, cap: int | None, described: dict, flags: dict) -> list:
    """The flagged ``units`` of flag set ``name`` that are scored alone on validation (all of them within ``cap``):
    the evidence set keeps the largest cue effects, the group set the largest group AUCs; every other set is chosen
    by words -- the words' own experiment (:func:`verify_score`), then the most consistent (support), then the
    best-scored descriptions, never the cue evidence. Ties go to the lower unit."""
    if not cap or len(units) <= cap:
        return units
    if name == "evidence":
        effect = {(f["layer"], f["unit"]): f.get("evidence") or 0.0 for f in flags["flags"]}
        return sorted(units, key=lambda u: (-effect.get(u, 0.0), u))[:cap]
    if name == "group":
        auc = {(u["layer"], u["unit"]): u["auc"] for u in flags.get("group_evidence", {}).get("units", [])}
        return sorted(units, key=lambda u: (-auc.get(u, 0.0), u))[:cap]
    rows = {u: described.get(u, {}) for u in units}
    words = {u: r.get("score") if r.get("score") is not None else -math.inf for u, r in rows.items()}
    return sorted(units, key=lambda u: (-verify_score(rows[u]), -(rows[u].get("extra") or {}).get("support", 0),
                                        -words[u], u))[:cap]


def validation_batches(cfg: JobConfig, lm) -> tuple[list, list[bool] | None, list[str], str]:
    """The validation set decoded once (it is small and every choosing pass reuses it): ``(batches [(x, y)], clean,
    class names, description)``; ``clean`` marks its clean images in order (None when it holds none)."""
    ds, names, desc = validation_set(cfg, lm.preprocess, lm.class_names)
    val, clean = [], []
    for x, y, info in loader(cfg, ds):
        val.append((x, y))
        clean += [g == "clean" for g in info["group"]]
    return val, clean if any(clean) else None, names, desc


def dfr_cue_matters(cfg: JobConfig) -> bool:
    """Whether ``ablate.dfr_cue`` changes DFR's slice (the training holdout with a cue) and differs from 'wrong', the
    only slice of jobs made before the option (their keys stay)."""
    return cfg.ablate.dfr == "holdout" and cfg.train is not None and cfg.train.cue is not None \
        and cfg.ablate.dfr_cue != "wrong"


@reuse_freed_memory()
def ablate(cfg: JobConfig) -> dict:
    """For each flag set: order units (MILAN), the validation curve over N, N = argmax; plus the controls."""
    from .refit import dfr_rule
    from .select import accuracy_curve, choose_n, order_units, random_units, sort_all
    if cfg.ablate.dfr_ns and not cfg.ablate.dfr:
        raise ValueError("ablate.dfr_ns chooses N for ablation + DFR: set ablate.dfr too (e.g. 'holdout')")
    job = Path(cfg.out)
    flags = json.loads((job / "flags.json").read_text())
    settings = cfg.ablate.model_dump(mode="json")
    for opt in ("clean_tolerance", "dfr_ns", "dfr_retrains"):  # jobs that never set them keep their keys
        if settings[opt] is None:
            del settings[opt]
    if settings["dfr_toward"] == "zero" or not cfg.ablate.dfr_ns:  # DFR's centre matters here only for dfr_ns
        del settings["dfr_toward"]
    if not dfr_cue_matters(cfg) or not cfg.ablate.dfr_ns:  # 'wrong' was the only slice before: those keys stay
        del settings["dfr_cue"]
    if not cfg.ablate.dfr_train or not cfg.ablate.dfr_ns:  # DFR's training photos matter here only for dfr_ns
        del settings["dfr_train"]
    key = io.artifact_key(flags["key"], settings, cfg.model.spec, io.file_key(job / "train.json"), HOLDOUT_RULE,
                          *([dfr_rule(cfg)] if cfg.ablate.dfr_ns else []))  # the DFR curve's fits follow its rule
    done = io.current(job / "ablation.json", key)
    if done:
        return done
    lm, dev, rec, means = model_and_means(cfg)
    val, clean, val_names, val_desc = validation_batches(cfg, lm)
    tol = cfg.ablate.clean_tolerance
    if tol is not None and clean is None:
        raise ValueError(f"ablate.clean_tolerance is set, but the validation set ({val_desc}) holds no clean image: "
                         f"use ablate.validation: holdout with a train.cue, or unset clean_tolerance")
    ci = class_index(lm, val_names)
    scores: dict = {}  # each unit scored alone once, shared by every flag set's ordering and the sort-all control
    kw = dict(method=cfg.ablate.method, means=means, device=dev, class_index=ci, progress=cfg.progress)
    out = {"key": key, "validation": {"description": val_desc, "n": sum(len(y) for _, y in val),
                                      "clean": sum(clean or [])},
           "clean_tolerance": tol, "variants": {}}
    described = described_rows(job)
    for name, units in flags["sets"].items():
        units = capped_candidates(name, [tuple(u) for u in units], cfg.ablate.max_candidates, described, flags)
        if not units:
            out["variants"][name] = {"ordered": [], "curve": [[0, None]], "chosen_n": 0, "units": []}
            continue
        ordered = order_units(lm.module, units, val, scores=scores, **kw)
        rows = accuracy_curve(lm.module, ordered, val, cfg.ablate.max_units, clean=clean, **kw)
        n = choose_n(rows, None if tol is None else tol / 100)
        out["variants"][name] = {"ordered": [[l, u, a] for (l, u), a in ordered],
                                 "curve": [list(r[:2]) for r in rows], "chosen_n": n,
                                 "units": [[l, u] for (l, u), _ in ordered[:n]],
                                 **({"clean_curve": [[r[0], r[2]] for r in rows]} if clean else {})}
    if cfg.ablate.dfr_ns and out["variants"].get("description", {}).get("ordered"):
        ordered = [(l, u) for l, u, _ in out["variants"]["description"]["ordered"]]
        out["dfr_tuned"] = dfr_curve(cfg, lm, dev, means, ordered, val, ci, key=key)
    n = out["variants"].get("description", {}).get("chosen_n", 0)
    all_units = {l: rec.units(l) for l in rec.layers}
    out["controls"] = {"n": n, "random": [[list(u) for u in d] for d in
                                          random_units(all_units, n, cfg.ablate.random_draws, cfg.seed)]}
    out["controls"]["sort_all"] = [list(u) for u in sort_all(
        lm.module, all_units, val, n, max_candidates=cfg.ablate.control_candidates, seed=cfg.seed, scores=scores,
        **kw)] if n else []
    out["passes"] = {"units_scored_alone": len(scores)}
    io.write_json(job / "ablation.json", out)
    return out


#: the heads of the DFR fits made for ``ablate.dfr_ns``, beside ``ablation.json``: evaluate reuses those whose units
#: it needs (DFR alone is the curve's N = 0; ``ablated_dfr_tuned`` its chosen N) instead of fitting them again
DFR_FITS = "dfr-fits.safetensors"


def dfr_retrains(cfg: JobConfig) -> int:
    """DFR's final fits for this job (``ablate.dfr_retrains``; unset = :data:`~neuroscribe.ablate.refit.DFR_RETRAINS`).
    With ``dfr_train`` every fit shares the training photos, so the final fits differ only by the slice's draws."""
    from .refit import DFR_RETRAINS
    return cfg.ablate.dfr_retrains or DFR_RETRAINS


def dfr_fits_key(cfg: JobConfig, ablation_key: str) -> str:
    """What a DFR fit depends on besides its units: the ablation's key (model, flags, every ablate setting), the
    images DFR reads (a named DFR shift's definition; the ``train`` section, whose photos and cue the held-out slice
    and ``dfr_train`` take), the seed, the batch size of the feature passes and the DFR rule. A stored fit is reused
    only under the same key."""
    from .refit import dfr_rule
    shift = [s.model_dump(mode="json") for s in cfg.shifts if s.name == cfg.ablate.dfr]
    settings = cfg.ablate.model_dump(mode="json", exclude={"dfr_retrains"} if cfg.ablate.dfr_retrains is None else None)
    return io.artifact_key(ablation_key, cfg.seed, cfg.batch_size, settings, shift,
                           cfg.train.model_dump(mode="json") if cfg.train else None, dfr_rule(cfg))


def stored_dfr_fits(cfg: JobConfig, abl: dict, wanted: set) -> dict:
    """``{units: (weight, bias, info)}`` of the DFR fits the ablation stage stored (:data:`DFR_FITS`) for this job and
    these settings, for the ``wanted`` unit tuples only; empty when there are none or they were made under another
    key (then evaluate fits them itself)."""
    from safetensors import safe_open
    path, fits = Path(cfg.out) / DFR_FITS, (abl.get("dfr_tuned") or {}).get("fits")
    if not fits or not path.is_file():
        return {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("key") != dfr_fits_key(cfg, abl["key"]):
            log.info("%s was made for other inputs: DFR is fitted again", path)
            return {}
        keys, out = set(f.keys()), {}
        for n, units in json.loads(meta["units"]).items():
            units = tuple(map(tuple, units))
            if units in wanted and n in fits:
                out[units] = (f.get_tensor(f"{n}.weight"), f.get_tensor(f"{n}.bias") if f"{n}.bias" in keys else None,
                              dict(fits[n], stored=f"{DFR_FITS} (the ablation stage's fit)"))
        return out


def dfr_curve(cfg: JobConfig, lm, dev, means, ordered: list, val: list, ci, key: str | None = None) -> dict:
    """Ablation + DFR with N chosen for the pair: for each N of ``ablate.dfr_ns`` (past the ordering: all of it),
    the first N units of the description ordering ablated and DFR fitted after them (:func:`.refit.dfr_last_layer`,
    on the DFR slice), scored on the validation images (disjoint from that slice); N = the best, ties to the smaller.
    The units are the description variant's own ordering: the words choose them, validation only how many. With the
    ablation's ``key``, every fit's head is stored (:data:`DFR_FITS`) for evaluate."""
    from ..datasets.sets import dfr_set, dfr_train_set, in_memory
    from .edit import ablation_edits, as_unit_dict
    from .refit import dfr_last_layer, last_linear
    from .select import choose_n, val_correct
    dfr_ds, _, _ = dfr_set(cfg, lm.preprocess, lm.class_names)
    extra = (dfr_train_set(cfg, lm.preprocess) or (None,))[0]
    dfr_ds, extra = in_memory(cfg, dfr_ds), in_memory(cfg, extra)  # read once for every point of the curve
    curve, heads, infos, units = [], {}, {}, {}
    for n in sorted({min(int(n), len(ordered)) for n in cfg.ablate.dfr_ns}):
        model, infos[str(n)] = dfr_last_layer(lm.module, ordered[:n], dfr_ds, lambda d: loader(cfg, d),
                                              cfg.ablate.method, means, device=dev, seed=cfg.seed,
                                              toward=cfg.ablate.dfr_toward, extra=extra, retrains=dfr_retrains(cfg))
        lin = dict(model.named_modules())[last_linear(model)]
        heads.update({f"{n}.weight": lin.weight, **({f"{n}.bias": lin.bias} if lin.bias is not None else {})})
        units[str(n)] = [list(u) for u in ordered[:n]]
        edits = ablation_edits(model, as_unit_dict(ordered[:n]), cfg.ablate.method, means) if n else None
        right = val_correct(model, val, edits, dev, ci)
        curve.append([n, int(right.sum()) / len(right)])
    if key is not None:
        io.save_tensors(Path(cfg.out) / DFR_FITS, heads, {"key": dfr_fits_key(cfg, key), "units": json.dumps(units)})
    n = choose_n(curve)  # the headline's rule: the best, ties to the smaller N
    return {"ns": cfg.ablate.dfr_ns, "curve": curve, "chosen_n": n, "units": [list(u) for u in ordered[:n]],
            "fits": infos}
