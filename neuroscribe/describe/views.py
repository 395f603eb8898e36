"""What a describer (and a person) sees of a unit: its exemplars, masks, MILAN-style views and crops.

Views show the model's field of view (the box its resize and centre crop cut from the source photo) but at the
describer's resolution, ``size`` px a side (:func:`~neuroscribe.datasets.geometry.view_size`: ``describe.view_size``,
by default ``max(224, model crop)``, the input size of the tagger's classifier, of the OCR reader and of the
gallery): they are cut from the source file (:class:`~neuroscribe.datasets.geometry.ViewGeometry`), not blown up
from the model's pixels, so a caption or a faint watermark that a person reads in the photo stays readable for a
model run at 64 px. Masks are upsampled from the unit's activation grid straight to that size. The model's own
input is untouched.

For every exemplar of a unit (:meth:`Recording.exemplars`) :func:`unit_views` builds

- the image in the model's field of view at the view size (:meth:`Recording.image`),
- its boolean mask (:meth:`Recording.masks`: the activation map upsampled to the view size, above the unit's
  threshold),
- the MILAN-style *view*: pixels inside the mask unchanged, every other pixel scaled to ``dim`` brightness, with
  an optional one-pixel outline drawn just *outside* the region (so the region itself stays untouched),
- a square *crop* around the mask's bounding box plus a margin (the whole image when the mask is empty),
  resized back to the view size.

A mask that is empty (the unit never passed its threshold on that image) gives a view dimmed everywhere and a
crop equal to the whole image. Flat layers (``kind == "flat"``, e.g. a classifier) have all-ones masks, so their
views and crops are the images themselves.

Decoded images are cached per :class:`Recording` and view size in a small LRU (:class:`ImageCache`), so an image
shared by many units' exemplars of one layer is decoded and resized once. :func:`unit_grid` tiles a unit's views
into one image and :func:`save_unit_views` writes the grid and the views atomically.
"""

from __future__ import annotations

import hashlib
import math
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image

from .. import io
from ..datasets.geometry import MIN_VIEW_SIZE, ViewGeometry, model_box, view_size
from .describers import UnitViews

if TYPE_CHECKING:  # pragma: no cover
    from ..record.exemplars import Recording

__all__ = ["ImageCache", "image_cache", "derived", "pixel_key", "shrunk", "unit_views", "dim_outside", "crop_box",
           "crop_view", "unit_grid",
           "save_unit_views", "safe_name", "OUTLINE_COLOUR", "MIN_VIEW_SIZE", "view_size", "model_box",
           "ViewGeometry"]

OUTLINE_COLOUR = (255, 214, 0)  # the outline drawn around a mask region in views
_CACHE_BYTES = 512 * 2**20      # each image cache (one per Recording and size) holds this much by default: 3,566
                                # RGB images at 224 px (what is derived from them is extra); a Recording's
                                # ``cache_bytes`` (the describe stage sets it from ``describe.cache_mb``) overrides it


class ImageCache:
    """A thread-safe LRU of decoded exemplar images (of one size), keyed by image id.

    ``get(i)`` calls ``loader(i)`` only on a miss; ``decoded`` counts those calls (tests and profiling).
    """

    def __init__(self, loader: Callable[[int], Image.Image], maxsize: int = 512):
        if maxsize < 1:
            raise ValueError(f"ImageCache maxsize must be at least 1; got {maxsize}")
        self._loader = loader
        self.maxsize = maxsize
        self._items: OrderedDict[int, Image.Image] = OrderedDict()
        self._lock = threading.Lock()
        self.decoded = 0

    def get(self, image_id: int) -> Image.Image:
        with self._lock:
            im = self._items.get(image_id)
            if im is not None:
                self._items.move_to_end(image_id)
                return im
        im = self._loader(image_id)  # decode outside the lock
        with self._lock:
            self.decoded += 1
            self._items[image_id] = im
            self._items.move_to_end(image_id)
            while len(self._items) > self.maxsize:
                self._items.popitem(last=False)
        return im

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


_DERIVED: dict[int, tuple[weakref.ref, dict]] = {}  # id(image) -> (the image, weakly; {what: value})
_DERIVED_LOCK = threading.Lock()


def derived(img: Image.Image, what, make: Callable[[Image.Image], object]):
    """``make(img)``, memoised per image object and ``what`` for as long as the image lives: a probe image is seen
    by many units (views, colours, OCR and the classifier each ask) and an edited image by many verified units.
    Images are never drawn on after they were handed out (views, crops and edits are new images)."""
    with _DERIVED_LOCK:
        hit = _DERIVED.get(id(img))
        if hit is not None and hit[0]() is img and what in hit[1]:
            return hit[1][what]
    value = make(img)
    with _DERIVED_LOCK:
        hit = _DERIVED.get(id(img))
        if hit is None or hit[0]() is not img:
            hit = _DERIVED[id(img)] = (weakref.ref(img, lambda _, i=id(img): _DERIVED.pop(i, None)), {})
        hit[1][what] = value
    return value


def pixel_key(img: Image.Image) -> str:
    """A digest of the image's mode, size and pixels (memoised per image object): equal images share it."""
    return derived(img, "key", lambda im: hashlib.blake2b(im.tobytes() + repr((im.size, im.mode)).encode(),
                                                           digest_size=12).hexdigest())


def shrunk(img: Image.Image, size: tuple[int, int], resample=Image.Resampling.BICUBIC) -> Image.Image:
    """``img`` in RGB resized to ``size`` (memoised per image object, size and filter; do not draw on it). An RGB
    image of that size is itself (never memoised under itself: it would keep itself alive)."""
    size = tuple(size)
    if img.mode == "RGB" and img.size == size:
        return img

    def make(im):
        rgb = im if im.mode == "RGB" else im.convert("RGB")
        return rgb if rgb.size == size else rgb.resize(size, resample)
    return derived(img, ("shrunk", size, int(resample)), make)


_caches: "weakref.WeakKeyDictionary[Recording, dict[int, ImageCache]]" = weakref.WeakKeyDictionary()
_caches_lock = threading.Lock()


def default_cache_size(size: int, cache_bytes: int | None = None) -> int:
    """Images of ``size`` px a side in ``cache_bytes`` (default :data:`_CACHE_BYTES`; at least 64): a probe of a few
    thousand images stays decoded across a layer's units (whose exemplars span most of it), with what is derived
    from each image (its shrunk copies, pixel key and colour terms: :func:`derived`), which dies with it."""
    return max(64, int(_CACHE_BYTES if cache_bytes is None else cache_bytes) // (3 * size * size))


def image_cache(rec: "Recording", maxsize: int | None = None, size: int | None = None) -> ImageCache:
    """The cache of ``rec``'s images at ``size`` px (default: ``rec.view_size``), created on first use and dropped
    with the Recording (its size: ``rec.cache_bytes`` when set). ``maxsize`` resizes it."""
    size = rec.view_size if size is None else size
    with _caches_lock:
        by_size = _caches.setdefault(rec, {})
        cache = by_size.get(size)
        if cache is None:
            ref = weakref.ref(rec)  # the cache must not keep its Recording alive (a weak key's value)
            cache = by_size[size] = ImageCache(lambda i: ref().image(i, size=size),
                                                maxsize or default_cache_size(size, getattr(rec, "cache_bytes", None)))
        elif maxsize is not None:
            if maxsize < 1:
                raise ValueError(f"image cache maxsize must be at least 1; got {maxsize}")
            cache.maxsize = maxsize
        return cache


def dim_outside(image: Image.Image, mask: np.ndarray, dim: float = 0.25, outline: bool = True) -> Image.Image:
    """MILAN-style view: ``mask`` pixels kept, all others scaled by ``dim``; optional outline outside the region.

    Outside the mask a pixel value ``x`` becomes ``round(x * dim)``; the outline is the one-pixel ring of pixels
    8-adjacent to the mask but outside it, painted :data:`OUTLINE_COLOUR` (drawn with PIL's C operations: this
    runs for every exemplar of every unit)."""
    if not 0.0 <= dim <= 1.0:
        raise ValueError(f"dim must be a brightness factor in [0, 1]; got {dim}")
    rgb = image if image.mode == "RGB" else image.convert("RGB")  # read, never drawn on
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (rgb.height, rgb.width):
        raise ValueError(f"mask shape {mask.shape} does not match image size {rgb.width}x{rgb.height} "
                         "(masks must be rendered at the view size)")
    lut = np.rint(np.arange(256, dtype=np.float32) * dim).astype(np.uint8).tolist()  # x -> round(x * dim)
    out = rgb.point(lut * 3)
    inside = Image.fromarray(mask.astype(np.uint8) * 255, "L")
    out.paste(rgb, mask=inside)
    if outline and mask.any() and not mask.all():
        out.paste(OUTLINE_COLOUR, mask=Image.fromarray(_ring(mask).astype(np.uint8) * 255, "L"))
    return out


def _ring(mask: np.ndarray) -> np.ndarray:
    """Pixels 8-adjacent to ``mask`` but outside it: a one-pixel outline that does not cover the region."""
    rows = mask.copy()  # grown by one pixel up and down, then that left and right: the 3x3 neighbourhood
    rows[1:] |= mask[:-1]
    rows[:-1] |= mask[1:]
    grown = rows.copy()
    grown[:, 1:] |= rows[:, :-1]
    grown[:, :-1] |= rows[:, 1:]
    return grown & ~mask


def crop_box(mask: np.ndarray, margin: float = 0.15, min_size: int = 48) -> tuple[int, int, int, int]:
    """Square ``(left, top, right, bottom)`` box (PIL convention) around the mask's bounding box.

    The box side is the bounding box's longer side plus ``margin`` of it on each side, at least ``min_size``
    and at most the image's shorter side; it is centred on the bounding box and shifted to lie inside the image.
    An empty mask gives the whole image.
    """
    if margin < 0:
        raise ValueError(f"crop margin must be >= 0 (a fraction of the mask box); got {margin}")
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D [H, W]; got shape {mask.shape}")
    h, w = mask.shape
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return 0, 0, w, h
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    side = max(bottom - top, right - left)
    side = math.ceil(side * (1 + 2 * margin))
    side = min(max(side, min_size, 1), h, w)
    cy, cx = (top + bottom) / 2, (left + right) / 2
    y0 = int(min(max(round(cy - side / 2), 0), h - side))
    x0 = int(min(max(round(cx - side / 2), 0), w - side))
    return x0, y0, x0 + side, y0 + side


def crop_view(image: Image.Image, mask: np.ndarray, margin: float = 0.15, min_size: int = 48,
              size: int | None = None) -> Image.Image:
    """``image`` cropped to :func:`crop_box` of ``mask`` and resized to ``size`` (default: the image's width)."""
    box = crop_box(mask, margin, min_size)
    size = size or image.width
    return image.crop(box).resize((size, size), Image.Resampling.BICUBIC)


def unit_views(rec: "Recording", layer: str, unit: int, dim: float = 0.25, crop_margin: float = 0.15,
               min_crop: int = 48, *, outline: bool = True, cache: ImageCache | None = None,
               size: int | None = None) -> UnitViews:
    """Everything a describer sees of ``layer``/``unit``: images, masks, dimmed views and crops per exemplar.

    All are ``size`` px a side (default ``rec.view_size``), in the model's field of view; ``min_crop`` is in
    pixels of the model's input (scaled to the view). Images come from ``cache`` (default: the Recording's shared
    :func:`image_cache` for ``size``), so building the views of every unit of a layer decodes each distinct image
    once while it stays in the cache.
    """
    if not 0.0 <= dim <= 1.0:  # checked here: views and crops are drawn later, on first use
        raise ValueError(f"dim must be a brightness factor in [0, 1]; got {dim}")
    if crop_margin < 0:
        raise ValueError(f"crop margin must be >= 0 (a fraction of the mask box); got {crop_margin}")
    size = rec.view_size if size is None else size
    cache = image_cache(rec, size=size) if cache is None else cache
    exemplars = rec.exemplars(layer, unit)          # raises KeyError/IndexError naming the bad layer/unit
    min_crop = max(1, round(min_crop * size / rec.preprocess.crop))
    masks_all = rec.masks(layer, unit, size) if exemplars else np.zeros((0, size, size), dtype=bool)
    images, masks = [], []
    for ex in exemplars:
        im = cache.get(ex.image_id)
        mask = np.asarray(masks_all[ex.rank], dtype=bool)
        if mask.shape != (im.height, im.width):
            raise ValueError(f"{layer!r} unit {unit}: mask {mask.shape} and image {im.size} of image id "
                             f"{ex.image_id} differ; the cache holds images of another size than {size} px")
        images.append(im)
        masks.append(mask)
    # dimmed views and crops are drawn on first use: the tagger reads images and masks only; the unit grid and the
    # captioner draw the views, and only a captioner or a crop-view tagger the crops (15 resizes a unit otherwise)
    views = Drawn(lambda: [dim_outside(im, m, dim, outline) for im, m in zip(images, masks)], len(images),
                  small=lambda side: _small_views(rec, layer, unit, exemplars, images, side, dim, outline))
    crops = Drawn(lambda: [crop_view(im, m, crop_margin, min_crop, size) for im, m in zip(images, masks)],
                  len(images))
    return UnitViews(layer=layer, unit=unit, image_ids=[ex.image_id for ex in exemplars],
                     scores=[float(ex.score) for ex in exemplars], images=images, masks=masks, views=views,
                     crops=crops)


def _small_views(rec, layer, unit, exemplars, images, side, dim, outline) -> list[Image.Image]:
    """The dimmed views drawn at ``side`` px: each image shrunk, its mask rendered from the unit's grid at that size
    (as every mask is, :meth:`Recording.masks`)."""
    if not exemplars:
        return []
    masks = rec.masks(layer, unit, side)
    return [dim_outside(shrunk(im, (side, side)), masks[ex.rank], dim, outline) for ex, im in zip(exemplars, images)]


class Drawn(Sequence):
    """A list of images drawn by ``make()`` on first access (then kept); ``len`` is known without drawing.

    ``small(side)``, where given, draws the same views directly at ``side`` px (for thumbnails: a grid of views
    that were never drawn full size costs a quarter of the pixels or less)."""

    def __init__(self, make: Callable[[], list], n: int, small: Callable[[int], list] | None = None):
        self._make, self._n, self._items, self.small = make, n, None, small

    @property
    def drawn(self) -> bool:
        return self._items is not None

    def _all(self) -> list:
        if self._items is None:
            self._items, self._make = self._make(), None
        return self._items

    def __getitem__(self, i):
        return self._all()[i]

    def __len__(self) -> int:
        return self._n

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None


def unit_grid(uv: UnitViews, cols: int = 5, cell: int = 112, *, which: Literal["views", "crops", "images"] =
              "views", gap: int = 2, background: tuple[int, int, int] = (24, 24, 24)) -> Image.Image:
    """Tile a unit's ``views`` (or ``crops``/``images``) row by row into one RGB image.

    The grid is ``cols * cell`` wide and ``ceil(n / cols) * cell`` high (one row for a unit with no exemplars,
    left blank); each tile is the view at ``cell - gap`` pixels, leaving a ``gap`` border: views not yet drawn are
    dimmed at that size (image and mask resized first), views already drawn are resized.
    """
    if cols < 1 or cell < 2:
        raise ValueError(f"unit_grid needs cols >= 1 and cell >= 2 pixels; got cols={cols}, cell={cell}")
    if not 0 <= gap < cell:
        raise ValueError(f"gap must be in [0, cell); got gap={gap} with cell={cell}")
    if which not in ("views", "crops", "images"):
        raise ValueError(f"which must be 'views', 'crops' or 'images'; got {which!r}")
    tiles: list[Image.Image] = getattr(uv, which)
    rows = max(1, math.ceil(len(tiles) / cols))
    grid = Image.new("RGB", (cols * cell, rows * cell), background)
    inner = cell - gap
    off = gap // 2
    if isinstance(tiles, Drawn) and tiles.small is not None and not tiles.drawn:
        tiles = tiles.small(inner)  # views nobody drew at full size: drawn at the tile's size instead
    for i, tile in enumerate(tiles):
        thumb = tile.convert("RGB")
        if thumb.size != (inner, inner):
            thumb = thumb.resize((inner, inner), Image.Resampling.BICUBIC)
        grid.paste(thumb, ((i % cols) * cell + off, (i // cols) * cell + off))
    return grid


def safe_name(name: str) -> str:
    """A file-name-safe form of ``name`` (a layer name); names that had to change get a short hash suffix.

    ``_blocks.12`` stays as it is; ``blocks/3`` becomes ``blocks_3-<hash>`` so that distinct layer names never
    share a file. Leading dots are replaced, so the result is never ``.``, ``..`` or hidden.
    """
    s = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    s = re.sub(r"^\.", "_", s)[:80]
    if s != name or not s:
        s = f"{s}-{hashlib.blake2b(name.encode(), digest_size=4).hexdigest()}"
    return s


def save_unit_views(rec: "Recording", layer: str, unit: int, out_dir: str | Path, *, uv: UnitViews | None = None,
                    fmt: Literal["jpeg", "png"] = "jpeg", cols: int = 5, cell: int = 112,
                    quality: int = 90) -> dict:
    """Write ``out_dir/<layer>/<unit>/grid.<ext>`` and ``view-<rank>.<ext>`` per exemplar, atomically.

    Returns ``{"grid": Path, "views": [Path, ...]}`` (absolute or as given by ``out_dir``). ``uv`` reuses views
    already built (e.g. for the describer); otherwise they are built with :func:`unit_views` defaults.
    """
    if fmt not in ("jpeg", "png"):
        raise ValueError(f"fmt must be 'jpeg' or 'png'; got {fmt!r}")
    uv = unit_views(rec, layer, unit) if uv is None else uv
    if (uv.layer, uv.unit) != (layer, unit):
        raise ValueError(f"uv holds the views of {uv.layer!r} unit {uv.unit}, not of {layer!r} unit {unit}")
    ext = "jpg" if fmt == "jpeg" else "png"
    d = Path(out_dir) / safe_name(layer) / f"{unit:05d}"
    grid_path = d / f"grid.{ext}"
    views = []
    for rank, view in enumerate(uv.views):  # drawn full size first: the grid then shrinks these (drawn once)
        p = d / f"view-{rank:03d}.{ext}"
        _save(view, p, fmt, quality)
        views.append(p)
    _save(unit_grid(uv, cols, cell), grid_path, fmt, quality)
    for stale in d.glob(f"view-*.{ext}"):  # a re-run with fewer exemplars leaves no stray views behind
        if stale not in views:
            stale.unlink(missing_ok=True)
    return {"grid": grid_path, "views": views}


def _save(im: Image.Image, path: Path, fmt: str, quality: int) -> None:
    with io.atomic_path(path) as tmp:
        if fmt == "jpeg":
            im.convert("RGB").save(tmp, format="JPEG", quality=quality)
        else:
            im.save(tmp, format="PNG")
