"""MILAN section 7 (Hernandez et al., ICLR 2022) on the full Imagenette, rerunnable with one command:

    python benchmarks/milan_study.py                      # configs/milan_study.yaml, every seed, ~18 min a seed
    python benchmarks/milan_study.py --set train.resolution=224 --set train.epochs=30   # the GPU setting

For every training seed of the job: ``neuroscribe run`` (train the spurious model, record, describe with the
offline tagger, flag, ablate with MILAN's ordering and N chosen on the held-out training photos, evaluate with the
random and sort-all controls and the re-fit variant), then

* the final-layer check: the ``fc`` logits of that model described on the same probe photos (each should name its
  class);
* precision / recall / share of the flag sets, and the description ranking's AUC, against counterfactual ground
  truth (the evaluate stage's ``flag_quality``): the units whose spatial-max activation the wrong-name text moves
  most (top 5 % per layer, in clean-image standard deviations) on class-stratified paired with/without-text photos
  of the wrong-text test set. Test photos choose nothing: this is measured after the fact, only for the report (the
  evidence flags themselves come from paired TRAINING photos);

plus the same architecture trained on clean images (``--reference-seeds``) as the reference. Results go to
``benchmarks/results/milan_study.json`` and ``.md``: mean and t-based 95% CI over seeds of every variant on clean
val, wrong-text val and a text style not seen in training, the per-seed gains, the curves, flag counts and the
timings. Nothing here is hard-coded: every number is read back from the job's own artifacts.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from neuroscribe import io, pipeline
from neuroscribe.config import load_config, parse_overrides
from neuroscribe.datasets.sets import class_index, loader
from neuroscribe.runtime import cpu_name
from neuroscribe.ablate.measure import TRUTH_SHARE

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_tables import (LABEL, SETS, VARIANTS, gap_closed_share, in_order, markdown,  # noqa: E402,F401
                          mean_ci, paired_gap_closed, use_sets, verdict)


def seed_cfg(cfg, seed: int):
    return cfg.model_copy(update={"out": Path(cfg.out) / f"seed{seed}",
                                  "train": cfg.train.model_copy(update={"seeds": [seed]})})


def final_layer_check(trained) -> dict | None:
    """Describe the trained model's ``fc`` logits on the job's probe photos (a separate small job); ``trained`` is
    the seed's job config with its model and probe set resolved."""
    from neuroscribe.record.recorder import record
    from neuroscribe.describe.stage import describe
    sub = trained.model_copy(update={"layers": ["fc"], "out": Path(trained.out) / "final-layer", "train": None,
                                     "describe": trained.describe.model_copy(update={"gallery": False})})
    record(sub)
    describe(sub)
    return json.loads((Path(sub.out) / "describe.json").read_text()).get("final_layer_check")


def clean_final_layer_check(cfg, checkpoint: Path, out: Path) -> dict | None:
    """The final-layer check of the clean-trained reference: its ``fc`` logits described on the probe's photos
    without the cue (the probe shift's data, the same seeded sample), so no written name lends it a word."""
    from neuroscribe.record.recorder import record
    from neuroscribe.describe.stage import describe
    probe = next(s for s in cfg.shifts if s.name == cfg.probe)
    sub = cfg.model_copy(update={"model": cfg.model.model_copy(update={"spec": f"checkpoint:{checkpoint}"}),
                                 "layers": ["fc"], "out": out, "train": None, "probe": None, "data": probe.data,
                                 "preprocess": cfg.preprocess.model_copy(update={"resize": cfg.train.resolution,
                                                                                 "crop": cfg.train.resolution}),
                                 "describe": cfg.describe.model_copy(update={"gallery": False}),
                                 "ablate": cfg.ablate.model_copy(update={"dfr": None})})
    record(sub)
    describe(sub)
    return json.loads((out / "describe.json").read_text()).get("final_layer_check")


def final_layer_summary(check: dict | None) -> dict | None:
    """``{named, units, misses}`` of a final-layer check: classes whose logit unit's description names them."""
    if not check:
        return None
    per = check["per_class"]
    return {"named": sum(bool(r["names_class"]) for r in per.values()), "units": len(per),
            "misses": {n: r["description"] for n, r in per.items() if not r["names_class"]}}


def flag_truth(cfg) -> dict:
    """The pipeline's flag quality of the seed's job (``evaluation.json`` ``flag_quality``): precision, recall, share
    of each flag set and the description ranking's AUC against counterfactual ground truth (the top 5 % of units per
    layer by the wrong-name text's effect on ``flag.evidence_images`` class-stratified paired photos of the
    wrong-text test set); measured after the fact, for the report only."""
    quality = json.loads((Path(cfg.out) / "evaluation.json").read_text()).get("flag_quality")
    if quality is None:
        raise ValueError(f"{cfg.out}/evaluation.json has no flag_quality: the job needs a test set with the cue "
                         "(wrong-text) and flags.json; delete evaluation.json to evaluate again")
    return quality


def flag_aggregate(per: dict, truth_of) -> dict:
    """Mean and CI over seeds of each flag set's figures against ``truth_of(flag_truth)`` (the per-layer truth, or
    its pooled variant: the same share over all units at once)."""
    out = {}
    for name in truth_of(next(iter(per.values()))["flag_truth"])["sets"]:
        rows = [truth_of(per[k]["flag_truth"])["sets"][name] for k in per]
        out[name] = {"flagged": mean_ci([r["flagged"] for r in rows]), "share": mean_ci([r["share"] for r in rows]),
                     "chosen_n": mean_ci([per[k]["chosen_n"].get(name, 0) for k in per]),
                     "precision": mean_ci([r["precision"] for r in rows]),
                     "recall": mean_ci([r["recall"] for r in rows]), "auc": mean_ci([r.get("auc") for r in rows])}
    return out


def reference(cfg, seed: int) -> dict:
    """The same architecture and schedule trained on clean images, evaluated on the same test sets."""
    from neuroscribe.ablate.evaluate import accuracy_report, predict
    from neuroscribe.models import load_model
    from neuroscribe.train.classifier import train_classifier
    out = Path(cfg.out) / "reference" / f"seed{seed}"
    t0 = time.perf_counter()
    res = train_classifier(cfg.train.model_copy(update={"cue": None, "seeds": [seed]}), out, device=cfg.device,
                           seed=seed, progress=cfg.progress, workers=cfg.workers)
    lm = load_model(f"checkpoint:{res.checkpoint}")
    dev = torch.device("cuda" if torch.cuda.is_available() and cfg.device in ("auto", "cuda") else "cpu")
    lm.module.to(dev)
    results = {}
    for name, (ds, names, _) in pipeline.test_sets(cfg, lm.preprocess, lm.class_names).items():
        p = predict(lm.module, loader(cfg, ds), dev, class_index=class_index(lm, names),
                    keep_logits=False, progress=False)
        r = accuracy_report(p.preds, p.labels, None, cfg.evaluate.bootstrap, cfg.seed)
        results[name] = {"acc": r["acc"], "lo": r["ci_low"], "hi": r["ci_high"], "n": r["n"]}
    final = clean_final_layer_check(cfg, Path(res.checkpoint), out / "final-layer")
    return {"seed": seed, "results": results, "seconds": round(time.perf_counter() - t0, 1),
            "train_seconds": round(sum(h["seconds"] for h in res.history), 1),
            "final_layer_check": final, "final_layer": final_layer_summary(final)}


def collect(cfg, seconds: float, final: dict | None, truth: dict) -> dict:
    job = Path(cfg.out)
    rep = json.loads((job / "report.json").read_text())
    abl = json.loads((job / "ablation.json").read_text())
    tr = json.loads((job / "train.json").read_text())
    desc = json.loads((job / "describe.json").read_text())
    acc = {}
    for v, body in rep["variants"].items():
        if body.get("results"):
            acc[v] = {s: r["acc"] for s, r in body["results"].items()}
        elif body.get("draws"):
            acc[v] = {s: float(np.mean([d["results"][s]["acc"] for d in body["draws"]])) for s in SETS}
            acc[v + "_range"] = {s: [min(d["results"][s]["acc"] for d in body["draws"]),
                                     max(d["results"][s]["acc"] for d in body["draws"])] for s in SETS}
    ci = {v: {s: [r["lo"], r["hi"]] for s, r in body["results"].items()}
          for v, body in rep["variants"].items() if body.get("results")}
    runs = job / "runs.jsonl"  # the pipeline's own stage clock; its last row is the run just made
    rows = runs.read_text().splitlines() if runs.exists() else []
    last = json.loads(rows[-1]) if rows else {}
    return {"seconds": round(seconds, 1), "stage_seconds": last.get("seconds"),
            "train_seconds": round(sum(h["seconds"] for h in tr["history"]), 1),
            "train_last_epoch": tr["history"][-1], "validation": abl["validation"],
            "chosen_n": {k: v["chosen_n"] for k, v in abl["variants"].items()},
            "candidates": {k: len(v["ordered"]) for k, v in abl["variants"].items()},
            "curves": {k: v["curve"] for k, v in abl["variants"].items()},
            "dfr_tuned": {k: abl["dfr_tuned"][k] for k in ("curve", "chosen_n")} if "dfr_tuned" in abl else None,
            "units_scored_alone": abl.get("passes", {}).get("units_scored_alone"),
            "accuracy": acc, "bootstrap_ci95": ci, "describe_units_per_second": desc.get("units_per_second"),
            "final_layer_check": final, "final_layer": final_layer_summary(final), "flag_truth": truth}


def _final_aggregate(rows: list[dict | None]) -> dict | None:
    """Final-layer checks over seeds: ``named`` (mean and CI), ``units`` and the per-seed counts."""
    rows = [r for r in rows if r]
    if not rows:
        return None
    return {"named": mean_ci([r["named"] for r in rows]), "units": rows[0]["units"],
            "per_seed": [r["named"] for r in rows]}


def _finished(a) -> tuple[Path, dict, object]:
    """The results file of ``--results``, its contents and the study config, for a redo on finished jobs."""
    path = Path(a.results).with_suffix(".json")
    res = json.loads(path.read_text())
    use_sets(res.get("sets", SETS)[1:])
    return path, res, load_config(a.config, parse_overrides(a.set))


def redo_final_layer(a) -> int:
    """``--final-layer-only``: the final-layer checks again, on the finished jobs of ``--results``."""
    path, res, cfg = _finished(a)
    for s, row in res["per_seed"].items():
        trained = pipeline.train(seed_cfg(cfg, int(s)))  # finished: the seed's model, not trained again
        row["final_layer_check"] = final_layer_check(pipeline.with_probe(trained))
        row["final_layer"] = final_layer_summary(row["final_layer_check"])
    for ref in res["reference"]:
        out = Path(cfg.out) / "reference" / f"seed{ref['seed']}"
        ref["final_layer_check"] = clean_final_layer_check(cfg, out / "model.safetensors", out / "final-layer")
        ref["final_layer"] = final_layer_summary(ref["final_layer_check"])
    res["aggregate"]["final_layer"] = {
        "text": _final_aggregate([r.get("final_layer") for r in res["per_seed"].values()]),
        "clean": _final_aggregate([r.get("final_layer") for r in res["reference"]])}
    res["final_layer_command"] = command_line(a, "--final-layer-only")
    res["aggregate"]["paired_gap_closed"] = paired_gap_closed(res["per_seed"], res.get("reference") or [])
    res["verdict"] = verdict(res)
    io.write_json(path, res)
    io.write_text(path.with_suffix(".md"), markdown(res))
    return 0


def _membership(sets: dict) -> dict:
    """A flag-quality table's figures that follow from which units are flagged (not the ranking's AUC)."""
    return {name: {k: v for k, v in s.items() if k not in ("auc", "auc_units")} for name, s in sets.items()}


def redo_flag_truth(a) -> int:
    """``--flag-truth-only``: each seed's flag quality measured again on its finished job with the current evaluate
    code (:func:`neuroscribe.ablate.measure.flag_quality`, the evaluate stage's own: a planted cue's truth, or
    ``flag.group_cue``'s; it must give the stored per-layer figures of every flag set -- the same flags against the
    same truth), which adds the pooled-truth variant (planted cues) to results made before it existed and measures
    the description ranking's AUC with the current ranking rule (the verification response since 2026-12-06)."""
    from neuroscribe.ablate.measure import flag_quality
    from neuroscribe.ablate.stage import model_and_means
    from neuroscribe.datasets.sets import test_sets
    path, res, cfg = _finished(a)
    for s, row in res["per_seed"].items():
        trained = pipeline.train(seed_cfg(cfg, int(s)))  # finished: the seed's model, not trained again
        lm, dev, rec, _ = model_and_means(trained)
        q = flag_quality(trained, lm, dev, rec.layers, test_sets(trained, lm.preprocess, lm.class_names))
        if q is None or _membership(q["sets"]) != _membership(row["flag_truth"]["sets"]):
            raise SystemExit(f"seed {s}: the recomputed truth gives other flag figures than the results hold")
        row["flag_truth"] = q
    res["aggregate"]["flags"] = flag_aggregate(res["per_seed"], lambda t: t)  # the AUC as measured now
    if all(row["flag_truth"].get("pooled") for row in res["per_seed"].values()):
        res["aggregate"]["flags_pooled"] = flag_aggregate(res["per_seed"], lambda t: t["pooled"])
    res["flag_truth_command"] = command_line(a, "--flag-truth-only")
    res["verdict"] = verdict(res)
    io.write_json(path, res)
    io.write_text(path.with_suffix(".md"), markdown(res))
    return 0


def command_line(a, *mode: str) -> str:
    """The study's command as run: the config (relative to the repository when inside it), the overrides and the
    reference seeds, so a results file names what made it."""
    def path(option: str, value: str, default: Path) -> list[str]:  # named only when not the default
        p = Path(value).resolve()
        return [] if p == default.resolve() else [option, str(p.relative_to(ROOT) if p.is_relative_to(ROOT) else p)]
    cmd = ["python", "benchmarks/milan_study.py", *mode,
           *path("--config", a.config, ROOT / "configs" / "milan_study.yaml")]
    for x in a.set:
        cmd += ["--set", x]
    if a.reference_seeds != "0":
        cmd += ["--reference-seeds", a.reference_seeds]
    cmd += path("--results", a.results, ROOT / "benchmarks" / "results" / "milan_study")
    if getattr(a, "merge", None):
        cmd += path("--merge", a.merge, ROOT)
    return shlex.join(cmd)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "milan_study.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    ap.add_argument("--reference-seeds", default="0", help="comma-separated seeds of the clean-trained reference")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "milan_study"))
    ap.add_argument("--markdown-only", action="store_true", help="rewrite the .md from the existing .json")
    ap.add_argument("--final-layer-only", action="store_true",
                    help="redo the final-layer checks of the seeds and references in --results (their jobs must "
                         "exist; nothing is trained) with the current describer, and rewrite the .json and .md")
    ap.add_argument("--flag-truth-only", action="store_true",
                    help="measure the flag quality of the seeds in --results again on their jobs (the flagged units' "
                         "figures must not change; the ranking AUC is measured by the current rule; adds the pooled-"
                         "truth variant), and rewrite the .json and .md")
    ap.add_argument("--merge", metavar="OLD.json",
                    help="a finished study's results: its seeds that this run does not run, and (when this run runs "
                         "no reference) its references, join this run's figures -- to rerun only the seeds a change "
                         "can move; the JSON's merged_from names what came from where")
    a = ap.parse_args(argv)
    if a.final_layer_only:
        return redo_final_layer(a)
    if a.flag_truth_only:
        return redo_flag_truth(a)
    if a.markdown_only:
        res = json.loads(Path(a.results).with_suffix(".json").read_text())
        use_sets(res.get("sets", SETS)[1:])
        res["aggregate"]["paired_gap_closed"] = paired_gap_closed(res["per_seed"], res.get("reference") or [])
        res["verdict"] = verdict(res)
        io.write_json(Path(a.results).with_suffix(".json"), res)
        io.write_text(Path(a.results).with_suffix(".md"), markdown(res))
        return 0
    cfg = load_config(a.config, parse_overrides(a.set))
    pipeline.check_seed_checkpoint(cfg)  # the seeds run one by one below: refused here, before any of them
    use_sets([s.name for s in cfg.shifts if s.name != cfg.probe])
    if cfg.train.data.root is not None and not Path(cfg.train.data.root).is_dir():
        print(f"the study needs the Imagenette photos at {cfg.train.data.root}", file=sys.stderr)
        return 2
    per = {}
    for s in cfg.train.seeds:
        sub = seed_cfg(cfg, s)
        t0 = time.perf_counter()
        pipeline.run(sub)
        seconds = time.perf_counter() - t0
        trained = pipeline.train(sub)  # current: returns the seed's model without training again
        per[s] = collect(sub, seconds, final_layer_check(pipeline.with_probe(trained)),
                         flag_truth(trained))
        print(f"[study] seed {s} done in {seconds / 60:.1f} min", file=sys.stderr, flush=True)
    if len(cfg.train.seeds) > 1:  # the seeds' mean and CI into JOBDIR/seeds.{json,md} (every job is current)
        pipeline.run(cfg)
    refs = [reference(cfg, int(s)) for s in a.reference_seeds.split(",") if s.strip()]
    merged = None
    if a.merge:  # the earlier run's other seeds (and references) as it measured them
        old = json.loads(Path(a.merge).read_text())
        kept = {int(k): v for k, v in old["per_seed"].items() if int(k) not in per}
        merged = {"file": str(a.merge), "finished": old.get("finished"), "command": old.get("command"),
                  "seeds": sorted(kept), "references": [] if refs else [r["seed"] for r in old.get("reference", [])],
                  **{k: old[k] for k in ("merged_from", "flag_truth_command") if old.get(k)}}  # OLD's own provenance
        per = dict(sorted({**kept, **per}.items()))
        refs = refs or old.get("reference", [])
    acc = {v: {s: mean_ci([per[k]["accuracy"][v][s] for k in per]) for s in SETS} for v in VARIANTS
           if all(v in per[k]["accuracy"] for k in per)}
    if refs:
        acc["reference"] = {s: mean_ci([r["results"][s]["acc"] for r in refs]) for s in SETS}
    gain = {v: {s: mean_ci([per[k]["accuracy"][v][s] - per[k]["accuracy"]["base"][s] for k in per]) for s in SETS}
            for v in VARIANTS if v != "base" and v in acc}
    gap_closed, protocol = gap_closed_share(per, refs, [v for v in VARIANTS if v != "base" and v in acc])
    flags = flag_aggregate(per, lambda t: t)
    pooled = flag_aggregate(per, lambda t: t.get("pooled")) if all(
        per[k]["flag_truth"].get("pooled") for k in per) else None
    final_layer = {"text": _final_aggregate([per[k].get("final_layer") for k in per]),
                   "clean": _final_aggregate([r.get("final_layer") for r in refs])}
    first = per[cfg.train.seeds[0]]
    test_n = json.loads((Path(cfg.out) / f"seed{cfg.train.seeds[0]}" / "evaluation.json").read_text())
    probe_n = json.loads((Path(cfg.out) / f"seed{cfg.train.seeds[0]}" / "train.json").read_text())
    res = {"command": command_line(a),
           "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": f"{platform.machine()} ({cpu_name()}, torch CPU capability "
                      f"{torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} torch threads, "
                      f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}, "
                      f"torch {torch.__version__}",
           "config": {"resolution": cfg.train.resolution, "epochs": cfg.train.epochs, "fraction": cfg.train.fraction,
                      "n_train": probe_n["train_n"], "n_validation": first["validation"]["n"],
                      "n_probe": next(s for s in cfg.shifts if s.name == cfg.probe).data.limit,
                      "n_test": test_n["test_sets"]["in-distribution"]["n"], "seeds": list(per),
                      "job": cfg.model_dump(mode="json")},
           "sets": list(SETS), "truth_share": TRUTH_SHARE, "truth_images": first["flag_truth"]["n_images"],
           "aggregate": {"accuracy": acc, "gain": gain, "gap_closed": gap_closed, "flags": flags,
                         **({"flags_pooled": pooled} if pooled else {}), "final_layer": final_layer},
           "protocol": protocol, "reference": refs,
           **({"merged_from": merged} if merged else {}), "per_seed": per}
    res["aggregate"]["paired_gap_closed"] = paired_gap_closed(per, refs)
    res["verdict"] = verdict(res)
    out = Path(a.results)
    io.write_json(out.with_suffix(".json"), res)
    io.write_text(out.with_suffix(".md"), markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
