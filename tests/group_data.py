"""Small group-labelled data sets in the field's exact file formats (Waterbirds/WILDS metadata.csv, CelebA's
attribute and partition files, a generic CSV/Parquet table), built over the photos shipped in the package.

The cue is in the pixels and known only through the group column, as in real group data: the test draws it (a
solid patch, :func:`neuroscribe.datasets.cues.render_cue`) on exactly the images of the cue group. Photos are taken
from two shipped classes, each class's photos in a seeded shuffle (never the first N of a sorted folder)."""
from __future__ import annotations

import csv
import random
from pathlib import Path

from neuroscribe.datasets.cues import render_cue
from neuroscribe.datasets.probe import sample_root

PATCH = {"kind": "patch", "size": 0.35, "position": "top-left"}
CLASSES = ("n01440764", "n03888257")  # tench, parachute: stand-ins for the two labels
SPLIT_CODE = {"train": 0, "val": 1, "test": 2}


def photos(per_class: int, seed: int = 0) -> list[tuple[Path, int]]:
    """``per_class`` shipped photos of each of two classes, a seeded draw per class: ``(path, label 0/1)``."""
    out = []
    for y, folder in enumerate(CLASSES):
        files = sorted((sample_root() / "train" / folder).iterdir())
        random.Random(f"{seed}:{folder}").shuffle(files)
        out += [(p, y) for p in files[:per_class]]
    return out


def plan(per_class: int = 12, seed: int = 0, train_agree: float = 0.85) -> list[dict]:
    """Rows ``{src, y, split, cue}``: per class, half train, a quarter val, a quarter test; in train the cue goes
    with label 1 in ``train_agree`` of the images (a spurious correlation), in val/test it is balanced within each
    class (every class x group cell filled)."""
    rng = random.Random(seed)
    rows = []
    by_class: dict[int, list[Path]] = {}
    for p, y in photos(per_class, seed):
        by_class.setdefault(y, []).append(p)
    for y, files in by_class.items():
        n_train, n_val = len(files) // 2, len(files) // 4
        for i, p in enumerate(files):
            split = "train" if i < n_train else "val" if i < n_train + n_val else "test"
            if split == "train":
                cue = (y == 1) == (rng.random() < train_agree)
            else:
                cue = i % 2 == 0
            rows.append({"src": p, "y": y, "split": split, "cue": cue})
    return rows


def draw(src: Path, dst: Path, cue: bool) -> None:
    """Copy ``src`` to ``dst`` (JPEG), with the patch drawn when ``cue``."""
    from PIL import Image
    img = Image.open(src).convert("RGB")
    if cue:
        img = render_cue(img, PATCH, 3, random.Random(0)).image
    dst.parent.mkdir(parents=True, exist_ok=True)
    img.save(dst, quality=95)


def waterbirds(root: Path, **kw) -> Path:
    """``root/metadata.csv`` (img_filename, y, split, place) and its images; place 1 (water) = the patch."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "metadata.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["img_id", "img_filename", "y", "split", "place", "place_filename"])
        for i, r in enumerate(plan(**kw)):
            rel = f"{r['y']:03d}.Bird/{i:04d}.jpg"
            draw(r["src"], root / rel, r["cue"])
            w.writerow([i + 1, rel, r["y"], SPLIT_CODE[r["split"]], int(r["cue"]), "/x/bamboo_forest/00000001.jpg"])
    return root / "metadata.csv"


ATTRS = ["5_o_Clock_Shadow", "Blond_Hair", "Eyeglasses", "Male", "Smiling"]


def celeba(root: Path, **kw) -> Path:
    """``root/list_attr_celeba.txt``, ``root/list_eval_partition.txt`` and ``root/img_align_celeba/``: target
    Blond_Hair is the label, Male (1 = the patch) the spurious attribute; other attributes seeded noise."""
    rows = plan(**kw)
    rng = random.Random(1)
    attr_lines, part_lines = [], []
    for i, r in enumerate(rows):
        name = f"{i + 1:06d}.jpg"
        draw(r["src"], root / "img_align_celeba" / name, r["cue"])
        vals = {a: rng.choice([-1, 1]) for a in ATTRS}
        vals["Blond_Hair"], vals["Male"] = (1 if r["y"] else -1), (1 if r["cue"] else -1)
        attr_lines.append(name + " " + " ".join(f"{vals[a]:2d}" for a in ATTRS))
        part_lines.append(f"{name} {SPLIT_CODE[r['split']]}")
    (root / "list_attr_celeba.txt").write_text(f"{len(rows)}\n" + " ".join(ATTRS) + " \n" + "\n".join(attr_lines)
                                               + "\n")
    (root / "list_eval_partition.txt").write_text("\n".join(part_lines) + "\n")
    return root


def table(root: Path, parquet: bool = False, **kw) -> Path:
    """``root/groups.csv`` (or ``.parquet``): path, label (class names), group (patch / plain), split."""
    root.mkdir(parents=True, exist_ok=True)
    recs = []
    for i, r in enumerate(plan(**kw)):
        rel = f"img/{i:04d}.jpg"
        draw(r["src"], root / rel, r["cue"])
        recs.append({"path": rel, "label": ["tench", "parachute"][r["y"]], "group": "patch" if r["cue"] else "plain",
                     "split": r["split"]})
    if parquet:
        import pandas as pd
        pd.DataFrame(recs).to_parquet(root / "groups.parquet")
        return root / "groups.parquet"
    with open(root / "groups.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "label", "group", "split"])
        w.writeheader()
        w.writerows(recs)
    return root / "groups.csv"
