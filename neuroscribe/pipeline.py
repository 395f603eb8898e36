"""The robustness stages, each a function from (job config, artifacts in the job directory) to artifacts out:

``train`` -> ``train/seed<S>/`` (model + holdout validation set) · ``flag`` -> ``flags.json`` ·
``ablate`` -> ``ablation.json`` (MILAN's ordering, the curve over N, N chosen on validation only, controls) ·
``evaluate`` -> ``evaluation.json`` · ``report`` -> ``report.{json,md,html}``, ``curve.png`` ·
``run`` chains record, describe and these, skipping stages whose artifacts are current (each JSON carries the key
of its inputs). The test sets are read only by ``evaluate``: nothing is chosen on them.
"""

from __future__ import annotations

import hashlib
import json
import math
import logging
from pathlib import Path

import numpy as np
import torch

from . import io
from .config import JobConfig, ShiftSetConfig

log = logging.getLogger("neuroscribe.pipeline")


def _key(*parts) -> str:
    return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()


def _current(path: Path, key: str) -> dict | None:
    if path.is_file():
        d = json.loads(path.read_text())
        if d.get("key") == key:
            return d
    return None


def _file_key(path: Path) -> str:
    return hashlib.blake2b(path.read_bytes(), digest_size=8).hexdigest() if path.is_file() else "missing"


# ------------------------------------------------------------------------------------------------ train
def train(cfg: JobConfig) -> JobConfig:
    """Train ``cfg.train`` (first seed) into ``JOBDIR/train/seed<S>``; return cfg with model.spec pointing at it."""
    from .datasets.labels import check_job_labels
    from .train.classifier import train_classifier
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


# ------------------------------------------------------------------------------------------------ data
class _Labelled(torch.utils.data.Dataset):
    """``(tensor, label, {'group': g})`` per sample; unreadable images give None (dropped by :func:`_collate`)."""

    def __init__(self, samples, transform):
        self.samples, self.transform = samples, transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from .datasets.probe import ImageLoadError, load_image
        s = self.samples[i]
        try:
            return self.transform(load_image(s.path)), int(s.label), {"group": s.group or "all"}
        except ImageLoadError:
            return None


def _collate(batch):
    return torch.utils.data.default_collate([b for b in batch if b is not None])


def shift_set(shift: ShiftSetConfig, pre, seed: int, classes: list[str] | None = None):
    """``(dataset, class_names, description)`` for one test set, items in the model's preprocessing ``pre``.
    A manifest's integer labels index ``classes`` (the model's class list). With a cue, the model's geometry
    (resize + crop) comes first and the cue is drawn on that, as in training, so a corner cue is never cropped away."""
    from .datasets.probe import open_probe_set
    probe = open_probe_set(shift.data.root, shift.data.format, shift.data.split, shift.data.limit, seed, classes)
    if (probe.labels() < 0).any():
        raise ValueError(f"shift {shift.name!r}: every image needs a label (class folders or a label column)")
    names = probe.class_names or [str(i) for i in range(int(probe.labels().max()) + 1)]
    if shift.cue is None:
        return _Labelled(probe.samples, pre.transform()), names, f"{len(probe)} images from {probe.root}"
    from .datasets.shifts import CuedDataset
    ds = CuedDataset([(s.path, s.label) for s in probe.samples], names, shift.cue, fraction=shift.fraction,
                     correlation=shift.correlation, strength=shift.strength, seed=shift.seed,
                     transform=pre.to_tensor(), geometry=pre.geometry())
    kind = shift.cue.get("kind", "text")
    return ds, names, (f"{len(probe)} images from {probe.root}; {kind} cue on {shift.fraction:.0%} of them, "
                       f"naming {'a random wrong' if shift.correlation == 'wrong' else shift.correlation} class")


def _loader(cfg: JobConfig, ds):
    return torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.workers,
                                       collate_fn=_collate)


def test_sets(cfg: JobConfig, pre, classes: list[str] | None = None) -> dict[str, tuple]:
    """In-distribution (the job's clean probe images) plus every ``shifts`` entry except the validation one."""
    sets = {"in-distribution": shift_set(ShiftSetConfig(name="in-distribution", data=cfg.data), pre, cfg.seed,
                                         classes)}
    for s in cfg.shifts:
        if s.name not in (cfg.ablate.validation, cfg.probe):
            sets[s.name] = shift_set(s, pre, cfg.seed, classes)
    return sets


def validation_set(cfg: JobConfig, pre, classes: list[str] | None = None):
    """``(dataset, class_names, description)`` of the validation data that choices are made on."""
    if cfg.ablate.validation == "holdout":
        tj = Path(cfg.out) / "train.json"
        if not tj.is_file() or not json.loads(tj.read_text()).get("holdout_manifest"):
            raise ValueError("ablate.validation is 'holdout' but this job trained no model with a holdout "
                             "(set train: with holdout > 0), or name a shift as ablate.validation")
        t = json.loads(tj.read_text())
        from .datasets.probe import manifest
        probe = manifest(t["holdout_manifest"], t["class_names"])
        desc = (f"{len(probe)} training images held out before training ({cfg.train.holdout:.0%} per class), "
                "each carrying a random WRONG class name, so the cue is decorrelated from the label")
        return _Labelled(probe.samples, pre.transform()), t["class_names"], desc
    shift = next(s for s in cfg.shifts if s.name == cfg.ablate.validation)
    return shift_set(shift, pre, cfg.seed, classes)


def _model(cfg: JobConfig):
    """The job's model (its layers' declared ``layouts`` on it) and device."""
    from .runtime import resolve_device
    from .hooks import declare_layouts
    from .models import load_model
    dev = resolve_device(cfg.device)
    lm = load_model(cfg.model.spec, arch=cfg.model.arch, num_classes=cfg.model.num_classes,
                    allow_pickle=cfg.model.allow_pickle, device=dev, seed=cfg.seed)
    declare_layouts(lm.module, cfg.layouts)
    return lm, dev


def _model_and_means(cfg: JobConfig):
    """The job's model (the recorded layouts declared on it), its device, its recording and (for mean ablation) the
    recorded per-unit means."""
    from .record.exemplars import Recording
    from .hooks import declare_layouts
    lm, dev = _model(cfg)
    rec = Recording.open(cfg.out)
    declare_layouts(lm.module, rec.layouts)  # ablation edits the axis the recording read
    means = {l: rec.tensors(l)["mean"] for l in rec.layers} if cfg.ablate.method == "mean" else None
    return lm, dev, rec, means


def _class_index(lm, names):
    from .datasets.labels import label_map
    if lm.class_names is None or list(lm.class_names) == list(names):
        return None
    return label_map(names, lm.class_names)


def with_probe(cfg: JobConfig) -> JobConfig:
    """``cfg`` whose ``data`` is the probe set: ``probe`` (a shift) written once to JOBDIR/probe/NAME in the
    model's geometry, so record, views and OCR all see exactly the cued pixels; else ``cfg`` itself."""
    if not cfg.probe:
        return cfg
    from .config import DataConfig
    from .datasets.shifts import materialise
    out = Path(cfg.out) / "probe" / cfg.probe
    shift = next(s for s in cfg.shifts if s.name == cfg.probe)
    key = _key(shift.model_dump(mode="json"), cfg.model.spec)
    if not _current(out / "probe.json", key):
        lm, _ = _model(cfg)
        ds, _, _ = shift_set(shift, lm.preprocess, cfg.seed, lm.class_names)
        ds.transform = None
        materialise(ds, out, overwrite=True)
        io.write_json(out / "probe.json", {"key": key})
    return cfg.model_copy(update={"data": DataConfig(root=out / "manifest.csv")})


# ------------------------------------------------------------------------------------------------ flag
def flag(cfg: JobConfig) -> dict:
    """Flag units from ``descriptions.jsonl`` (and cue evidence where ``flag.evidence_shift`` pairs images)."""
    from .ablate.flag import cue_effect, cue_pairs, flag_units
    from .record.exemplars import Recording
    job = Path(cfg.out)
    rows = [json.loads(l) for l in (job / "descriptions.jsonl").read_text().splitlines() if l.strip()]
    key = _key(_file_key(job / "descriptions.jsonl"), cfg.flag.model_dump(mode="json"), cfg.model.spec,
               [s.model_dump(mode="json") for s in cfg.shifts if s.name == cfg.flag.evidence_shift])
    done = _current(job / "flags.json", key)
    if done:
        return done
    evidence = None
    if cfg.flag.evidence_shift:
        from .hooks import declare_layouts
        lm, dev = _model(cfg)
        rec = Recording.open(job)
        declare_layouts(lm.module, rec.layouts)
        shift = next(s for s in cfg.shifts if s.name == cfg.flag.evidence_shift)
        ds, _, _ = shift_set(shift, lm.preprocess, cfg.seed, lm.class_names)
        from .datasets.splits import stratified_sample
        ids = stratified_sample([y for _, y in ds.samples], cfg.flag.evidence_images, cfg.seed, purpose="evidence")
        pairs = cue_pairs(ds, lm.preprocess.to_tensor(), ids, cfg.batch_size)
        evidence = cue_effect(lm.module, {l: None for l in rec.layers}, pairs, device=dev)
    embedder = None
    if cfg.flag.embedder:
        from .text import SentenceEmbedder
        embedder = SentenceEmbedder(cfg.flag.embedder)
    all_rows = flag_units(rows, cfg.flag.model_copy(update={"use": "either" if evidence else "description"}),
                          embedder, evidence, all_rows=True)
    sets = {"description": sorted({f.key for f in all_rows if f.by_keyword or f.by_embedding})}
    if evidence is not None:
        sets["evidence"] = sorted({f.key for f in all_rows if f.by_evidence})
        sets["both"] = sorted(set(sets["description"]) | set(sets["evidence"]))
    out = {"key": key, "sets": {k: [list(u) for u in v] for k, v in sets.items()},
           "flags": [f.to_dict() for f in all_rows if f.flagged or f.by_keyword or f.by_embedding or f.by_evidence]}
    io.write_json(job / "flags.json", out)
    return out


# ------------------------------------------------------------------------------------------------ ablate
def _described_rows(job: Path) -> dict:
    """(layer, unit) -> its describe log row, from every rank's log (``units.jsonl``, ``units.rank<r>.jsonl``)."""
    ddir = job / "describe" / json.loads((job / "describe.json").read_text())["key"]
    rows = {}
    for log_file in sorted(ddir.glob("units*.jsonl")):
        for line in log_file.read_text().splitlines():
            if line.strip().endswith("}"):
                r = json.loads(line)
                rows[(r["layer"], r["unit"])] = r
    return rows


def ablate(cfg: JobConfig) -> dict:
    """For each flag set: order units (MILAN), the validation curve over N, N = argmax; plus the controls."""
    from .ablate.select import accuracy_curve, choose_n, order_units, random_units, sort_all
    job = Path(cfg.out)
    flags = json.loads((job / "flags.json").read_text())
    key = _key(flags["key"], cfg.ablate.model_dump(mode="json"), cfg.model.spec, _file_key(job / "train.json"))
    done = _current(job / "ablation.json", key)
    if done:
        return done
    lm, dev, rec, means = _model_and_means(cfg)
    val_ds, val_names, val_desc = validation_set(cfg, lm.preprocess, lm.class_names)
    val = [(x, y) for x, y, _ in _loader(cfg, val_ds)]  # validation is small: decode once, reuse every pass
    ci = _class_index(lm, val_names)
    scores: dict = {}  # each unit scored alone once, shared by every flag set's ordering and the sort-all control
    kw = dict(method=cfg.ablate.method, means=means, device=dev, class_index=ci, progress=cfg.progress)
    out = {"key": key, "validation": {"description": val_desc, "n": len(val_ds)}, "variants": {}}
    described = _described_rows(job)
    support = {k: (r.get("extra") or {}).get("support", 0) for k, r in described.items()}
    words = {k: r.get("score") if r.get("score") is not None else -math.inf for k, r in described.items()}
    effect = {(f["layer"], f["unit"]): f.get("evidence") or 0.0 for f in flags["flags"]}
    for name, units in flags["sets"].items():
        units = [tuple(u) for u in units]
        cap = cfg.ablate.max_candidates
        if cap and len(units) > cap:  # the validation ordering decides among the capped candidates
            if name == "evidence":  # the evidence variant: largest cue effect first
                rank = lambda u: (-effect.get(u, 0.0), u)  # noqa: E731
            else:  # words choose: most consistent, then best-scored descriptions; never the evidence
                rank = lambda u: (-support.get(u, 0), -words.get(u, -math.inf), u)  # noqa: E731
            units = sorted(units, key=rank)[:cap]
        if not units:
            out["variants"][name] = {"ordered": [], "curve": [[0, None]], "chosen_n": 0, "units": []}
            continue
        ordered = order_units(lm.module, units, val, scores=scores, **kw)
        curve = accuracy_curve(lm.module, ordered, val, cfg.ablate.max_units, **kw)
        n = choose_n(curve)
        out["variants"][name] = {"ordered": [[l, u, a] for (l, u), a in ordered], "curve": curve, "chosen_n": n,
                                 "units": [[l, u] for (l, u), _ in ordered[:n]]}
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


# ------------------------------------------------------------------------------------------------ evaluate
_VARIANT = {"description": "ablated", "evidence": "ablated_evidence", "both": "ablated_both"}


def _acc(rep: dict) -> dict:
    out = {"acc": rep["acc"], "lo": rep["ci_low"], "hi": rep["ci_high"], "n": rep["n"]}
    if rep.get("per_group") and len(rep["per_group"]) > 1:
        out["groups"] = {g: {"acc": v["acc"], "lo": v["ci_low"], "hi": v["ci_high"], "n": v["n"]}
                         for g, v in rep["per_group"].items()}
    return out


def evaluate(cfg: JobConfig) -> dict:
    """Accuracy with bootstrap CIs of the base model, every ablated variant and the controls on every test set."""
    from .ablate.edit import ablation_edits, as_unit_dict
    from .ablate.evaluate import accuracy_report, predict
    job = Path(cfg.out)
    abl = json.loads((job / "ablation.json").read_text())
    key = _key(abl["key"], cfg.evaluate.model_dump(mode="json"), cfg.data.model_dump(mode="json"),
               [s.model_dump(mode="json") for s in cfg.shifts], cfg.seed, cfg.ablate.refit, cfg.probe)
    done = _current(job / "evaluation.json", key)
    if done:
        return done
    lm, dev, rec, means = _model_and_means(cfg)
    variants = {"base": []}
    for name, v in abl["variants"].items():
        variants[_VARIANT.get(name, name)] = [tuple(u) for u in v["units"]]
    variants["sort_all"] = [tuple(u) for u in abl["controls"]["sort_all"]]
    draws = [[tuple(u) for u in d] for d in abl["controls"]["random"]]
    runs = {k: (lm.module, u) for k, u in dict(variants, **{f"random/{i}": d for i, d in enumerate(draws)}).items()}
    if cfg.ablate.refit and variants.get("ablated"):
        from .ablate.refit import refit_last_layer
        probe = next(s for s in cfg.shifts if s.name == cfg.probe)
        train_ds, _, _ = shift_set(probe, lm.preprocess, cfg.seed, lm.class_names)
        refit = refit_last_layer(lm.module, variants["ablated"], _loader(cfg, train_ds), cfg.ablate.method, means,
                                 device=dev, seed=cfg.seed)
        runs["refit"] = (refit, variants["ablated"])
        variants["refit"] = variants["ablated"]
    sets = test_sets(cfg, lm.preprocess, lm.class_names)
    if cfg.evaluate.limit:  # a seeded random subset (the same images for every variant): folders are class-sorted
        sets = {k: (torch.utils.data.Subset(ds, sorted(np.random.default_rng(cfg.seed).permutation(len(ds))
                                                       [:min(cfg.evaluate.limit, len(ds))].tolist())), nm, d)
                for k, (ds, nm, d) in sets.items()}
    out = {"key": key, "test_sets": {}, "results": {}}
    for sname, (ds, names, desc) in sets.items():
        out["test_sets"][sname] = {"description": desc, "n": len(ds), "in_distribution": sname == "in-distribution"}
        batches = list(_loader(cfg, ds))  # decoded once, reused by every variant
        ci = _class_index(lm, names)
        for vname, (model, units) in runs.items():
            edits = ablation_edits(model, as_unit_dict(units), cfg.ablate.method, means) if units else None
            p = predict(model, batches, dev, edits, class_index=ci, keep_logits=False, progress=False)
            rep = accuracy_report(p.preds, p.labels, p.groups, cfg.evaluate.bootstrap, cfg.seed)
            out["results"].setdefault(vname, {})[sname] = _acc(rep)
            log.info("evaluate %s on %s: %.3f", vname, sname, rep["acc"])
    out["variants"] = {k: [list(u) for u in v] for k, v in variants.items()}
    out["random_draws"] = [[list(u) for u in d] for d in draws]
    io.write_json(job / "evaluation.json", out)
    return out


def export_edited(cfg: JobConfig, path: str | Path, variant: str = "description") -> Path:
    """Bake the chosen ablation (``ablation.json``, flag set ``variant``) into the weights and write
    ``path`` (safetensors) + ``PATH.spec.json``, loadable as ``checkpoint:PATH``. Units produced by layers
    without weights to edit (e.g. a residual block's output) cannot be baked: the error names them."""
    import warnings
    from .ablate.edit import as_unit_dict, permanent_edit, save_edited
    job = Path(cfg.out)
    abl = json.loads((job / "ablation.json").read_text())
    units = [tuple(u) for u in abl["variants"][variant]["units"]]
    if not units:
        raise ValueError(f"ablation.json chose no units for {variant!r}: nothing to bake into the weights")
    if cfg.ablate.method == "mean":
        lm, _, _, means = _model_and_means(cfg)
    else:
        (lm, _), means = _model(cfg), None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        edited = permanent_edit(lm.module, as_unit_dict(units), cfg.ablate.method, means)
    meta = {"arch": cfg.model.arch or (cfg.train.arch if cfg.train else cfg.model.spec),
            "num_classes": len(lm.class_names) if lm.class_names else cfg.model.num_classes,
            "class_names": lm.class_names,
            "preprocess": lm.preprocess.to_dict()}
    return save_edited(edited, path, meta)


# ------------------------------------------------------------------------------------------------ report
def report(cfg: JobConfig) -> dict:
    """Assemble the robustness report (``report.json/.md/.html``, ``curve.png``) from the stage artifacts."""
    from .report.robustness import write_report
    job = Path(cfg.out)
    abl = json.loads((job / "ablation.json").read_text())
    ev = json.loads((job / "evaluation.json").read_text())
    flags = json.loads((job / "flags.json").read_text())
    desc = {(r["layer"], r["unit"]): r for r in
            (json.loads(l) for l in (job / "descriptions.jsonl").read_text().splitlines() if l.strip())}
    variants = {}
    for vname, units in ev["variants"].items():
        variants[vname] = {"n_units": len(units), "units": [f"{l}:{u}" for l, u in units],
                           "results": ev["results"][vname]}
    variants["random"] = {"n_units": abl["controls"]["n"], "draws": [
        {"seed": cfg.seed, "units": [f"{l}:{u}" for l, u in d], "results": ev["results"][f"random/{i}"]}
        for i, d in enumerate(ev["random_draws"])]}
    main = abl["variants"].get("description", {"curve": [[0, None]], "chosen_n": 0})
    curve = [(n, a) for n, a in main["curve"] if a is not None]
    reasons = {}
    for f in flags["flags"]:
        reasons.setdefault((f["layer"], f["unit"]), []).extend(
            {"reason": r, "score": f.get("similarity")} for r in f.get("reasons") or [])
    units = []
    for l, u in ev["variants"].get("ablated", []):
        d = desc.get((l, u), {})
        units.append({"layer": l, "unit": u, "description": d.get("description", ""),
                      "flags": reasons.get((l, u), []), "grid": d.get("grid_path") or d.get("grid")})
    results = {
        "title": f"neuroscribe robustness report: {cfg.model.spec}",
        "model": {"spec": cfg.model.spec}, "job": {"dir": str(job), "config": json.loads(json.dumps(
            cfg.model_dump(mode="json")))},
        "validation": {"name": "validation", "description": abl["validation"]["description"],
                       "n": abl["validation"]["n"]},
        "test_sets": ev["test_sets"],
        "ablation": {"method": cfg.ablate.method, "flagged_by": "descriptions (keywords + sentence embedding)",
                     "chosen_n": main["chosen_n"], "selection": "N with the best validation accuracy (ties: "
                     "smaller N), validation data only"},
        "variants": variants,
        "units": units,
    }
    if curve:
        results["curve"] = {"n_units": [n for n, _ in curve], "validation": [a for _, a in curve],
                            "chosen_n": main["chosen_n"]}
    return {k: str(v) for k, v in write_report(results, job).items()}


def run(cfg: JobConfig) -> dict:
    """Every stage in order; each skips work whose artifacts are current. With several ``train.seeds``, one
    complete job per seed in ``JOBDIR/seed<S>/`` and ``JOBDIR/seeds.{json,md}``: mean and 95% CI over seeds.
    Every test set's labels are checked against the model's classes first, before any work."""
    from .datasets.labels import check_job_labels
    from .runtime import apply
    apply(cfg.threads, cfg.progress)
    check_job_labels(cfg)
    if cfg.train is not None and len(cfg.train.seeds) > 1:
        reports = {}
        for s in cfg.train.seeds:
            sub = cfg.model_copy(update={"out": Path(cfg.out) / f"seed{s}",
                                         "train": cfg.train.model_copy(update={"seeds": [s]})})
            reports[s] = json.loads(Path(_run_one(sub)["json"]).read_text())
        return aggregate_seeds(reports, Path(cfg.out))
    return _run_one(cfg)


def aggregate_seeds(reports: dict[int, dict], out: Path) -> dict:
    """Mean accuracy and a t-based 95% CI over training seeds, per variant and test set."""
    import numpy as np
    from scipy import stats
    table: dict = {}
    for seed, rep in reports.items():
        for vname, v in rep["variants"].items():
            results = v.get("results")
            if results is None and v.get("draws"):  # random control: mean over its draws
                sets = v["draws"][0]["results"]
                results = {k: {"acc": float(np.mean([d["results"][k]["acc"] for d in v["draws"]]))} for k in sets}
            for sname, acc in (results or {}).items():
                table.setdefault(vname, {}).setdefault(sname, {})[seed] = acc["acc"]
    agg = {}
    for vname, sets in table.items():
        for sname, by_seed in sets.items():
            a = np.array(list(by_seed.values()))
            half = float(stats.t.ppf(0.975, len(a) - 1) * a.std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 else None
            agg.setdefault(vname, {})[sname] = {"mean": float(a.mean()), "ci95_half": half, "per_seed": by_seed,
                                                "n_seeds": len(a)}
    cols = sorted({s for v in agg.values() for s in v})
    lines = ["| variant | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for vname, sets in agg.items():
        cells = [(f"{100 * sets[c]['mean']:.1f}% ± {100 * sets[c]['ci95_half']:.1f}" if sets[c]["ci95_half"] is not None
                  else f"{100 * sets[c]['mean']:.1f}%") if c in sets else "" for c in cols]
        lines.append(f"| {vname} | " + " | ".join(cells) + " |")
    md = (f"# Accuracy over {len(reports)} training seeds (mean ± 95% CI half-width, t-distribution)\n\n"
          + "\n".join(lines) + "\n")
    io.write_json(out / "seeds.json", {"seeds": list(reports), "results": agg})
    io.write_text(out / "seeds.md", md)
    return {"json": str(out / "seeds.json"), "md": str(out / "seeds.md"), "html": None}


def _run_one(cfg: JobConfig) -> dict:
    from .record.recorder import record
    from .describe.stage import describe
    cfg = train(cfg)
    probe_cfg = with_probe(cfg)
    record(probe_cfg)
    describe(probe_cfg)
    flag(cfg)
    ablate(cfg)
    evaluate(cfg)
    return report(cfg)
