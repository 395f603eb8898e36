"""Build the photo sample shipped inside the package (neuroscribe/data/sample).

Source: Imagenette ("imagenette2", fast.ai), real ImageNet photographs of 10 classes, as laid out in
../shared/data/imagenette (224 px). ImageNet terms of use apply (non-commercial research). This script takes a
seeded random choice of N_TRAIN images per class from train/ and N_VAL from val/ (seed 0), then N_TEST more per
class from the rest of val/ (seed 1, so that train/ and val/ stay as they were), shrinks them to SIZE px (shorter
side) and saves them as JPEG quality 85, so the package stays small (~6 MB; holdout/ adds 1.5). ``test/`` is the
demo's test set; ``val/`` is what the tests and the quick-start read.
Run ``tools/make_demo_model.py`` afterwards: it adds ``holdout/``, the photos the demo's model never trained on.

    python tools/make_sample.py [--src ../shared/data/imagenette] [--size 128] [--test 30]
"""
import argparse
import json
import random
import shutil
from pathlib import Path

from PIL import Image

CLASSES = {"n01440764": "tench", "n02102040": "English springer", "n02979186": "cassette player",
           "n03000684": "chain saw", "n03028079": "church", "n03394916": "French horn",
           "n03417042": "garbage truck", "n03425413": "gas pump", "n03445777": "golf ball",
           "n03888257": "parachute"}


def shrink(src: Path, dst: Path, size: int = 128) -> None:
    """``src`` shrunk to ``size`` px on its shorter side (bicubic), saved as JPEG quality 85 at ``dst``."""
    im = Image.open(src).convert("RGB")
    s = size / min(im.size)
    im.resize((round(im.width * s), round(im.height * s)), Image.BICUBIC).save(dst, quality=85)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", default=str(Path(__file__).resolve().parents[2] / "shared/data/imagenette"))
    ap.add_argument("--dst", default=str(Path(__file__).resolve().parents[1] / "neuroscribe/data/sample"))
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--train", type=int, default=40)
    ap.add_argument("--val", type=int, default=10)
    ap.add_argument("--test", type=int, default=30)
    a = ap.parse_args()
    src, dst = Path(a.src), Path(a.dst)
    for split in ("train", "val", "test"):  # holdout/ is make_demo_model.py's (run it afterwards)
        shutil.rmtree(dst / split, ignore_errors=True)
    rng = random.Random(0)
    taken: set[str] = set()
    for split, n in (("train", a.train), ("val", a.val)):
        for wnid in sorted(CLASSES):
            files = sorted((src / split / wnid).glob("*.JPEG"))
            out = dst / split / wnid
            out.mkdir(parents=True)
            for f in sorted(rng.sample(files, n)):
                shrink(f, out / (f.stem + ".jpg"), a.size)
                taken.add(f.stem)
    rng = random.Random(1)
    for wnid in sorted(CLASSES):  # the demo's test photos: Imagenette val, none of them in val/
        files = [f for f in sorted((src / "val" / wnid).glob("*.JPEG")) if f.stem not in taken]
        out = dst / "test" / wnid
        out.mkdir(parents=True)
        for f in sorted(rng.sample(files, a.test)):
            shrink(f, out / (f.stem + ".jpg"), a.size)
    (dst / "classes.json").write_text(json.dumps(CLASSES, indent=1) + "\n")
    (dst / "README.md").write_text(
        "# Photo sample (real ImageNet photographs)\n\n"
        f"{a.train} train + {a.val} val images per class of the 10 Imagenette classes (fast.ai's 'imagenette2', "
        f"a subset of ImageNet), chosen with seed 0, and {a.test} test images per class (more of Imagenette's val "
        "split, none of them in val/, seed 1: the demo's test set), shrunk to "
        f"{a.size} px on the shorter side by `tools/make_sample.py`. ImageNet terms of use apply "
        "(non-commercial research). `classes.json` maps each WordNet id folder to its class name; sorted "
        "folder order is the class index. `holdout/` (20 per class, written by `tools/make_demo_model.py`): "
        "training photos that the demo's model held out before training; the demo chooses N on them.\n")


if __name__ == "__main__":
    main()
