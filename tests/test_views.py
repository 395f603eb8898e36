"""Tests for neuroscribe.describe.views over a real recording (efficientnet-lite0 on the shipped photos)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from neuroscribe.describe.describers import UnitViews
from neuroscribe.record.exemplars import Recording
from neuroscribe.describe.views import (
    OUTLINE_COLOUR, ImageCache, _ring, crop_box, crop_view, dim_outside, image_cache, safe_name, save_unit_views,
    unit_grid, unit_views,
)

CONV, FLAT = "_blocks.12", "_fc"


@pytest.fixture(scope="module")
def partial_unit(rec: Recording) -> int:
    """A conv unit whose best exemplar's mask covers part (not none, not all) of the image."""
    for u in range(rec.units(CONV)):
        m = rec.masks(CONV, u)[0]
        if 0.02 < m.mean() < 0.5:
            return u
    pytest.fail(f"no unit of {CONV} has a partial mask on its top exemplar; the recording looks wrong")


def test_unit_views_shapes_and_alignment(rec: Recording, partial_unit: int) -> None:
    uv = unit_views(rec, CONV, partial_unit)
    s = rec.preprocess.crop
    ex = rec.exemplars(CONV, partial_unit)
    assert (uv.layer, uv.unit) == (CONV, partial_unit)
    assert uv.image_ids == [e.image_id for e in ex] and len(ex) == rec.meta["k"]
    assert uv.scores == pytest.approx([e.score for e in ex])
    for lst in (uv.images, uv.views, uv.crops):
        assert len(lst) == len(ex) and all(im.size == (s, s) and im.mode == "RGB" for im in lst)
    assert all(m.dtype == bool and m.shape == (s, s) for m in uv.masks)
    np.testing.assert_array_equal(np.stack(uv.masks), rec.masks(CONV, partial_unit))
    # the image is the recording's own image in model geometry
    np.testing.assert_array_equal(np.asarray(uv.images[0]), np.asarray(rec.image(uv.image_ids[0])))


def test_view_dims_outside_and_keeps_inside(rec: Recording, partial_unit: int) -> None:
    uv = unit_views(rec, CONV, partial_unit, dim=0.25)
    img, view, mask = np.asarray(uv.images[0]).astype(int), np.asarray(uv.views[0]).astype(int), uv.masks[0]
    assert 0 < mask.sum() < mask.size
    np.testing.assert_array_equal(view[mask], img[mask])          # inside: untouched
    ring = np.all(view == OUTLINE_COLOUR, axis=-1) & ~mask         # the outline lies outside the region
    assert ring.any()
    out = ~mask & ~ring
    np.testing.assert_array_equal(view[out], np.rint(img[out] * 0.25).astype(int))
    bright = out[..., None] & (img > 8)
    assert (view[bright] < img[bright]).all()                      # really darker, pixel by pixel
    assert view[out].mean() < 0.3 * img[out].mean()
    # without the outline every outside pixel is dimmed; dim=1 leaves the image as it is
    plain = np.asarray(dim_outside(uv.images[0], mask, 0.5, outline=False)).astype(int)
    np.testing.assert_array_equal(plain[~mask], np.rint(img[~mask] * 0.5).astype(int))
    assert np.array_equal(np.asarray(dim_outside(uv.images[0], mask, 1.0, outline=False)), img.astype(np.uint8))


def test_empty_and_full_masks() -> None:
    im = Image.fromarray(np.full((64, 64, 3), 200, np.uint8))
    empty, full = np.zeros((64, 64), bool), np.ones((64, 64), bool)
    assert np.asarray(dim_outside(im, empty, 0.25)).max() == 50     # nothing fired: all dimmed, no outline
    assert np.array_equal(np.asarray(dim_outside(im, full, 0.25)), np.asarray(im))
    assert crop_box(empty) == (0, 0, 64, 64)
    assert crop_view(im, empty).size == (64, 64)


def test_flat_layer_views_are_the_images(rec: Recording) -> None:
    uv = unit_views(rec, FLAT, 3)
    assert uv.masks and all(m.all() for m in uv.masks)
    for im, view, crop in zip(uv.images, uv.views, uv.crops, strict=True):
        assert np.array_equal(np.asarray(im), np.asarray(view))
        assert crop.size == im.size


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def test_crop_contains_mask_box(rec: Recording, partial_unit: int) -> None:
    uv = unit_views(rec, CONV, partial_unit, crop_margin=0.15, min_crop=48)
    s = rec.preprocess.crop
    checked = 0
    for im, mask, crop in zip(uv.images, uv.masks, uv.crops, strict=True):
        if not mask.any():
            continue
        x0, y0, x1, y1 = crop_box(mask, 0.15, 48)
        bx0, by0, bx1, by1 = _bbox(mask)
        assert x0 <= bx0 and y0 <= by0 and x1 >= bx1 and y1 >= by1, "crop cuts the mask's bounding box"
        assert x1 - x0 == y1 - y0 and 48 <= x1 - x0 <= s and 0 <= x0 and 0 <= y0 and x1 <= s and y1 <= s
        assert x1 - x0 >= min(s, math.ceil(max(bx1 - bx0, by1 - by0) * 1.3))  # the margin is there
        expected = im.crop((x0, y0, x1, y1)).resize((s, s), Image.Resampling.BICUBIC)
        assert crop.size == (s, s) and np.array_equal(np.asarray(crop), np.asarray(expected))
        checked += 1
    assert checked > 0


@pytest.mark.parametrize("box,expect", [
    ((0, 0, 3, 3), (0, 0, 48, 48)),            # tiny region in a corner: min size, shifted inside
    ((190, 200, 224, 224), None),              # touching the bottom-right border
    ((10, 20, 210, 60), None),                 # wide region: square side from the long edge, clipped to image
])
def test_crop_box_synthetic(box, expect) -> None:
    mask = np.zeros((224, 224), bool)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = True
    got = crop_box(mask, 0.15, 48)
    if expect:
        assert got == expect
    assert got[0] <= x0 and got[1] <= y0 and got[2] >= x1 and got[3] >= y1
    assert got[2] - got[0] == got[3] - got[1] and got[0] >= 0 and got[3] <= 224


def test_grid_size_and_tiles(rec: Recording, partial_unit: int) -> None:
    uv = unit_views(rec, CONV, partial_unit)
    n = len(uv.views)
    g = unit_grid(uv, cols=5, cell=112)
    assert g.size == (5 * 112, math.ceil(n / 5) * 112)
    g2 = unit_grid(uv, cols=4, cell=64, gap=0)
    assert g2.size == (4 * 64, math.ceil(n / 4) * 64)
    assert not uv.views.drawn  # the grid drew its tiles at their own size, not the full views
    # tile 5 (row 1, column 1) is exemplar 5 dimmed at 64 px: its mask region bright, outlined, the rest dimmed
    tile = np.asarray(g2.crop((64, 64, 128, 128))).astype(int)
    small = np.asarray(rec.masks(CONV, partial_unit, 64)[rec.exemplars(CONV, partial_unit)[5].rank], dtype=bool)
    assert 0 < small.sum() < small.size
    shrunk = np.asarray(uv.images[5].convert("RGB").resize((64, 64), Image.Resampling.BICUBIC)).astype(int)
    np.testing.assert_array_equal(tile[small], shrunk[small])
    ring = tile[_ring(small)]
    assert (ring == np.array(OUTLINE_COLOUR)).all()
    out = ~small & ~_ring(small)
    np.testing.assert_array_equal(tile[out], np.rint(shrunk[out] * 0.25).astype(int))
    # views already drawn full size (e.g. for a captioner) are shrunk as they are
    full = uv.views[5]
    g3 = unit_grid(uv, cols=4, cell=64, gap=0)
    ref = np.asarray(full.resize((64, 64), Image.Resampling.BICUBIC)).astype(float)
    assert np.abs(np.asarray(g3.crop((64, 64, 128, 128))).astype(float) - ref).mean() < 1.0
    empty = UnitViews(CONV, 0, [], [], [], [], [], [])
    assert unit_grid(empty, cols=3, cell=50).size == (150, 50)


def test_images_decoded_once_per_layer(rec: Recording) -> None:
    calls: list[int] = []

    def loader(i: int) -> Image.Image:
        calls.append(i)
        return rec.image(i)

    cache = ImageCache(loader, maxsize=1000)
    units = range(24)
    ids = set()
    for u in units:
        ids.update(unit_views(rec, CONV, u, cache=cache).image_ids)
    total = sum(len(rec.exemplars(CONV, u)) for u in units)
    assert total > len(ids)                      # images really are shared between units
    assert sorted(calls) == sorted(ids) and cache.decoded == len(ids)
    # the default cache lives with the Recording
    assert image_cache(rec) is image_cache(rec)


def test_cache_is_lru() -> None:
    cache = ImageCache(lambda i: Image.new("RGB", (2, 2), (i, 0, 0)), maxsize=2)
    cache.get(1), cache.get(2), cache.get(1), cache.get(3)   # 2 is the least recently used
    assert cache.decoded == 3 and len(cache) == 2
    cache.get(1)
    assert cache.decoded == 3
    cache.get(2)
    assert cache.decoded == 4


def test_errors_name_what_was_wrong(rec: Recording) -> None:
    with pytest.raises(KeyError, match="nope"):
        unit_views(rec, "nope", 0)
    with pytest.raises(IndexError, match="unit 99999"):
        unit_views(rec, CONV, 99999)
    with pytest.raises(ValueError, match="dim"):
        unit_views(rec, CONV, 0, dim=2.0)
    with pytest.raises(ValueError, match="mask shape"):
        dim_outside(Image.new("RGB", (10, 10)), np.zeros((5, 5), bool))
    with pytest.raises(ValueError, match="cols"):
        unit_grid(unit_views(rec, CONV, 0), cols=0)


def test_save_unit_views(rec: Recording, partial_unit: int, tmp_path: Path) -> None:
    uv = unit_views(rec, CONV, partial_unit)
    out = save_unit_views(rec, CONV, partial_unit, tmp_path / "views", uv=uv)
    assert out["grid"].is_file() and out["grid"].parent.parent == tmp_path / "views" / safe_name(CONV)
    with Image.open(out["grid"]) as g:
        assert g.format == "JPEG" and g.size == unit_grid(uv).size
    assert len(out["views"]) == len(uv.views) and all(p.is_file() for p in out["views"])
    with Image.open(out["views"][0]) as v:
        assert v.size == uv.views[0].size
    png = save_unit_views(rec, FLAT, 0, tmp_path / "png", fmt="png")
    with Image.open(png["views"][0]) as v:
        ref = unit_views(rec, FLAT, 0).views[0]
        assert v.format == "PNG" and np.array_equal(np.asarray(v.convert("RGB")), np.asarray(ref))
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers, f"temporary files left behind: {leftovers}"
    with pytest.raises(ValueError, match="not of"):
        save_unit_views(rec, CONV, partial_unit + 1, tmp_path / "views", uv=uv)


def test_safe_name() -> None:
    names = ["_blocks.12", "blocks/3", "blocks_3", "..", ".hidden", '"><img src=x onerror=alert(1)>', ""]
    safe = [safe_name(n) for n in names]
    assert safe[0] == "_blocks.12"
    assert len(set(safe)) == len(safe)
    for s in safe:
        assert s and not s.startswith(".") and "/" not in s and all(c.isalnum() or c in "_.-" for c in s)


# ------------------------------------------------------------------------------------------------ geometry
class _ColourMaps:
    """A model whose layer ``feat`` is the input averaged over 8x8 blocks: unit 0 is the red channel, so its
    activation map is hot exactly where an image is red (mean 0, std 1: red 255 -> 1.0, anything else 0)."""

    @staticmethod
    def load(**_):
        import torch
        from torch import nn

        from neuroscribe.models import LoadedModel, Preprocess

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.feat = nn.AvgPool2d(8)
                self.head = nn.Linear(3, 2)
                with torch.no_grad():
                    self.head.weight.zero_()
                    self.head.bias.zero_()

            def forward(self, x):
                return self.head(self.feat(x).mean((2, 3)))

        # nearest-neighbour resizing keeps the red edges crisp, so the expected region is exact
        pre = Preprocess(resize=64, crop=48, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="nearest")
        return LoadedModel("", Net(), pre)


RED, BLUE = (255, 0, 0), (0, 0, 200)
# source size, the red region in MODEL geometry (crop coordinates: x0, y0, x1, y1 of the 48 px centre crop after
# the shorter side is resized to 64), and how a crop coordinate maps back to the source image
GEOMETRY = {
    "landscape.png": ((192, 128), (24, 0, 48, 16), lambda x, y: (2 * (x + 24), 2 * (y + 8))),  # top-right band
    "portrait.png": ((128, 192), (0, 24, 16, 48), lambda x, y: (2 * (x + 8), 2 * (y + 24))),   # bottom-left, tall
    "square.png": ((96, 96), (0, 8, 24, 24), lambda x, y: (1.5 * (x + 8), 1.5 * (y + 8))),     # left, wide
}


def test_masks_and_views_light_the_region_the_unit_saw(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pins mask geometry end to end (record -> stored maps -> upsampled masks -> views and crops): a unit that
    fires on red must light, in every view, exactly the red region of the image in model geometry; on landscape,
    portrait and square photos, the regions placed off the diagonal (so a rotation, flip or transpose moves them),
    with red decoys in the margins that the centre crop removes."""
    from PIL import ImageDraw

    from neuroscribe import models
    from neuroscribe.config import load_config
    from neuroscribe.record import record
    monkeypatch.setitem(models._REGISTRY, "test-colour-maps", _ColourMaps.load)
    folder = tmp_path / "imgs" / "c0"
    folder.mkdir(parents=True)
    for name, (size, (x0, y0, x1, y1), to_src) in GEOMETRY.items():
        im = Image.new("RGB", size, BLUE)
        draw = ImageDraw.Draw(im)
        draw.rectangle([*to_src(x0, y0), to_src(x1, y1)[0] - 1, to_src(x1, y1)[1] - 1], fill=RED)
        if name == "landscape.png":  # cropped away: must not appear in the unit's views
            draw.rectangle([0, 0, 40, 127], fill=RED)
            draw.rectangle([150, 64, 191, 127], fill=RED)
        im.save(folder / name)
    cfg = load_config(None, {"model": "test-colour-maps", "layers": ["feat"], "out": str(tmp_path / "job"),
                             "data": {"root": str(tmp_path / "imgs")}, "record": {"k": 3, "quantile": 0.5},
                             "device": "cpu", "workers": 0, "progress": False, "batch_size": 2})
    rec = Recording(record(cfg))
    assert rec.preprocess.crop == 48 and rec.threshold("feat", 0) == pytest.approx(0.0, abs=1e-6)
    assert rec.view_size == 224 and unit_views(rec, "feat", 0).images[0].size == (224, 224)  # the default views
    # at the model's own size and at twice it (cut from the source: nearest resampling keeps the edges exact)
    for size in (48, 96):
        s = size // 48
        uv = unit_views(rec, "feat", 0, dim=0.25, outline=False, size=size)
        assert sorted(rec.image_paths[i].name for i in uv.image_ids) == sorted(GEOMETRY)
        yy, xx = np.mgrid[0:size, 0:size]
        for image_id, image, mask, view, crop in zip(uv.image_ids, uv.images, uv.masks, uv.views, uv.crops,
                                                     strict=True):
            name = rec.image_paths[image_id].name
            x0, y0, x1, y1 = (s * c for c in GEOMETRY[name][1])
            region = (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)
            # bilinear upsampling of a block map spreads a hot cell half a cell (4 model px) into its neighbours
            m = 4 * s
            near = (xx >= x0 - m) & (xx < x1 + m) & (yy >= y0 - m) & (yy < y1 + m)
            img, v = np.asarray(image).astype(int), np.asarray(view).astype(int)
            assert (img[region] == RED).all() and (img[~region] == BLUE).all(), f"{name}: not the model's view"
            assert mask[region].all(), f"{name}: the mask misses the red region {GEOMETRY[name][1]} (x{s})"
            assert not mask[~near].any(), f"{name}: the mask lights pixels away from the red region"
            assert (v[region] == img[region]).all(), f"{name}: the view dims the region the unit saw"
            assert (v[~near] == np.rint(np.array(BLUE) * 0.25)).all(), f"{name}: the view keeps pixels away from it"
            # the crop is cut around the lit region, so it shows all of it
            bx0, by0, bx1, by1 = crop_box(mask)
            assert bx0 <= x0 and by0 <= y0 and bx1 >= x1 and by1 >= y1 and crop.size == (size, size), name


def test_views_and_crops_are_drawn_on_first_use(rec: Recording, partial_unit: int, monkeypatch) -> None:
    """The tagger reads images and masks only: unit_views draws no dimmed view or crop until one is asked for."""
    import neuroscribe.describe.views as views_mod
    drawn = {"dim": 0, "crop": 0}
    dim, crop = views_mod.dim_outside, views_mod.crop_view
    monkeypatch.setattr(views_mod, "dim_outside", lambda *a, **k: (drawn.__setitem__("dim", drawn["dim"] + 1),
                                                                   dim(*a, **k))[1])
    monkeypatch.setattr(views_mod, "crop_view", lambda *a, **k: (drawn.__setitem__("crop", drawn["crop"] + 1),
                                                                 crop(*a, **k))[1])
    uv = unit_views(rec, CONV, partial_unit, dim=0.5)
    n = len(uv.image_ids)
    assert n > 0 and len(uv.views) == len(uv.crops) == n and drawn == {"dim": 0, "crop": 0}
    first = uv.views[0]
    assert drawn == {"dim": n, "crop": 0}
    assert first.tobytes() == dim(uv.images[0], uv.masks[0], 0.5).tobytes()
    assert list(uv.views)[0] is first and drawn["dim"] == n  # drawn once, then kept
    assert [c.size for c in uv.crops] == [im.size for im in uv.images] and drawn["crop"] == n


def test_dim_outside_is_its_definition() -> None:
    """round(x * dim) outside the mask, the mask's pixels untouched, the 8-adjacent ring outside it outlined."""
    rng = np.random.default_rng(0)
    for _ in range(60):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        mask = rng.random((h, w)) < rng.random()
        d, outline = float(rng.choice([0.0, 0.25, 1.0, rng.random()])), bool(rng.integers(2))
        want = np.where(mask[..., None], arr, np.rint(arr.astype(np.float32) * np.float32(d)).astype(np.uint8))
        if outline and mask.any() and not mask.all():
            p = np.pad(mask, 1)
            grown = np.zeros_like(mask)
            for dy in range(3):
                for dx in range(3):
                    grown |= p[dy:dy + h, dx:dx + w]
            want[grown & ~mask] = OUTLINE_COLOUR
        got = np.asarray(dim_outside(Image.fromarray(arr), mask, d, outline))
        np.testing.assert_array_equal(got, want)
