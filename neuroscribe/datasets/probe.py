"""Probe sets: the images a model is recorded on.

Two sources: an ImageFolder tree (``root/<class>/<image>``, optionally with ``train``/``val``/``test``/``holdout`` split
folders above the classes and a ``classes.json`` mapping folder names to readable names) and a CSV/JSONL manifest
(column ``path`` relative to the manifest's folder, optional ``label`` and ``group``). Paths that escape the
manifest's folder are refused, except in the manifest of a planted probe (``planted.json`` beside it, written by
:mod:`neuroscribe.datasets.planted`), whose rows name source photos that are redrawn with their cue. Labels
(:mod:`neuroscribe.datasets.labels`): integers are indices into the model's class list, names are class names, a
column mixing both is an error naming the rows.

Loading never stops a run: an unreadable, truncated, zero-byte, non-image, non-regular (directory, FIFO) or
oversized (PIL's ``Image.MAX_IMAGE_PIXELS`` decompression-bomb limit) file is skipped, counted and named with its
reason, and so is an image of such extreme aspect ratio that the shorter-side resize would exceed that limit.
Grayscale, palette, CMYK, RGBA and 16-bit images are converted to 8-bit RGB (alpha composited on white).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import json
import random
import re
import stat
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
SPLIT_NAMES = ("train", "val", "test", "holdout")


class ProbeSetError(ValueError):
    """The probe set cannot be built; the message names the file, row or folder at fault."""


class ImageLoadError(Exception):
    """One image cannot be used; ``str(e)`` is the reason recorded in the run log."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int | None = None
    group: str | None = None
    cue: tuple[int, int] | None = None  # a planted probe's (cue_class, draw_seed) (:mod:`.planted`)


def sample_root() -> Path:
    """The small set of real Imagenette photos shipped inside the package (see its README)."""
    return Path(str(resources.files("neuroscribe") / "data" / "sample"))


def load_image(path: str | Path) -> Image.Image:
    """Open ``path`` as 8-bit RGB, or raise :class:`ImageLoadError` with the reason."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ImageLoadError("missing file") from None
    except OSError as e:
        raise ImageLoadError(f"unreadable file: {e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageLoadError("not a regular file")  # a directory, FIFO or device named like an image
    if st.st_size == 0:
        raise ImageLoadError("zero-byte file")
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                return to_rgb(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(f"decompression bomb refused: {e}") from None
    except Image.UnidentifiedImageError:
        raise ImageLoadError("not an image (unidentified format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageLoadError(f"corrupt or truncated image: {e}") from None
    except Exception as e:  # any other decoder failure skips the image; it never stops a run
        raise ImageLoadError(f"unreadable image: {type(e).__name__}: {e}") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode: 16/32-bit scaled, alpha composited on white, CMYK/L/P converted."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(a / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    return im.convert("RGB")


@dataclass
class ProbeSet:
    """An ordered list of samples with their class names; ids are positions in ``samples``."""

    root: Path
    samples: list[Sample]
    class_names: list[str] | None
    source: str
    planting: Any = None  # a :class:`~neuroscribe.datasets.planted.Planting`: images are redrawn, not read

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int) -> Image.Image:
        """Sample ``i`` as 8-bit RGB: the file, or for a planted probe its redrawing from the source photo.
        Raises :class:`ImageLoadError` with the reason."""
        s = self.samples[i]
        return load_image(s.path) if self.planting is None else self.planting.render(s.path, s.cue)

    def subset(self, limit: int | None, seed: int) -> "ProbeSet":
        """A seeded random subset of ``limit`` samples, kept in their original order."""
        if limit is None or limit >= len(self.samples):
            return self
        idx = sorted(random.Random(seed).sample(range(len(self.samples)), limit))
        return dataclasses.replace(self, samples=[self.samples[i] for i in idx])

    def relpath(self, i: int) -> str:
        p = self.samples[i].path
        try:
            return p.relative_to(self.root).as_posix()
        except ValueError:
            return p.as_posix()

    def fingerprint(self) -> str:
        """A hash of each sample's relative path, size, label and group (mtimes are ignored: copies match)."""
        h = hashlib.blake2b(digest_size=16)
        for i, s in enumerate(self.samples):
            try:
                size = s.path.stat().st_size
            except OSError:
                size = -1
            h.update(f"{self.relpath(i)}|{size}|{s.label}|{s.group}\n".encode())
            if s.cue is not None:
                h.update(f"cue {s.cue}\n".encode())
        if self.planting is not None:
            h.update(json.dumps(self.planting.to_dict(), sort_keys=True).encode())
        return h.hexdigest()

    def labels(self) -> np.ndarray:
        return np.array([-1 if s.label is None else s.label for s in self.samples], dtype=np.int64)


def _class_display(root: Path, folders: list[str]) -> list[str]:
    """Readable class names: ``classes.json`` (folder -> name) when the tree has one; else, when every folder is
    an ImageNet-1k WordNet id (ImageNet, Imagenette, ImageNet-V2/-R/-Sketch layouts), the ImageNet class names
    (``n01440764`` -> ``tench``), so cues write and descriptions compare real words; else the folder names."""
    meta = root / "classes.json"
    if meta.is_file():
        names = json.loads(meta.read_text())
        return [names.get(f, f) for f in folders]
    if folders and all(re.fullmatch(r"n\d{8}", f) for f in folders):
        known = _imagenet_wnid_names()
        if all(f in known for f in folders):
            return [known[f] for f in folders]
    return folders


@functools.lru_cache(maxsize=1)
def _imagenet_wnid_names() -> dict[str, str]:
    """WordNet id -> ImageNet-1k class name, from the packaged WordNet table (no torchvision import needed)."""
    data = json.loads(resources.files("neuroscribe").joinpath("data/imagenet_wordnet.json").read_text())
    return {c["wnid"]: c["names"][0] for c in data["classes"]}


def _split_tops(root: Path, split: str | None) -> list[Path]:
    """The folders whose sub-folders are the classes: ``root/split``, every split in order, or ``root``."""
    subdirs = sorted(d.name for d in root.iterdir() if d.is_dir())
    if split is not None:
        if split not in subdirs:
            raise ProbeSetError(f"{root} has no split folder {split!r}; it has {subdirs}")
        return [root / split]
    if subdirs and all(d in SPLIT_NAMES for d in subdirs):
        return [root / d for d in SPLIT_NAMES if d in subdirs]
    return [root]


def folder_classes(root: str | Path, split: str | None = None) -> list[str] | None:
    """An ImageFolder tree's class names in class-index order, without listing its images; None without class
    folders."""
    root = Path(root)
    if not root.is_dir():
        raise ProbeSetError(f"image folder not found: {root}")
    folders = sorted({d.name for t in _split_tops(root, split) for d in t.iterdir() if d.is_dir()})
    return _class_display(root, folders) if folders else None


def image_folder(root: str | Path, split: str | None = None) -> ProbeSet:
    """An ImageFolder tree; with split folders and ``split=None``, every split in order."""
    root = Path(root)
    if not root.is_dir():
        raise ProbeSetError(f"image folder not found: {root}")
    tops = _split_tops(root, split)
    folders = sorted({d.name for t in tops for d in t.iterdir() if d.is_dir()})
    samples: list[Sample] = []
    for t in tops:
        if folders:
            for ci, f in enumerate(folders):
                d = t / f
                if d.is_dir():
                    samples += [Sample(p, ci) for p in sorted(d.iterdir())
                                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        else:
            samples += [Sample(p) for p in sorted(t.iterdir())
                        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if not samples:
        raise ProbeSetError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {root}")
    names = _class_display(root, folders) if folders else None
    return ProbeSet(root, samples, names, "imagefolder")


def manifest_rows(path: str | Path) -> list[tuple[int, dict]]:
    """A CSV or JSONL manifest's rows, each with its row number (the line number; a CSV's header is line 1)."""
    path = Path(path)
    if not path.is_file():
        raise ProbeSetError(f"manifest not found: {path}")
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ProbeSetError(f"{path}:{n}: not valid JSON: {e}") from None
        return rows
    with path.open(newline="") as f:
        return list(enumerate(csv.DictReader(f), 2))


def manifest(path: str | Path, classes: list[str] | None = None) -> ProbeSet:
    """A CSV or JSONL manifest with a ``path`` column (relative to the manifest's folder). Labels are read by
    :func:`neuroscribe.datasets.labels.read_labels`: integers index ``classes`` (the model's class list), names
    are the classes."""
    from .labels import read_labels
    path = Path(path)
    rows = manifest_rows(path)
    root = path.parent.resolve()
    if not rows:
        raise ProbeSetError(f"{path} lists no images")
    if "path" not in rows[0][1]:
        raise ProbeSetError(f"{path} needs a 'path' column; it has {sorted(rows[0][1])}")
    names, labels = read_labels(path, [(n, r.get("label")) for n, r in rows], classes)
    from .planted import PLANTED_FILE, read_planted
    if (path.parent / PLANTED_FILE).is_file():  # a planted probe: source photos redrawn with their cue
        return read_planted(path, rows, labels, names)
    samples = []
    for (n, r), label in zip(rows, labels):
        rel = str(r["path"])
        p = (root / rel).resolve()
        if not p.is_relative_to(root):
            raise ProbeSetError(f"{path}: row {n}: path {rel!r} escapes the manifest's folder {root}; "
                                "manifests may only name files under their own folder (a guard against manifests "
                                "that reach into the rest of the disk): save the manifest in a folder that holds the "
                                "images, e.g. the dataset's root, with paths relative to it")
        grp = r.get("group")
        samples.append(Sample(p, label, None if grp in (None, "") else str(grp)))
    return ProbeSet(root, samples, names, "manifest")


def data_source(root: str | Path | None, format: str = "auto") -> tuple[Path, str]:
    """``(path, format)`` of a :class:`~neuroscribe.config.DataConfig`: unset root = the shipped sample, and
    ``auto`` resolved to ``imagefolder``, ``csv`` or ``jsonl``."""
    root = sample_root() if root is None else Path(root)
    if format == "auto":
        format = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "table",
                  ".pq": "table"}.get(root.suffix.lower(), "imagefolder")
    return root, format


def open_probe_set(root: str | Path | None, format: str = "auto", split: str | None = None,
                   limit: int | None = None, seed: int = 0, classes: list[str] | None = None, *,
                   target: str | None = None, spurious: str | None = None) -> ProbeSet:
    """Build the probe set a :class:`~neuroscribe.config.DataConfig` describes; a manifest's integer labels index
    ``classes`` (the model's class list). The group formats (:mod:`neuroscribe.datasets.readers`: ``waterbirds``,
    ``celeba`` with its ``target`` and ``spurious`` attributes, ``table``) take ``split`` from the data's own split
    column, and their ``limit`` is a seeded sample stratified by class x group."""
    from . import readers
    root, format = data_source(root, format)
    if format in readers.FORMATS:
        from .splits import stratified_sample
        ps = (readers.read_waterbirds(root, split) if format == "waterbirds" else
              readers.read_celeba(root, split, target, spurious) if format == "celeba" else
              readers.read_table(root, split, classes))
        if limit is None or limit >= len(ps):
            return ps
        cells = {g: k for k, g in enumerate(sorted({s.group for s in ps.samples}))}
        ids = stratified_sample([cells[s.group] for s in ps.samples], limit, seed, purpose="data.limit")
        return ProbeSet(ps.root, [ps.samples[i] for i in ids], ps.class_names, ps.source)
    ps = image_folder(root, split) if format == "imagefolder" else manifest(root, classes)
    return ps.subset(limit, seed)


class ImageDataset(torch.utils.data.Dataset):
    """Items ``(tensor | None, id, reason)``; a failed image yields ``None`` and the reason."""

    def __init__(self, probe: ProbeSet, transform, ids: list[int] | None = None, resize: int | None = None):
        self.probe = probe
        self.transform = transform
        self.ids = list(range(len(probe))) if ids is None else list(ids)
        self.resize = resize  # the transform's shorter-side resize, to refuse images it would blow up

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        sid = self.ids[i]
        try:
            im = self.probe.load(sid)
            check_resize(im.size, self.resize)
            return self.transform(im), sid, ""
        except ImageLoadError as e:
            return None, sid, str(e)


def check_resize(size: tuple[int, int], resize: int | None) -> None:
    """Refuse an image whose shorter-side resize would exceed PIL's decompression-bomb limit (a 1 x 100000
    strip is a small file but a 224 x 22,400,000 image after ``Resize(224)``)."""
    limit = Image.MAX_IMAGE_PIXELS
    if not resize or not limit:
        return
    w, h = size
    s = resize / max(1, min(w, h))
    pixels = max(w * s, 1) * max(h * s, 1)
    if pixels > limit:
        raise ImageLoadError(f"extreme aspect ratio {w}x{h}: resizing its shorter side to {resize} px would "
                             f"make {pixels:,.0f} pixels, over PIL's decompression-bomb limit ({limit:,})")


def collate_skipping(batch):
    """Stack the good images; return ``(x | None, ids, [(id, reason), ...])``."""
    good = [(x, i) for x, i, _ in batch if x is not None]
    failed = [(i, r) for x, i, r in batch if x is None]
    if not good:
        return None, torch.zeros(0, dtype=torch.long), failed
    return torch.stack([x for x, _ in good]), torch.tensor([i for _, i in good], dtype=torch.long), failed
