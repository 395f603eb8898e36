"""Command line: ``neuroscribe <command> [JOB.yaml] [--flags] [--set FIELD=VALUE ...]``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .config import ConfigError, load_config, parse_overrides

# flag -> config field; every other field is reachable with --set
_FLAGS = {
    "model": ("model.spec", str, "model spec (neuroscribe models)"),
    "data": ("data.root", str, "image folder or CSV/JSONL manifest"),
    "split": ("data.split", str, "split under --data (train/val/test/holdout; a group format's own split)"),
    "layers": ("layers", str, "comma-separated layer names (neuroscribe layers SPEC)"),
    "limit": ("data.limit", int, "seeded random subset of this many images"),
    "out": ("out", str, "job directory"),
    "device": ("device", str, "auto | cpu | cuda[:N]"),
    "batch_size": ("batch_size", int, "images per batch"),
    "workers": ("workers", int, "data-loading processes"),
    "k": ("record.k", int, "exemplars per unit"),
    "quantile": ("record.quantile", float, "mask quantile"),
    "seed": ("seed", int, "random seed"),
    "backend": ("describe.backend", str, "describe backend: tagger | captioner | clip"),
}


def _job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", nargs="?", help="YAML job file (optional: flags alone make a job)")
    for flag, (_, typ, help_) in _FLAGS.items():
        if flag == "backend":
            continue
        p.add_argument("--" + flag.replace("_", "-"), dest=flag, type=typ, help=help_)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="set any config field, e.g. --set record.checkpoint_every=10 (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log progress")


def job_config(a: argparse.Namespace):
    over = parse_overrides(a.set)
    for flag, (field, _, _) in _FLAGS.items():
        v = getattr(a, flag, None)
        if v is not None:
            node = over
            *parents, leaf = field.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = v
    if getattr(a, "quiet", False):
        over["progress"] = False
    cfg = load_config(a.job, over)
    from .runtime import apply
    apply(cfg.threads, cfg.progress)
    return cfg


def cmd_models(a):
    from .models import list_models
    for n in list_models(a.pattern):
        print(n)


def cmd_layers(a):
    import torch
    from .hooks import layer_catalogue
    from .models import load_model
    lm = load_model(a.spec, allow_pickle=False)
    rows = layer_catalogue(lm.module, lm.preprocess.crop, torch.device("cpu"))
    if a.kind:
        rows = [r for r in rows if r.kind == a.kind]
    import fnmatch
    rows = [r for r in rows if fnmatch.fnmatch(r.name, a.filter)]
    w = max([len(r.name) for r in rows] + [5])
    print(f"{'layer':<{w}}  {'type':<22} {'kind':<6} {'layout':<6} {'units':>6}  output shape")
    for r in rows:
        note = f"  (called {r.calls}x: the last call is recorded)" if r.calls > 1 else ""
        if r.layout == "?":
            note += ("  (channels-first or -last? record finds out with a second blank pass; a model bound to one "
                     "input size needs it declared in `layouts:`)")
        print(f"{r.name:<{w}}  {r.type:<22} {r.kind:<6} {r.layout or '-':<6} {r.units:>6}  {list(r.shape)}{note}")
    print(f"# {lm.spec}: {len(rows)} layers; preprocessing {lm.preprocess.to_dict()}")


def cmd_config_show(a):
    print(job_config(a).dump(), end="")


def cmd_record(a):
    from .record.recorder import record
    out = record(_stage_cfg(job_config(a)))
    from .distributed import is_main_process
    if not is_main_process():  # under torchrun only rank 0 reports (its job directory holds the artifacts)
        return
    import json
    meta = json.loads((out / "meta.json").read_text())
    run = json.loads((out / "run.json").read_text())
    units = sum(v["units"] for v in meta["layers"].values())
    print(f"recorded {units} units in {len(meta['layers'])} layers on {meta['n_images']} images "
          f"({meta['n_skipped']} skipped) in {run['seconds']:.1f}s -> {out}")


def cmd_describe(a):
    from .describe.stage import describe
    cfg = _stage_cfg(job_config(a))
    out = describe(cfg)
    if out is None:  # a non-zero torchrun rank: rank 0 reports
        return
    import json
    summary = json.loads((Path(cfg.out) / "describe.json").read_text())
    print(f"described {summary['units']} units with the {summary['backend']} backend -> {out}")
    if "final_layer_check" in summary:
        f = summary["final_layer_check"]
        print(f"final-layer check ({f['layer']}): {f['accuracy']:.0%} of {f['classes']} class units name their class")
    if cfg.describe.gallery:
        print(f"gallery: {Path(cfg.out) / 'gallery' / 'index.html'}")


def _stage_cfg(cfg):
    """Continue a job whose model was trained by `neuroscribe train`: use its checkpoint."""
    tj = Path(cfg.out) / "train.json"
    if cfg.train is not None and tj.is_file():
        import json
        ck = json.loads(tj.read_text())["checkpoint"]
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"spec": f"checkpoint:{ck}"})})
    return cfg


_WROTE = {"flag": "flags.json", "ablate": "ablation.json", "evaluate": "evaluation.json"}  # what each stage writes


def _stage(name):
    def cmd(a):
        from . import pipeline
        cfg = job_config(a)
        if name in ("flag", "ablate", "evaluate", "report"):
            cfg = _stage_cfg(cfg)
        out = getattr(pipeline, name)(cfg)
        if name == "train":
            print(f"trained {cfg.train.arch} -> {out.model.spec}")
        elif name in ("report", "run"):
            print(f"report: {out.get('html')}\n{Path(out['md']).read_text()}")
        else:
            print(f"{name}: wrote {Path(cfg.out) / _WROTE[name]}")
    return cmd


def cmd_export_edited(a):
    from . import pipeline
    cfg = _stage_cfg(job_config(a))
    print(pipeline.export_edited(cfg, a.path, a.variant))


def cmd_demo(a):
    from .demo import demo
    demo(a.out, quiet=a.quiet)


def cmd_export_milan(a):
    from .record.exemplars import Recording
    rec = Recording.open(a.jobdir)
    layers = [s for s in a.layers.split(",") if s] if a.layers else None
    print(rec.export_milan(a.out, layers))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="neuroscribe", description=__doc__)
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("models", help="list model specs")
    p.add_argument("pattern", nargs="?", default="*")
    p.set_defaults(fn=cmd_models)
    p = sub.add_parser("layers", help="list a model's layers with unit counts and output shapes")
    p.add_argument("spec")
    p.add_argument("--kind", choices=["conv", "tokens", "flat"])
    p.add_argument("--filter", default="*", help="shell pattern on layer names")
    p.set_defaults(fn=cmd_layers)
    p = sub.add_parser("config", help="configuration tools")
    csub = p.add_subparsers(dest="sub", required=True)
    c = csub.add_parser("show", help="print the resolved config, defaults filled in")
    _job_args(c)
    c.set_defaults(fn=cmd_config_show)
    p = sub.add_parser("record", help="record top-k exemplars for every unit of the listed layers")
    _job_args(p)
    p.set_defaults(fn=cmd_record)
    p = sub.add_parser("describe", help="describe every recorded unit in words (exports + gallery)")
    _job_args(p)
    p.add_argument("--backend", dest="backend", choices=["tagger", "captioner", "clip"])
    p.set_defaults(fn=cmd_describe)
    for name, help_ in (("train", "train a classifier on data with a planted cue (train: section)"),
                        ("flag", "flag units whose descriptions tie them to a cue"),
                        ("ablate", "order flagged units, choose N on validation, draw the controls"),
                        ("evaluate", "accuracy with CIs on in-distribution and shifted test sets"),
                        ("report", "write report.html/.md/.json and curve.png"),
                        ("run", "every stage in order, skipping current ones")):
        p = sub.add_parser(name, help=help_)
        _job_args(p)
        p.set_defaults(fn=_stage(name))
    p = sub.add_parser("export-edited", help="bake the chosen ablation into the weights (safetensors + spec)")
    _job_args(p)
    p.add_argument("--path", required=True, help="output .safetensors file")
    p.add_argument("--variant", default="description", choices=["description", "evidence", "both", "group"])
    p.set_defaults(fn=cmd_export_edited)
    p = sub.add_parser("demo", help="the whole mission offline on the shipped photos (a few minutes on CPU)")
    p.add_argument("--out", default="jobs/demo")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser("export-milan", help="write a recording in MILAN's exemplar layout")
    p.add_argument("jobdir")
    p.add_argument("--out", required=True)
    p.add_argument("--layers")
    p.set_defaults(fn=cmd_export_milan)
    for register in _EXTRA_COMMANDS:
        register(sub, _job_args)
    return ap


_EXTRA_COMMANDS: list = []  # later stages add their sub-commands here


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from .models import ModelSpecError
    from .hooks import UnknownLayerError
    from .datasets.probe import ProbeSetError
    try:
        a.fn(a)
    except (ConfigError, ModelSpecError, UnknownLayerError, ProbeSetError, FileNotFoundError,
            IndexError, KeyError, ValueError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"neuroscribe {a.command}: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
