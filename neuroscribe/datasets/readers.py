"""Readers for the field's group-labelled formats, named by ``data.format``: the cue is already in the pixels and
known only through a group label (nothing is drawn by the tool).

* ``waterbirds``: Waterbirds / WILDS ``metadata.csv`` (columns ``img_filename, y, split, place``; ``y`` 0 = landbird,
  1 = waterbird; ``place`` 0 = land, 1 = water; ``split`` 0/1/2 = train/val/test). ``root`` is the file or the
  folder holding it; image paths are relative to its folder.
* ``celeba``: CelebA's ``list_attr_celeba.txt`` (line 1 the image count, line 2 the 40 attribute names, then one
  row per image of -1/1 values) and ``list_eval_partition.txt`` (``image partition``, 0/1/2 = train/val/test) in
  ``root``; images in ``root/img_align_celeba/`` (else ``root``). ``data.target`` is the attribute that is the
  label (classes ``not T``, ``T``), ``data.spurious`` the attribute that is the group.
* ``table``: a generic CSV or Parquet file with columns ``path`` (relative to the file's folder), ``label`` (class
  names or indices, read as a manifest's, :mod:`neuroscribe.datasets.labels`), ``group`` and, to select a
  ``data.split``, ``split``.

Every image's group is ``CLASS/VALUE``: its class and the value of the spurious attribute (``landbird/water``,
``Blond_Hair/Male``, ``cat/indoor``), so per-group accuracy is over the class x attribute cells (Waterbirds' four
groups) and :func:`group_value` gives the attribute back. ``data.split`` selects the data's own split
(``train``/``val``/``test``). Paths that leave the file's folder are refused, as in manifests.
"""

from __future__ import annotations

import csv
import difflib
from pathlib import Path

from .probe import ProbeSet, ProbeSetError, Sample

__all__ = ["FORMATS", "SPLITS", "group_value", "read_celeba", "read_table", "read_waterbirds"]

FORMATS = ("waterbirds", "celeba", "table")
SPLITS = ("train", "val", "test")  # the codes 0, 1, 2 of Waterbirds' split column and CelebA's partition file
WATERBIRDS_CLASSES = ("landbird", "waterbird")
WATERBIRDS_PLACES = ("land", "water")


def group_value(group: str) -> str:
    """The spurious attribute's value of a ``CLASS/VALUE`` group (the whole name when it has no ``/``)."""
    return str(group).rsplit("/", 1)[-1]


def _check_split(path: Path, split: str | None, have: set[str]) -> None:
    if split is not None and split not in have:
        raise ProbeSetError(f"{path}: no images in split {split!r}; the data's splits are {sorted(have)} "
                            "(set data.split to one of them, or null for all)")


def _inside(path: Path, root: Path, rel: str, where: str) -> Path:
    p = (root / rel).resolve()
    if not p.is_relative_to(root):
        raise ProbeSetError(f"{path}: {where}: path {rel!r} escapes the folder {root}; paths must stay under the "
                            "file's own folder")
    return p


def _code(path: Path, where: str, column: str, value, allowed: int) -> int:
    s = str(value).strip()
    if not s.lstrip("-").isdigit() or not 0 <= int(s) < allowed:
        raise ProbeSetError(f"{path}: {where}: column {column!r} is {value!r}; it must be one of "
                            f"{list(range(allowed))}")
    return int(s)


def read_waterbirds(root: str | Path, split: str | None = None) -> ProbeSet:
    """Waterbirds / WILDS ``metadata.csv`` (the file, or a folder holding it)."""
    path = Path(root)
    path = path / "metadata.csv" if path.is_dir() else path
    if not path.is_file():
        raise ProbeSetError(f"Waterbirds metadata not found: {path} (data.format waterbirds reads metadata.csv "
                            "with columns img_filename, y, split, place)")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("img_filename", "y", "split", "place") if c not in (reader.fieldnames or [])]
        if missing:
            raise ProbeSetError(f"{path}: Waterbirds metadata needs columns img_filename, y, split, place; missing "
                                f"{missing} (it has {reader.fieldnames})")
        rows = list(enumerate(reader, 2))
    base = path.parent.resolve()
    samples, have = [], set()
    for n, r in rows:
        where = f"row {n}"
        y = _code(path, where, "y", r["y"], 2)
        place = _code(path, where, "place", r["place"], 2)
        sp = SPLITS[_code(path, where, "split", r["split"], 3)]
        have.add(sp)
        if split is None or sp == split:
            p = _inside(path, base, r["img_filename"], where)
            samples.append(Sample(p, y, f"{WATERBIRDS_CLASSES[y]}/{WATERBIRDS_PLACES[place]}"))
    _check_split(path, split, have)
    if not samples:
        raise ProbeSetError(f"{path} lists no images")
    return ProbeSet(base, samples, list(WATERBIRDS_CLASSES), "waterbirds")


def _attribute(path: Path, names: list[str], name: str | None, field: str) -> int:
    if not name:
        raise ProbeSetError(f"data.format celeba needs data.{field}: one of the attributes in {path} ({names[:8]} "
                            "...)")
    if name not in names:
        near = difflib.get_close_matches(name, names, n=3, cutoff=0.4)
        raise ProbeSetError(f"data.{field} {name!r} is not an attribute of {path}; nearest: {near}; all: {names}")
    return names.index(name)


def read_celeba(root: str | Path, split: str | None = None, target: str | None = None,
                spurious: str | None = None) -> ProbeSet:
    """CelebA: ``list_attr_celeba.txt`` + ``list_eval_partition.txt`` in ``root``; label ``target``, group
    ``spurious`` (attribute names)."""
    root = Path(root)
    attrs, parts = root / "list_attr_celeba.txt", root / "list_eval_partition.txt"
    for f in (attrs, parts):
        if not f.is_file():
            raise ProbeSetError(f"CelebA file not found: {f} (data.format celeba reads list_attr_celeba.txt and "
                                f"list_eval_partition.txt in data.root)")
    lines = [l.split() for l in attrs.read_text().splitlines()]
    if len(lines) < 2 or len(lines[0]) != 1 or not lines[0][0].isdigit():
        raise ProbeSetError(f"{attrs}: line 1 must be the number of images, line 2 the attribute names")
    names, rows = lines[1], [l for l in lines[2:] if l]
    if int(lines[0][0]) != len(rows):
        raise ProbeSetError(f"{attrs}: line 1 says {lines[0][0]} images but {len(rows)} rows follow")
    t, s = _attribute(attrs, names, target, "target"), _attribute(attrs, names, spurious, "spurious")
    if t == s:
        raise ProbeSetError(f"data.target and data.spurious are both {target!r}: choose two attributes")
    partition = {}
    for n, l in enumerate(parts.read_text().splitlines(), 1):
        if l.strip():
            f = l.split()
            if len(f) != 2:
                raise ProbeSetError(f"{parts}: line {n}: expected 'IMAGE PARTITION', got {l!r}")
            partition[f[0]] = SPLITS[_code(parts, f"line {n}", "partition", f[1], 3)]
    folder = root / "img_align_celeba"
    base = (folder if folder.is_dir() else root).resolve()
    classes = [f"not {names[t]}", names[t]]
    samples, have = [], set()
    for n, r in enumerate(rows, 3):
        if len(r) != len(names) + 1 or any(v not in ("-1", "1") for v in r[1:]):
            raise ProbeSetError(f"{attrs}: line {n}: expected an image name and {len(names)} values of -1 or 1")
        if r[0] not in partition:
            raise ProbeSetError(f"{parts}: image {r[0]!r} (line {n} of {attrs.name}) has no partition")
        sp = partition[r[0]]
        have.add(sp)
        if split is None or sp == split:
            y = int(r[t + 1] == "1")
            value = names[s] if r[s + 1] == "1" else f"not {names[s]}"
            samples.append(Sample(_inside(attrs, base, r[0], f"line {n}"), y, f"{classes[y]}/{value}"))
    _check_split(attrs, split, have)
    if not samples:
        raise ProbeSetError(f"{attrs} lists no images")
    return ProbeSet(base, samples, classes, "celeba")


def _table_rows(path: Path) -> list[tuple[int, dict]]:
    if path.suffix.lower() in (".parquet", ".pq"):
        import pandas as pd
        frame = pd.read_parquet(path)
        return [(n, {k: (None if v is None or v != v else v) for k, v in r.items()})
                for n, r in enumerate(frame.to_dict("records"), 1)]
    with path.open(newline="") as f:
        return list(enumerate(csv.DictReader(f), 2))


def read_table(path: str | Path, split: str | None = None, classes: list[str] | None = None) -> ProbeSet:
    """A CSV or Parquet table with ``path, label, group[, split]`` columns (see the module docstring)."""
    from .labels import read_labels
    path = Path(path)
    if not path.is_file():
        raise ProbeSetError(f"table not found: {path} (data.format table reads a CSV or Parquet file)")
    rows = _table_rows(path)
    if not rows:
        raise ProbeSetError(f"{path} lists no images")
    need = ["path", "label", "group"] + (["split"] if split is not None else [])
    missing = [c for c in need if c not in rows[0][1]]
    if missing:
        raise ProbeSetError(f"{path}: a table needs columns {need}; missing {missing} (it has {sorted(rows[0][1])})"
                            + (": without a split column, set data.split to null" if missing == ["split"] else ""))
    names, labels = read_labels(path, [(n, r.get("label")) for n, r in rows], classes)
    base = path.parent.resolve()
    samples, have = [], set()
    for (n, r), y in zip(rows, labels):
        where = f"row {n}"
        if y is None or r.get("group") in (None, ""):
            raise ProbeSetError(f"{path}: {where} has no {'label' if y is None else 'group'}; every row of a table "
                                "needs a label and a group")
        sp = None if r.get("split") is None else str(r["split"])
        have.add(sp)
        if split is None or sp == split:
            cname = names[y] if names and y < len(names) else str(y)
            samples.append(Sample(_inside(path, base, str(r["path"]), where), y, f"{cname}/{r['group']}"))
    _check_split(path, split, {h for h in have if h is not None})
    return ProbeSet(base, samples, names, "table")
