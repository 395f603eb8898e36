"""Seeded, reproducible datasets with spurious cues, and writing them to disk.

:class:`CuedDataset` wraps a plain list of ``(path, label)`` samples and draws a cue
(:mod:`neuroscribe.datasets.cues`) onto a seeded share of them. Every decision for index ``i``
(does it get the cue, which class/text, the drawing seed) is made once, in the constructor,
from ``(seed, i)`` alone, so results do not depend on worker processes, access order, or on
how many samples follow ``i``.

Typical settings (MILAN, Hernandez et al. ICLR 2022, section 7):

* training set: ``TextCue()``, ``fraction=0.5``, ``correlation='match'`` (the class name is
  written on half the images);
* shifted test set: ``fraction=1.0``, ``correlation='wrong'`` (every image carries a random
  wrong class name).

:func:`materialise` writes a dataset to disk atomically with a ``manifest.csv``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch.utils.data
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from neuroscribe.datasets.cues import Cue, WatermarkCue, cue_uses_class, parse_cue, render_cue
from neuroscribe import io
from neuroscribe.datasets.probe import load_image

__all__ = ["Correlation", "ShiftConfig", "CuedDataset", "cue_token", "materialise", "MANIFEST_COLUMNS"]

Correlation = Literal["match", "wrong", "random", "none"]

#: Columns of ``manifest.csv``; the first five are the stable contract, the rest provenance.
MANIFEST_COLUMNS = ("path", "label", "group", "has_cue", "cue_token", "cue_class", "index", "source")


class ShiftConfig(BaseModel):
    """How a cue is assigned to samples (everything :class:`CuedDataset` needs besides the data).

    * ``fraction``: share of (eligible) images that get the cue, decided per index.
    * ``correlation``: which class the cue names. ``'match'`` = the true class, ``'wrong'`` = a
      uniformly random other class, ``'random'`` = a uniformly random class (possibly the true
      one), ``'none'`` = no image gets the cue (a clean control; ``fraction`` is ignored).
    * ``strength``: with ``'match'``, the probability that the cue agrees with the label; the
      rest get a uniformly random other class. Must be 1 for other correlations.
    * ``eligible_classes``: if set, only samples of these classes can get the cue (e.g. a
      watermark that only ever appears on one class).
    * ``seed``: all decisions derive from ``(seed, index)``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    cue: Cue
    fraction: float = Field(0.5, ge=0, le=1)
    correlation: Correlation = "match"
    strength: float = Field(1.0, ge=0, le=1)
    seed: int = 0
    eligible_classes: tuple[int, ...] | None = None

    @field_validator("eligible_classes")
    @classmethod
    def _non_negative(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if value is not None and any(k < 0 for k in value):
            raise ValueError(f"class indices must be non-negative, got {list(value)}")
        return value

    @model_validator(mode="after")
    def _strength_needs_match(self) -> "ShiftConfig":
        if self.strength != 1.0 and self.correlation != "match":
            raise ValueError(f"strength={self.strength} only applies to correlation='match' "
                             f"(got correlation={self.correlation!r}); leave strength at 1.0")
        return self


@dataclass(frozen=True)
class _Decision:
    has_cue: bool
    cue_class: int  # class the cue would name (used by pair() even when has_cue is False)
    draw_seed: int


def _derive_seed(seed: int, index: int) -> int:
    """A 64-bit seed from (seed, index), stable across processes and Python versions."""
    digest = hashlib.blake2b(f"neuroscribe.cues:{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class CuedDataset(torch.utils.data.Dataset):
    """A dataset of ``(path, label)`` samples with a seeded spurious cue.

    ``samples`` may also hold objects with ``.path`` and ``.label`` (e.g. ``probe.Sample``);
    images are opened with :func:`neuroscribe.datasets.probe.load_image`. ``cue`` is a cue model
    or its dict form; the other keyword arguments are the fields of :class:`ShiftConfig`.

    ``__getitem__(i)`` returns ``(image, label, info)``; ``image`` is a PIL RGB image, or
    whatever ``transform`` returns. ``info`` is collatable by torch's default collate:
    ``index``, ``has_cue`` (bool), ``cue_token`` (the text written / class name coloured, ``""``
    without a cue), ``cue_class`` (class the cue names, ``-1`` without a cue or for a
    watermark), ``group`` (see :meth:`group`) and ``cue_box`` (``(x0, y0, x1, y1)`` bounding the
    changed pixels, ``(0, 0, 0, 0)`` without a cue).
    """

    def __init__(self, samples: Sequence[tuple[str | os.PathLike[str], int]], class_names: Sequence[str],
                 cue: Any, *, fraction: float = 0.5, correlation: Correlation = "match",
                 strength: float = 1.0, seed: int = 0, eligible_classes: Sequence[int] | None = None,
                 transform: Callable[[Image.Image], Any] | None = None,
                 geometry: Callable[[Image.Image], Image.Image] | None = None) -> None:
        self.geometry = geometry  # applied to each loaded image BEFORE the cue (e.g. the model's resize+crop)
        self.config = ShiftConfig(
            cue=parse_cue(cue), fraction=fraction, correlation=correlation, strength=strength,
            seed=seed, eligible_classes=None if eligible_classes is None else tuple(eligible_classes))
        self.class_names = [str(n) for n in class_names]
        n_classes = len(self.class_names)
        if n_classes == 0:
            raise ValueError("class_names is empty")
        if len(set(self.class_names)) != n_classes:
            raise ValueError(f"class_names has duplicates: {self.class_names}")
        if self.config.correlation == "wrong" and n_classes < 2:
            raise ValueError("correlation='wrong' needs at least 2 classes in class_names")
        self.samples: list[tuple[str, int]] = []
        for i, sample in enumerate(samples):
            if hasattr(sample, "path") and hasattr(sample, "label"):  # e.g. probe.Sample
                path, label = sample.path, sample.label
            else:
                try:
                    path, label = sample
                except (TypeError, ValueError):
                    raise ValueError(f"samples[{i}] must be a (path, label) pair, got {sample!r}") from None
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < n_classes:
                raise ValueError(f"samples[{i}] has label {label!r}; expected an int in "
                                 f"0..{n_classes - 1} (len(class_names) = {n_classes})")
            self.samples.append((os.fspath(path), label))
        bad = [k for k in self.config.eligible_classes or () if k >= n_classes]
        if bad:
            raise ValueError(f"eligible_classes {bad} out of range for {n_classes} classes")
        self.transform = transform
        self._decisions = [self._decide(i, label) for i, (_, label) in enumerate(self.samples)]

    @classmethod
    def from_config(cls, samples: Sequence[tuple[str | os.PathLike[str], int]], class_names: Sequence[str],
                    config: ShiftConfig | dict[str, Any],
                    transform: Callable[[Image.Image], Any] | None = None) -> "CuedDataset":
        """Build from a :class:`ShiftConfig` (or its dict form, e.g. from YAML)."""
        cfg = config if isinstance(config, ShiftConfig) else ShiftConfig.model_validate(config)
        return cls(samples, class_names, cfg.cue, fraction=cfg.fraction, correlation=cfg.correlation,
                   strength=cfg.strength, seed=cfg.seed, eligible_classes=cfg.eligible_classes,
                   transform=transform)

    @property
    def cue(self) -> Any:
        """The validated cue config."""
        return self.config.cue

    def _decide(self, index: int, label: int) -> _Decision:
        """All random decisions for one index, from (seed, index) only, in a fixed order."""
        cfg = self.config
        rng = random.Random(_derive_seed(cfg.seed, index))
        u_cue, u_agree = rng.random(), rng.random()
        n = len(self.class_names)
        other = rng.randrange(n - 1) if n > 1 else 0
        other = other + (other >= label)  # uniform over classes != label
        any_class = rng.randrange(n)
        draw_seed = rng.getrandbits(63)
        eligible = cfg.eligible_classes is None or label in cfg.eligible_classes
        has_cue = cfg.correlation != "none" and eligible and u_cue < cfg.fraction
        if n == 1:
            cue_class = label
        elif cfg.correlation == "match":
            cue_class = label if u_agree < cfg.strength else other
        elif cfg.correlation == "wrong":
            cue_class = other
        else:  # 'random', and the would-be class for 'none' (used by pair())
            cue_class = any_class
        return _Decision(has_cue, cue_class, draw_seed)

    def __len__(self) -> int:
        return len(self.samples)

    def _check_index(self, index: int) -> int:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for CuedDataset of length {len(self)}")
        return index % len(self)

    def _token(self, cue_class: int) -> str | int:
        return cue_token(self.cue, cue_class, self.class_names)

    def drawing(self, index: int) -> tuple[bool, int, int]:
        """``(has_cue, cue_class, draw_seed)`` of ``index``: all it takes to redraw its cue
        (:mod:`neuroscribe.datasets.planted`; ``cue_class`` is the class it would name, even without a cue)."""
        d = self._decisions[self._check_index(index)]
        return d.has_cue, d.cue_class, d.draw_seed

    def group(self, index: int) -> str:
        """``'clean'``, ``'cue-agrees'`` / ``'cue-conflicts'`` (cue names the label or not), or
        ``'cue'`` for a watermark, which names no class."""
        index = self._check_index(index)
        d = self._decisions[index]
        if not d.has_cue:
            return "clean"
        if isinstance(self.cue, WatermarkCue):
            return "cue"
        return "cue-agrees" if d.cue_class == self.samples[index][1] else "cue-conflicts"

    def _info(self, index: int, box: tuple[int, int, int, int] | None) -> dict[str, Any]:
        d = self._decisions[index]
        has = d.has_cue
        watermark = isinstance(self.cue, WatermarkCue)
        return {
            "index": index,
            "has_cue": has,
            "cue_token": (self.cue.text if watermark else self.class_names[d.cue_class]) if has else "",
            "cue_class": d.cue_class if has and not watermark else -1,
            "group": self.group(index),
            "cue_box": box if has and box is not None else (0, 0, 0, 0),
        }

    def _load(self, index: int) -> Image.Image:
        img = load_image(self.samples[index][0])
        return self.geometry(img) if self.geometry is not None else img

    def render(self, index: int) -> tuple[Image.Image, dict[str, Any]]:
        """The (possibly cued) PIL image for ``index`` and its info, without ``transform``."""
        index = self._check_index(index)
        img = self._load(index)
        d = self._decisions[index]
        box = None
        if d.has_cue:
            img, box = render_cue(img, self.cue, self._token(d.cue_class), random.Random(d.draw_seed))
        return img, self._info(index, box)

    def __getitem__(self, index: int) -> tuple[Any, int, dict[str, Any]]:
        img, info = self.render(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.samples[info["index"]][1], info

    def pair(self, index: int) -> tuple[Image.Image, Image.Image]:
        """``(clean, cued)`` PIL images for ``index``; the cue is always drawn on ``cued`` (with the
        class this index would get, even if the plan leaves it clean). No ``transform``."""
        index = self._check_index(index)
        clean = self._load(index)
        d = self._decisions[index]
        cued = render_cue(clean, self.cue, self._token(d.cue_class), random.Random(d.draw_seed)).image
        return clean, cued

    def plan(self) -> list[dict[str, Any]]:
        """Per-index decisions (JSON-friendly) for reports: index, path, label, class_name,
        has_cue, cue_token, cue_class, group. Sentinels as in ``info``; no images are loaded."""
        rows = []
        for i, (path, label) in enumerate(self.samples):
            info = self._info(i, None)
            del info["cue_box"]
            rows.append({"index": i, "path": path, "label": label,
                         "class_name": self.class_names[label], **{k: v for k, v in info.items() if k != "index"}})
        return rows


def write_shift_json(folder: Path, dataset) -> None:
    """``folder/shift.json``: the dataset's :class:`ShiftConfig` (null for images written as they are, a shift
    without a cue) and class names -- what readers of the folder's manifest index integer labels with."""
    config = getattr(dataset, "config", None)
    meta = {"shift": None if config is None else config.model_dump(mode="json"),
            "class_names": list(dataset.class_names)}
    (folder / "shift.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")


def cue_token(cue: Any, cue_class: int, class_names: Sequence[str]) -> str | int:
    """What :func:`~neuroscribe.datasets.cues.render_cue` draws for a cue naming ``cue_class``: a watermark's own
    text, the class index for the colour cues, else the class name."""
    if isinstance(cue, WatermarkCue):
        return cue.text
    return cue_class if cue_uses_class(cue) else class_names[cue_class]


def _source_label(sample) -> tuple[str, int]:
    """``(source path, label)`` of a ``(path, label)`` pair or of a sample with ``.path`` / ``.label``."""
    if hasattr(sample, "path") and hasattr(sample, "label"):
        return os.fspath(sample.path), sample.label
    return sample


def materialise(dataset: CuedDataset, out_dir: str | os.PathLike[str], *, image_format: Literal["png", "jpeg"] = "png",
                jpeg_quality: int = 95, overwrite: bool = False,
                progress: Callable[[int, int], None] | None = None) -> Path:
    """Write every image of ``dataset`` (cued per its plan) plus ``manifest.csv`` and ``shift.json``.

    ``dataset`` is a :class:`CuedDataset` or any dataset with ``samples``, ``class_names`` and ``render(i)`` (e.g.
    :class:`neuroscribe.datasets.sets.Labelled`: images from disk with their own groups, ``shift`` null in
    ``shift.json``).

    Images go to ``out_dir/<label>/<index>.<ext>``; ``manifest.csv`` has :data:`MANIFEST_COLUMNS`
    (``path`` relative to ``out_dir``) in index order, matching ``dataset.plan()``. ``shift.json``
    holds the :class:`ShiftConfig` and class names. Everything is written into a temporary
    sibling directory that is renamed into place only when complete, so an interrupted run
    (exception, Ctrl-C) leaves no partial ``out_dir``; without ``overwrite``, an ``out_dir`` that another process
    finished meanwhile is kept (ours dropped). ``progress(done, total)`` is called after each image. Returns the
    final directory.
    """
    if image_format not in ("png", "jpeg"):
        raise ValueError(f"image_format must be 'png' or 'jpeg', got {image_format!r}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True to replace it")
    ext = "png" if image_format == "png" else "jpg"
    with io.atomic_dir(out, replace=overwrite) as tmp:
        total = len(dataset)
        width = max(5, len(str(total)))
        with open(tmp / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS)
            writer.writeheader()
            for i in range(total):
                img, info = dataset.render(i)
                source, label = _source_label(dataset.samples[i])
                rel = Path(str(label)) / f"{i:0{width}d}.{ext}"
                (tmp / rel.parent).mkdir(exist_ok=True)
                if image_format == "png":
                    img.save(tmp / rel, format="PNG")
                else:
                    img.save(tmp / rel, format="JPEG", quality=jpeg_quality)
                writer.writerow({"path": rel.as_posix(), "label": label, "group": info["group"],
                                 "has_cue": int(info["has_cue"]), "cue_token": info["cue_token"],
                                 "cue_class": info["cue_class"], "index": i, "source": source})
                if progress is not None:
                    progress(i + 1, total)
        write_shift_json(tmp, dataset)
    return out
