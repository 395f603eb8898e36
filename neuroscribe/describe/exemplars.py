"""Reading a recording back: exemplars per unit, full-size masks rendered on demand, and MILAN's export layout.

A mask is the unit's low-resolution activation map on one exemplar, upsampled bilinearly to the model's input
size (``preprocess.crop``) and thresholded at the unit's quantile threshold (NetDissect/MILAN convention). Images
are shown in the model's input geometry (resize + centre crop), so masks line up with them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..datasets.probe import load_image
from ..models import Preprocess


class RecordingError(FileNotFoundError):
    """The job directory holds no (complete) recording."""


@dataclass
class Exemplar:
    rank: int
    image_id: int
    path: Path
    score: float
    map: np.ndarray  # low-resolution activation map [h, w]


class Recording:
    """A finished record stage: ``Recording.open(JOBDIR)`` or ``Recording(path_to_key_dir)``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "meta.json").is_file():
            raise RecordingError(f"no complete recording at {self.path} (meta.json missing): run "
                                 "`neuroscribe record` for this job first")
        self.meta = json.loads((self.path / "meta.json").read_text())
        self.preprocess = Preprocess(**{k: tuple(v) if isinstance(v, list) else v
                                        for k, v in self.meta["preprocess"].items()})
        self.root = Path(self.meta["data_root"])
        self._layers: dict[str, dict[str, torch.Tensor]] = {}

    @classmethod
    def open(cls, job: str | Path) -> "Recording":
        job = Path(job)
        ptr = job / "record.json"
        if not ptr.is_file():
            raise RecordingError(f"{job} has no record.json: run `neuroscribe record --out {job}` first")
        return cls(job / json.loads(ptr.read_text())["path"])

    @property
    def layers(self) -> list[str]:
        return list(self.meta["layers"])

    def units(self, layer: str) -> int:
        return int(self._check(layer)["units"])

    def layout(self, layer: str) -> str | None:
        """'nchw' or 'nhwc' for a recorded map (recordings before layouts were read as 'nchw'), else None."""
        m = self._check(layer)
        return m.get("layout", "nchw" if m["kind"] == "conv" else None)

    @property
    def layouts(self) -> dict[str, str]:
        """``{layer: layout}`` of the recorded maps, to declare on the model for later passes
        (:func:`neuroscribe.hooks.declare_layouts`)."""
        return {l: lay for l in self.layers if (lay := self.layout(l)) is not None}

    def _check(self, layer: str) -> dict:
        if layer not in self.meta["layers"]:
            import difflib
            raise KeyError(f"layer {layer!r} was not recorded; recorded: {self.layers} "
                           f"(nearest: {difflib.get_close_matches(layer, self.layers, n=3)})")
        return self.meta["layers"][layer]

    def tensors(self, layer: str) -> dict[str, torch.Tensor]:
        if layer not in self._layers:
            from safetensors.torch import load_file
            self._layers[layer] = load_file(str(self.path / self._check(layer)["file"]))
        return self._layers[layer]

    @cached_property
    def image_paths(self) -> list[Path]:
        import pyarrow.parquet as pq
        rel = pq.read_table(self.path / "images.parquet", columns=["path"]).column("path").to_pylist()
        return [Path(p) if Path(p).is_absolute() else self.root / p for p in rel]

    @cached_property
    def skipped_ids(self) -> set[int]:
        return {int(i) for i, *_ in self.meta.get("skipped", [])}

    @cached_property
    def labels(self) -> np.ndarray:
        import pyarrow.parquet as pq
        col = pq.read_table(self.path / "images.parquet", columns=["label"]).column("label").to_pylist()
        return np.array([-1 if v is None else v for v in col], dtype=np.int64)

    def _unit(self, layer: str, unit: int) -> int:
        n = self.units(layer)
        if not 0 <= unit < n:
            raise IndexError(f"unit {unit} is out of range for layer {layer!r}, which has units 0..{n - 1}")
        return unit

    def exemplars(self, layer: str, unit: int) -> list[Exemplar]:
        t = self.tensors(layer)
        u = self._unit(layer, unit)
        out = []
        for r, (i, s) in enumerate(zip(t["ids"][u].tolist(), t["scores"][u].tolist())):
            if i >= 0:
                out.append(Exemplar(r, i, self.image_paths[i], s, t["maps"][u, r].float().numpy()))
        return out

    def threshold(self, layer: str, unit: int) -> float:
        return float(self.tensors(layer)["threshold"][self._unit(layer, unit)])

    def image(self, image_id: int) -> Image.Image:
        """The exemplar image in the model's input geometry (resized and centre-cropped)."""
        return self.preprocess.geometry()(load_image(self.image_paths[image_id]))

    def upsampled(self, layer: str, unit: int, size: int | None = None) -> torch.Tensor:
        """``[k, S, S]`` activation maps upsampled bilinearly to the input size (or ``size``)."""
        size = size or self.preprocess.crop
        m = self.tensors(layer)["maps"][self._unit(layer, unit)].float()[:, None]
        return F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False)[:, 0]

    def masks(self, layer: str, unit: int, size: int | None = None) -> np.ndarray:
        """``[k, S, S]`` boolean masks: where the upsampled map exceeds the unit's threshold."""
        if self._check(layer)["kind"] == "flat":
            s = size or self.preprocess.crop
            return np.ones((self.tensors(layer)["ids"].shape[1], s, s), dtype=bool)
        return (self.upsampled(layer, unit, size) > self.threshold(layer, unit)).numpy()

    def export_milan(self, out: str | Path, layers: list[str] | None = None) -> Path:
        """Write MILAN's exemplar layout: ``out/<layer>/{images,masks,ids,units}.npy``.

        ``images [U,k,3,S,S] uint8``, ``masks [U,k,1,S,S] uint8``, ``ids [U,k] int64``, ``units [U] int64``, at
        the model's input size S. (This is MILAN's full-size layout: large by design; our own is the compact
        one.)
        """
        from .. import io
        out = Path(out)
        for layer in layers or self.layers:
            t = self.tensors(layer)
            n, k = t["ids"].shape
            s = self.preprocess.crop
            cache: dict[int, np.ndarray] = {}
            images = np.zeros((n, k, 3, s, s), dtype=np.uint8)
            masks = np.zeros((n, k, 1, s, s), dtype=np.uint8)
            for u in range(n):
                mk = self.masks(layer, u)
                for r, i in enumerate(t["ids"][u].tolist()):
                    if i < 0:
                        continue
                    if i not in cache:
                        cache[i] = np.asarray(self.image(i)).transpose(2, 0, 1)
                    images[u, r] = cache[i]
                    masks[u, r, 0] = mk[r]
            d = out / layer
            for name, arr in (("images", images), ("masks", masks), ("ids", t["ids"].numpy()),
                              ("units", np.arange(n, dtype=np.int64))):
                with io.atomic_path(d / f"{name}.npy") as tmp:
                    with open(tmp, "wb") as f:
                        np.save(f, arr)
        return out
