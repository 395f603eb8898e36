"""Reading a recording back: exemplars per unit, full-size masks rendered on demand, and MILAN's export layout.

A mask is the unit's low-resolution activation map on one exemplar, upsampled bilinearly to the model's input
size (``preprocess.crop``) or to the view size, and thresholded (``>``) at the unit's quantile threshold
(NetDissect/MILAN convention). Images are shown in the model's field of view (its resize + centre crop): at the
model's input size, or cut from the source at the describer's view size (``Recording.view_size``, see
:mod:`neuroscribe.datasets.geometry`), so masks line up with them either way.

Two upsampling conventions, which differ only within half a map cell of the image border:

- ``"edge"`` (views, :meth:`Recording.masks` by default): half-pixel bilinear resize that repeats the edge cells
  outwards (``F.interpolate(..., align_corners=False)``, the usual image resize of PIL/OpenCV/torch);
- ``"milan"`` (``export-milan``): MILAN's own, :func:`milan_upsample`, which blends the border half-cell with
  zeros, so a unit firing on the border gets a mask that stops short of it.

The views keep ``"edge"``: the zeros are not activations any layer computed (they are ``grid_sample``'s default
padding, which NetDissect keeps), they cut a band half a cell wide (16 px of 224 on a 7x7 map) off the mask of a
unit that fires at the border, and with a threshold below zero they add border pixels where the unit never fired.
Our describers are not MILAN's model, so nothing asks them to see MILAN's masks; the export does, so it uses
MILAN's convention exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..datasets.geometry import ViewGeometry, view_size
from ..datasets.probe import load_image
from ..models import Preprocess


Convention = Literal["edge", "milan"]


def milan_upsample(maps: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """``[N, h, w]`` activation maps upsampled to ``[N, S, S]`` (or ``size=(H, W)``) exactly as MILAN does it.

    Matches MILAN's masks (github.com/evandez/neuron-descriptions): ``src/exemplars/compute.py``, ``compute()``,
    builds ``ImageVisualizer(output_size, image_size=..., renormalizer=..., source=dataset, level=levels)`` with
    no ``convolutions``, so its ``pytorch_mask`` (``src/deps/netdissect/imgviz.py``) computes
    ``upsampler(a[None, None, ...])[0, 0] > level`` with ``upsample.upsampler(self.size, a.shape, ...)`` and
    ``scale_offset=None`` (``src/deps/netdissect/upsample.py``, ``upsampler`` and ``upsample_grid``). That is
    ``torch.nn.functional.grid_sample(data, grid, mode='bilinear', padding_mode='zeros', align_corners=True)``,
    the grid putting the centre of map cell ``i`` at output pixel ``(i + 0.5) * S / h - 0.5`` (a cell is
    ``S / h`` pixels; the same pixel-centre alignment as ``F.interpolate(..., align_corners=False)``). Unlike
    that resize, samples past the outermost cell centres blend with zeros (``padding_mode='zeros'``) instead of
    repeating the edge cell; a map one cell wide is constant along that axis (``align_corners=True`` on one
    cell). The grid is computed in the same float32 arithmetic, in the same order, so masks agree bit for bit.
    """
    if maps.ndim != 3:
        raise ValueError(f"maps must be [N, h, w]; got shape {tuple(maps.shape)}")
    out = (size, size) if isinstance(size, int) else tuple(size)
    data = maps.float()[:, None]

    def axis(n_out: int, n_in: int) -> torch.Tensor:
        cell = float(n_out) / n_in              # output pixels per map cell
        first = 0.5 * cell - 0.5                # output position of the first cell's centre
        pos = torch.arange(n_out, dtype=data.dtype, device=data.device)
        return (pos - first) * (2 / (cell * max(1, n_in - 1))) - 1  # in grid_sample's [-1, 1], align_corners=True

    ys, xs = axis(out[0], maps.shape[1]), axis(out[1], maps.shape[2])
    grid = torch.stack((xs[None, :].expand(out), ys[:, None].expand(out)), 2)  # grid_sample wants (x, y)
    grid = grid[None].expand((data.shape[0], *out, 2))
    return F.grid_sample(data, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[:, 0]


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
        self.view_size = view_size(self.preprocess.crop)  # side of describer views; the describe stage may set it
        self.cache_bytes: int | None = None  # the image caches' size (views.image_cache); None = the default
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

    def image(self, image_id: int, size: int | None = None) -> Image.Image:
        """The exemplar image in the model's field of view: what the model saw (its resize and centre crop, at
        ``preprocess.crop``) or, with ``size``, the same box cut from the source file at ``size`` px
        (:class:`~neuroscribe.datasets.geometry.ViewGeometry`)."""
        im = self.probe_image(image_id)
        return self.preprocess.geometry()(im) if size is None else ViewGeometry(self.preprocess, size)(im)

    @cached_property
    def _planting(self):
        if not self.meta.get("planted"):
            return None
        import pyarrow.parquet as pq
        from ..datasets.planted import Planting
        t = pq.read_table(self.path / "images.parquet", columns=["cue_class", "draw_seed"]).to_pydict()
        cues = [None if s is None else (int(c), int(s)) for c, s in zip(t["cue_class"], t["draw_seed"])]
        return Planting.from_dict(self.meta["planted"]), cues

    def probe_image(self, image_id: int) -> Image.Image:
        """Image ``image_id`` as the record pass read it, before the recording's preprocess: the file, or for a
        planted probe (:mod:`neuroscribe.datasets.planted`) its seeded redrawing from the source photo."""
        if self._planting is None:
            return load_image(self.image_paths[image_id])
        planting, cues = self._planting
        return planting.render(self.image_paths[image_id], cues[image_id])

    def upsampled(self, layer: str, unit: int, size: int | None = None,
                  convention: Convention = "edge") -> torch.Tensor:
        """``[k, S, S]`` activation maps upsampled bilinearly to the input size (or ``size``).

        ``convention="edge"`` repeats the edge cells outwards (``F.interpolate``, ``align_corners=False``);
        ``"milan"`` is MILAN's own (:func:`milan_upsample`: zeros past the outermost cell centres).
        """
        size = size or self.preprocess.crop
        m = self.tensors(layer)["maps"][self._unit(layer, unit)].float()
        if convention == "milan":
            return milan_upsample(m, size)
        if convention != "edge":
            raise ValueError(f"convention must be 'edge' or 'milan'; got {convention!r}")
        return F.interpolate(m[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]

    def masks(self, layer: str, unit: int, size: int | None = None, convention: Convention = "edge") -> np.ndarray:
        """``[k, S, S]`` boolean masks: where the upsampled map exceeds (``>``) the unit's threshold.

        ``convention`` as in :meth:`upsampled`: ``"edge"`` for our views, ``"milan"`` for MILAN's layout.
        """
        if self._check(layer)["kind"] == "flat":
            s = size or self.preprocess.crop
            return np.ones((self.tensors(layer)["ids"].shape[1], s, s), dtype=bool)
        return (self.upsampled(layer, unit, size, convention) > self.threshold(layer, unit)).numpy()

    def export_milan(self, out: str | Path, layers: list[str] | None = None) -> Path:
        """Write MILAN's exemplar layout: ``out/<layer>/{images,masks,ids,units}.npy``.

        ``images [U,k,3,S,S] uint8``, ``masks [U,k,1,S,S] uint8``, ``ids [U,k] int64``, ``units [U] int64``, at
        the model's input size S (MILAN's ``output_size``, default 224). Masks are MILAN's own
        (:func:`milan_upsample`, thresholded with ``>`` as its ``pytorch_mask`` does), not the edge-repeating ones
        of our views. (This is MILAN's full-size layout: large by design; our own is the compact one.)
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
                mk = self.masks(layer, u, convention="milan")
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
