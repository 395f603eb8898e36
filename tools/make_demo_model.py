"""Build the demo's model and its held-out photos, shipped inside the package.

The demo (``neuroscribe demo``) describes, flags and ablates a model that has learned MILAN's text shortcut. A
ResNet-18 trained from scratch on the 400 shipped photos alone stays near chance on clean photos (the README's demo
section), so the demo uses the study's spurious model instead, trained by neuroscribe's own ``train`` stage:

1. ``configs/milan_study.yaml`` with training seed 0 (the first seed of every config; it is the study's seed 0):
   ResNet-18 from scratch on the 9,469 Imagenette training photos at 64 px, the TRUE class name written on half of
   them, 6% held out per class (568 photos, seeded by ``train.data_seed``) before training;
2. its weights are written in float16 (22 MB instead of 45; the model runs in float32 after loading) to
   ``neuroscribe/data/models/resnet18-imagenette-text.safetensors`` with a ``.spec.json`` sidecar (architecture,
   classes, preprocessing, the training recipe; local paths replaced by the config's), the model spec
   ``resnet18-imagenette-text``;
3. 20 photos per class of the 568 held out, none of them in the shipped ``train/`` folder, are shrunk to 128 px
   (as ``tools/make_sample.py`` does) into ``neuroscribe/data/sample/holdout/``: the demo chooses N on them. The
   model never trained on them, and they are disjoint from the probe (``sample/train``) and the test photos
   (``sample/test`` and ``sample/val``, Imagenette's val split).

    python tools/make_demo_model.py [--job jobs/demo-model] [--config configs/milan_study.yaml] [--set KEY=VALUE]

The shipped model was built with the study's holdout of 6 %; the study config holds out 20 % since 2026-12-05, so
rebuilding that model means ``--set train.holdout=0.06`` (the tests check the shipped spec's 568 held-out photos).

Step 1 is ``neuroscribe train`` (it resumes an interrupted run and reuses a finished one in ``--job``); about 20 to
30 minutes on 2 CPU cores. Run ``tools/make_sample.py`` first (it rewrites the sample folder).
"""
import argparse
import hashlib
import json
import os
import random
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]
NAME = "resnet18-imagenette-text"
PER_CLASS = 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "milan_study.yaml"))
    ap.add_argument("--job", default=str(ROOT / "jobs" / "demo-model"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--dst", default=str(ROOT / "neuroscribe" / "data"))
    a = ap.parse_args()
    import torch
    from safetensors.torch import load_file, save_file

    from make_sample import shrink
    from neuroscribe.config import load_config, parse_overrides
    from neuroscribe.train.stage import train
    cfg = load_config(a.config, {**parse_overrides(a.set), "out": a.job})
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seeds": [0]})})
    cfg = train(cfg)  # reuses a finished run of the same recipe in --job
    ckpt = Path(cfg.model.spec.split(":", 1)[1])
    dst = Path(a.dst)
    (dst / "models").mkdir(parents=True, exist_ok=True)
    state = {k: v.half() if v.is_floating_point() else v for k, v in load_file(str(ckpt)).items()}
    out = dst / "models" / f"{NAME}.safetensors"
    save_file(state, str(out), metadata={"arch": "torchvision:resnet18@none", "dtype": "float16"})
    spec = json.loads(Path(str(ckpt) + ".spec.json").read_text())
    data_root = Path(cfg.train.data.root).resolve()  # written relative to the repository, not this machine
    spec = json.loads(json.dumps(spec).replace(str(data_root), os.path.relpath(data_root, ROOT)))
    spec.update({"name": NAME, "dtype": "float16 on disk (float32 after loading)",
                 "made_by": "tools/make_demo_model.py", "config": os.path.relpath(Path(a.config).resolve(), ROOT),
                 "sha256": hashlib.sha256(out.read_bytes()).hexdigest(),  # of the shipped file (tests check it)
                 "sha256_float32": hashlib.sha256(ckpt.read_bytes()).hexdigest()})
    split = json.loads((ckpt.parent / "split.json").read_text())
    spec["holdout_sources"] = split["holdout_sources"]  # the photos it never trained on (tests check the sample)
    Path(str(out) + ".spec.json").write_text(json.dumps(spec, indent=1) + "\n")
    # the held-out photos the demo chooses N on
    src = Path(split["data_root"])
    sample = dst / "sample"
    shipped = {p.stem for p in (sample / "train").rglob("*.jpg")}
    by_class: dict[str, list[str]] = {}
    for rel in split["holdout_sources"]:
        if Path(rel).stem not in shipped:
            by_class.setdefault(Path(rel).parent.name, []).append(rel)
    hold = sample / "holdout"
    if hold.exists():
        shutil.rmtree(hold)
    rng = random.Random(0)
    for wnid in sorted(by_class):
        (hold / wnid).mkdir(parents=True)
        for rel in sorted(rng.sample(sorted(by_class[wnid]), PER_CLASS)):
            shrink(src / rel, hold / wnid / (Path(rel).stem + ".jpg"))
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB) and {hold} "
          f"({sum(1 for _ in hold.rglob('*.jpg'))} photos); torch {torch.__version__}")


if __name__ == "__main__":
    main()
