"""A probe set with a planted cue, kept as what redraws it: source photos, a cue and a seed per image -- no copies.

A job whose ``probe`` names a shift with a cue records the model on those photos with the cue drawn on. Nothing of
that is written as images: :func:`write_planted` writes, under ``JOBDIR/probe/NAME/``,

* ``manifest.csv``: one row per image, :data:`~neuroscribe.datasets.shifts.MANIFEST_COLUMNS` plus ``draw_seed``;
  ``path`` (= ``source``) is the source photo itself, wherever it is (the one manifest allowed to name files
  outside its folder: neuroscribe wrote it), ``has_cue`` / ``cue_class`` / ``draw_seed`` are the shift's seeded
  decisions for that image;
* ``planted.json``: the :class:`Planting` -- the cue, the class names, the model's own preprocessing (its field of
  view) and the view size the cue is drawn at;
* ``shift.json`` (the shift and its class names, as :func:`~neuroscribe.datasets.shifts.materialise` writes it).

Every reader redraws an image with :meth:`Planting.render`: the model's field of view cut from the source at the
view size (:class:`~neuroscribe.datasets.geometry.ViewGeometry`) and the cue drawn there with
``random.Random(draw_seed)``: the same pixels in every run and process. The record pass shows the model that picture
resized to its own input (the probe's ``preprocess``: resize = crop), the describer's views use it as it is, so a
caption or a faint watermark stays crisp where a person would read it. The recording keeps the planting in its
``meta.json`` and each image's ``cue_class`` / ``draw_seed`` in ``images.parquet``
(:meth:`neuroscribe.record.exemplars.Recording.probe_image`).
"""

from __future__ import annotations

import csv
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from .. import io
from ..models import Preprocess
from .cues import parse_cue, render_cue
from .geometry import ViewGeometry
from .probe import ProbeSet, ProbeSetError, Sample, load_image

__all__ = ["Planting", "PLANTED_FILE", "write_planted", "read_planted"]

PLANTED_FILE = "planted.json"  # beside manifest.csv: marks a planted probe and says how to redraw it
_COLUMNS = ("path", "label", "group", "has_cue", "cue_token", "cue_class", "index", "source", "draw_seed")


@dataclass(frozen=True)
class Planting:
    """How to redraw the images of a planted probe: ``cue`` (None: a shift without a cue, views only), the class
    names its tokens come from, the model's ``preprocess`` (its resize and centre crop: the field of view) and the
    ``view_size`` the picture is cut and the cue drawn at."""

    cue: Any
    class_names: tuple[str, ...]
    preprocess: Preprocess
    view_size: int

    def render(self, source: str | Path, cue: tuple[int, int] | None) -> Image.Image:
        """The image of one sample: the field of view of ``source`` at the view size, with the cue drawn when
        ``cue`` = ``(cue_class, draw_seed)`` (``cue_class`` -1 for a watermark, which names no class).
        Raises :class:`~neuroscribe.datasets.probe.ImageLoadError` for an unreadable source."""
        img = ViewGeometry(self.preprocess, self.view_size)(load_image(source))
        if cue is None or self.cue is None:
            return img
        from .shifts import cue_token
        cue_class, draw_seed = cue
        return render_cue(img, self.cue, cue_token(self.cue, cue_class, self.class_names),
                          random.Random(draw_seed)).image

    def to_dict(self) -> dict:
        return {"cue": None if self.cue is None else self.cue.model_dump(mode="json"),
                "class_names": list(self.class_names), "model_preprocess": self.preprocess.to_dict(),
                "view_size": self.view_size}

    @classmethod
    def from_dict(cls, d: dict) -> "Planting":
        pre = Preprocess(**{k: tuple(v) if isinstance(v, list) else v for k, v in d["model_preprocess"].items()})
        return cls(None if d["cue"] is None else parse_cue(d["cue"]), tuple(d["class_names"]), pre,
                   int(d["view_size"]))


def write_planted(ds, out: str | Path, planting: Planting) -> Path:
    """Write ``ds`` (a :class:`~neuroscribe.datasets.shifts.CuedDataset`, or a cue-less
    :class:`~neuroscribe.datasets.sets.Labelled`) as a planted probe in ``out`` (see the module docstring). The
    folder is written whole under a temporary name and renamed into place (:func:`neuroscribe.io.atomic_dir`: an
    interrupted run leaves the previous one or none). Returns ``out``."""
    from .shifts import write_shift_json
    out = Path(out)
    plan = ds.plan() if hasattr(ds, "drawing") else None  # a cued shift: its seeded decisions
    with io.atomic_dir(out) as tmp:
        with open(tmp / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=_COLUMNS)
            writer.writeheader()
            for i, s in enumerate(ds.samples):
                source, label = (os.fspath(s.path), s.label) if hasattr(s, "path") else (os.fspath(s[0]), s[1])
                source = str(Path(source).resolve())
                if plan is not None:
                    p, draw_seed = plan[i], ds.drawing(i)[2]
                    has_cue, cue_class, group, token = p["has_cue"], p["cue_class"], p["group"], p["cue_token"]
                else:
                    has_cue, cue_class, draw_seed, group, token = False, -1, None, s.group or "", ""
                writer.writerow({"path": source, "label": label, "group": group, "has_cue": int(has_cue),
                                 "cue_token": token, "cue_class": cue_class, "index": i, "source": source,
                                 "draw_seed": draw_seed if has_cue else ""})
        write_shift_json(tmp, ds)
        (tmp / PLANTED_FILE).write_text(json.dumps(planting.to_dict(), indent=2), encoding="utf-8")
    return out


def read_planted(path: Path, rows: list[tuple[int, dict]], labels: list[int | None],
                 names: list[str] | None) -> ProbeSet:
    """The :class:`ProbeSet` of a planted manifest ``path`` (its rows and labels already read): samples are the
    source photos, each with its ``(cue_class, draw_seed)`` when it carries the cue; ``planting`` set."""
    planting = Planting.from_dict(json.loads((path.parent / PLANTED_FILE).read_text()))
    samples = []
    for (n, r), label in zip(rows, labels):
        src = Path(str(r.get("source") or r["path"]))
        if not src.is_absolute():
            raise ProbeSetError(f"{path}: row {n}: a planted probe names its source photos by absolute path; got "
                                f"{src}")
        cue = None
        if str(r.get("has_cue", "0")) in ("1", "True", "true"):
            try:
                cue = (int(r["cue_class"]), int(r["draw_seed"]))
            except (KeyError, TypeError, ValueError):
                raise ProbeSetError(f"{path}: row {n}: has_cue is set but cue_class / draw_seed are not integers "
                                    f"({r.get('cue_class')!r}, {r.get('draw_seed')!r})") from None
        grp = r.get("group")
        samples.append(Sample(src, label, None if grp in (None, "") else str(grp), cue))
    return ProbeSet(path.parent.resolve(), samples, names, "planted", planting)
