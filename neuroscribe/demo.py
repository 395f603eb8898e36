"""``neuroscribe demo``: the whole mission offline on the photos shipped in the package.

Takes the shipped text-shortcut model (``resnet18-imagenette-text``: ResNet-18 trained on Imagenette with the
true class name written on half the photos, made by ``tools/make_demo_model.py``), records its units on 400 shipped
training photos (the name on half), describes them with the offline tagger, flags text units, ablates them (N
chosen on 200 shipped photos the model held out before training, a wrong class name on half), evaluates against
random and sort-all controls on 300 shipped test photos (Imagenette val), clean and with wrong class names,
and writes the report.
The job is ``neuroscribe/data/demo.yaml`` (also ``configs/demo.yaml``).
"""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

from .config import load_config


def demo_config_path() -> Path:
    return Path(str(resources.files("neuroscribe") / "data" / "demo.yaml"))


def demo(out: str | Path = "jobs/demo", quiet: bool = False) -> dict:
    from .pipeline import run
    cfg = load_config(demo_config_path(), {"out": str(out), "progress": not quiet})
    t0 = time.perf_counter()
    paths = run(cfg)
    md = Path(paths["md"]).read_text()
    rep = json.loads(Path(paths["json"]).read_text())
    print(md.split("\n## ")[0] if "\n## " in md else md)
    print(f"\nneuroscribe demo finished in {time.perf_counter() - t0:.0f}s")
    print(f"report:       {Path(paths['html']).resolve()}")
    print(f"descriptions: {(Path(out) / 'descriptions.csv').resolve()}")
    print(f"gallery:      {(Path(out) / 'gallery' / 'index.html').resolve()}")
    return rep
