"""The job as a whole: every stage in pipeline order, each a function from (job config, artifacts in the job
directory) to artifacts out, skipping stages whose artifacts are current (each JSON carries the key of its inputs):

``train`` (:mod:`neuroscribe.train.stage`) -> ``train/seed<S>/``, ``train.json`` ·
``with_probe`` -> ``probe/NAME/`` (a cued probe set written once) ·
``record`` (:mod:`neuroscribe.record`) -> ``record/<key>/`` ·
``describe`` (:mod:`neuroscribe.describe.stage`) -> ``descriptions.*``, ``gallery/`` ·
``flag`` / ``ablate`` (:mod:`neuroscribe.ablate.stage`) -> ``flags.json`` / ``ablation.json`` ·
``evaluate`` (:mod:`neuroscribe.ablate.measure`) -> ``evaluation.json`` ·
``report`` (:mod:`neuroscribe.report.stage`) -> ``report.{json,md,html}``, ``curve.png``.
The test sets are read only by ``evaluate``: nothing is chosen on them.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from . import io
from .ablate.measure import evaluate, export_edited
from .ablate.stage import ablate, flag
from .config import JobConfig
from .datasets.sets import held_out, shift_set, test_sets, validation_set
from .describe.stage import describe
from .record import record
from .report.stage import report
from .runtime import job_model
from .train.stage import train

__all__ = ["STAGES", "ablate", "aggregate_seeds", "describe", "evaluate", "export_edited", "flag", "record", "report",
           "run", "shift_set", "stage_clock", "test_sets", "train", "validation_set", "with_probe"]


def with_probe(cfg: JobConfig) -> JobConfig:
    """``cfg`` whose ``data`` is the probe set: ``probe`` (a shift) planted once in JOBDIR/probe/NAME; else ``cfg``.

    No image is written: the probe is its source photos, each with its seeded cue decisions, and a
    :class:`~neuroscribe.datasets.planted.Planting` that redraws them (:mod:`neuroscribe.datasets.planted`): the
    model's field of view (its resize + centre crop box, with the job's ``preprocess`` overrides) cut from the
    source photo at the view size (:func:`~neuroscribe.datasets.geometry.view_size`), with the cue drawn there, at
    that resolution. The returned ``preprocess`` resizes those square pictures to the model's crop (same
    interpolation, nothing more cropped), so the model sees the downsampled drawing and the describer's views, OCR
    and gallery the crisp one. ``probe.json`` records the view size and the model's own preprocessing."""
    if not cfg.probe:
        return cfg
    from .config import DataConfig
    from .datasets.geometry import view_size
    from .datasets.planted import Planting, write_planted
    out = Path(cfg.out) / "probe" / cfg.probe
    shift = next(s for s in cfg.shifts if s.name == cfg.probe)
    lm, _ = job_model(cfg)
    pre = lm.preprocess  # with the job's overrides
    side = view_size(pre.crop, cfg.describe.view_size)
    key = io.artifact_key(shift.model_dump(mode="json"), cfg.model.spec, io.file_key(Path(cfg.out) / "train.json"),
                          pre.to_dict(), side)
    if not io.current(out / "probe.json", key):  # a folder of image copies (before 2026-12-02) is read as it is
        ds, names, _ = shift_set(shift, pre, cfg.seed, lm.class_names, held_out(cfg.out))
        write_planted(ds, out, Planting(getattr(ds, "cue", None), tuple(names), pre, side))  # Labelled: no cue
        io.write_json(out / "probe.json", {"key": key, "view_size": side, "model_preprocess": pre.to_dict()})
    down = cfg.preprocess.model_copy(update={"resize": pre.crop, "crop": pre.crop})  # view size -> model's crop
    return cfg.model_copy(update={"data": DataConfig(root=out / "manifest.csv"), "preprocess": down})


def run(cfg: JobConfig) -> dict:
    """Every stage in order; each skips work whose artifacts are current. With several ``train.seeds``, one
    complete job per seed in ``JOBDIR/seed<S>/`` and ``JOBDIR/seeds.{json,md}``: mean and 95% CI over seeds.
    Every test set's labels are checked against the model's classes first, before any work."""
    from .datasets.labels import check_job_labels
    from .runtime import apply
    apply(cfg.threads, cfg.progress)
    check_job_labels(cfg)
    from .datasets.sets import check_disjoint
    check_disjoint(cfg)  # nothing is chosen on a test image
    check_seed_checkpoint(cfg)
    if cfg.train is not None and len(cfg.train.seeds) > 1:
        reports = {}
        for s in cfg.train.seeds:
            sub = cfg.model_copy(update={"out": Path(cfg.out) / f"seed{s}",
                                         "train": cfg.train.model_copy(update={"seeds": [s]})})
            reports[s] = json.loads(Path(_run_one(sub)["json"]).read_text())
        return aggregate_seeds(reports, Path(cfg.out))
    return _run_one(cfg)


def check_seed_checkpoint(cfg: JobConfig) -> None:
    """Refuse a ``train.checkpoint`` without ``{seed}`` for several seeds (each copy would overwrite the last);
    called before any work by :func:`run` and by whatever runs the seeds one by one (the study script)."""
    if cfg.train is not None and len(cfg.train.seeds) > 1 and cfg.train.checkpoint \
            and "{seed}" not in str(cfg.train.checkpoint):
        raise ValueError(f"train.checkpoint {str(cfg.train.checkpoint)!r} is one file for seeds {cfg.train.seeds}: "
                         "each seed's copy would overwrite the last. Put {seed} in its name")


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
        cells = [(f"{100 * sets[c]['mean']:.1f}% ± {100 * sets[c]['ci95_half']:.1f}"
                  if sets[c]["ci95_half"] is not None else f"{100 * sets[c]['mean']:.1f}%") if c in sets else ""
                 for c in cols]
        lines.append(f"| {vname} | " + " | ".join(cells) + " |")
    md = (f"# Accuracy over {len(reports)} training seeds (mean ± 95% CI half-width, t-distribution)\n\n"
          + "\n".join(lines) + "\n")
    io.write_json(out / "seeds.json", {"seeds": list(reports), "results": agg})
    io.write_text(out / "seeds.md", md)
    return {"json": str(out / "seeds.json"), "md": str(out / "seeds.md"), "html": None}


#: the stages of a run in pipeline order, as ``runs.jsonl`` names them
STAGES = ("train", "probe", "record", "describe", "flag", "ablate", "evaluate", "report")


def _run_one(cfg: JobConfig) -> dict:
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    io.write_text(Path(cfg.out) / "config.yaml", cfg.dump())  # the job as run: any stage can rerun from it
    with stage_clock(Path(cfg.out)) as timed:
        cfg = timed("train", train, cfg)
        probe_cfg = timed("probe", with_probe, cfg)
        timed("record", record, probe_cfg)
        timed("describe", describe, probe_cfg)
        timed("flag", flag, cfg)
        timed("ablate", ablate, cfg)
        timed("evaluate", evaluate, cfg)
        return timed("report", report, cfg)


@contextlib.contextmanager
def stage_clock(out: Path):
    """A timer for the stages of one run: ``timed(name, stage, *args)`` runs the stage and notes its wall seconds.
    On exit one row is appended to ``JOBDIR/runs.jsonl`` (:func:`~neuroscribe.io.append_line`: rewritten atomically
    under a lock on the job folder, so runs that end at once keep every row; by the main process only): when the
    run started, the machine, torch's threads, each stage's seconds, the total and ``status``: ``complete``, ``failed
    in STAGE`` (an error), ``interrupted in STAGE`` (Ctrl-C, SystemExit), or ``failed`` / ``interrupted`` outside any
    stage. A process killed outright writes no row. A log that cannot be written is reported, never allowed to fail
    the run or hide its error. A stage whose artifacts were current shows the seconds it took to find that out, so
    the first row of a job is its time from scratch and later rows show what each rerun redid."""
    import sys
    import torch
    from .distributed import is_main_process
    from .runtime import cpu_name
    row: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": cpu_name(),
                 "threads": torch.get_num_threads(), "seconds": {}}
    t0 = time.perf_counter()

    def status(e: BaseException, where: str = "") -> str:
        return ("failed" if isinstance(e, Exception) else "interrupted") + (f" in {where}" if where else "")

    def timed(name: str, stage, *args):
        t = time.perf_counter()
        try:
            return stage(*args)
        except BaseException as e:
            row["status"] = status(e, name)
            raise
        finally:
            row["seconds"][name] = round(time.perf_counter() - t, 2)
    try:
        yield timed
        row["status"] = "complete"
    except BaseException as e:
        row.setdefault("status", status(e))
        raise
    finally:
        row["total"] = round(time.perf_counter() - t0, 2)
        if is_main_process():
            path = out / "runs.jsonl"
            try:
                io.append_line(path, json.dumps(row))
            except (OSError, UnicodeDecodeError) as e:
                print(f"neuroscribe: the run log {path} could not be written ({e}); the run itself is unaffected",
                      file=sys.stderr)
