"""Exact, fast tests of exemplar masks and view geometry, sized for mutation testing (``make mutation``).

:mod:`neuroscribe.record.exemplars`: MILAN's upsampling (zeros past the outermost cell centres), the edge-repeating
one, thresholding (``>``), exemplars of a unit; :mod:`neuroscribe.describe.views`: the dimmed view, its outline and
the crop box. References are written independently (bilinear weights ``max(0, 1 - |x - i|)`` at the half-pixel
source position, loops over pixels); maps are a few cells, images a few dozen pixels.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from neuroscribe.describe import views as V
from neuroscribe.models import Preprocess
from neuroscribe.record.exemplars import Exemplar, Recording, milan_upsample


# ============================================================================== upsampling references
def weights(n_out: int, n_in: int, edge: bool) -> np.ndarray:
    """[n_out, n_in] bilinear weights: pixel o samples source x = (o + 0.5) * n_in / n_out - 0.5; ``edge`` clamps
    x to the outermost cell centres, otherwise a neighbour past them is a zero; one cell is constant."""
    w = np.zeros((n_out, n_in))
    for o in range(n_out):
        x = (o + 0.5) * n_in / n_out - 0.5 if n_in > 1 else 0.0
        if edge:
            x = min(max(x, 0.0), n_in - 1.0)
        for i in range(n_in):
            w[o, i] = max(0.0, 1.0 - abs(x - i))
    return w


def ref_upsample(maps: np.ndarray, size: tuple[int, int], edge: bool) -> np.ndarray:
    wy, wx = weights(size[0], maps.shape[1], edge), weights(size[1], maps.shape[2], edge)
    return np.einsum("yi,nij,xj->nyx", wy, maps.astype(np.float64), wx)


MAPS = torch.tensor([[[1.0, -2.0, 3.0, 0.5], [4.0, 0.0, -1.0, 2.0]],
                     [[0.0, 1.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]]])  # [2, 2, 4]


@pytest.mark.parametrize("maps, size", [(MAPS, 8), (MAPS, (6, 12)), (MAPS[:, :1], (3, 8)), (MAPS[:, :, :1], 5),
                                        (MAPS[:1, :, :3], (7, 4)), (MAPS.repeat(1, 2, 1)[:, :3], (9, 10))])
def test_milan_upsample_against_the_reference(maps, size):
    got = milan_upsample(maps.half(), size)
    hw = (size, size) if isinstance(size, int) else size
    assert got.dtype == torch.float32 and got.shape == (maps.shape[0], *hw)
    np.testing.assert_allclose(got.numpy(), ref_upsample(maps.numpy(), hw, edge=False), rtol=0, atol=2e-6)


def test_milan_upsample_of_a_dyadic_grid_is_exact():
    got = milan_upsample(MAPS[:, :, :2], 8)  # cells of 4 pixels: every position and weight a multiple of 1/8
    assert np.array_equal(got.numpy(), ref_upsample(MAPS[:, :, :2].numpy(), (8, 8), edge=False))
    assert got[0, 0, 0] == 0.625 * 0.625  # the corner blends with zeros: 5/8 of the first cell on each axis


def test_milan_upsample_refuses_other_shapes():
    with pytest.raises(ValueError, match=re.escape("maps must be [N, h, w]; got shape (2, 4)") + "$"):
        milan_upsample(torch.zeros(2, 4), 4)


# ============================================================================== a recording without files
def recording(kind: str = "conv", layout: str | None = None, crop: int = 8) -> Recording:
    rec = Recording.__new__(Recording)
    meta = {"units": 2, "kind": kind, "file": "l.safetensors"}
    if layout:
        meta["layout"] = layout
    rec.path, rec.meta = Path("/nowhere"), {"layers": {"l": meta, "t": {"units": 3, "kind": "tokens"}}}
    rec.preprocess = Preprocess(resize=crop, crop=crop)
    rec._layers = {"l": {"maps": MAPS.reshape(2, 1, 2, 4).repeat(1, 3, 1, 1).half() * torch.tensor(
                             [1.0, 0.5, -1.0])[None, :, None, None],
                         "ids": torch.tensor([[4, 0, -1], [1, 2, 3]]),
                         "scores": torch.tensor([[3.5, 2.0, -1e9], [1.0, 0.5, 0.25]]),
                         "threshold": torch.tensor([1.0, 0.5])}}
    rec.__dict__["image_paths"] = [Path(f"/img/{i}.jpg") for i in range(5)]
    return rec


def test_upsampled_in_both_conventions():
    rec = recording()
    maps = rec.tensors("l")["maps"][1].float().numpy()
    got = rec.upsampled("l", 1)
    assert got.dtype == torch.float32 and got.shape == (3, 8, 8)
    np.testing.assert_allclose(got.numpy(), ref_upsample(maps, (8, 8), edge=True), rtol=0, atol=2e-6)
    got = rec.upsampled("l", 1, size=6, convention="milan")
    np.testing.assert_allclose(got.numpy(), ref_upsample(maps, (6, 6), edge=False), rtol=0, atol=2e-6)
    assert rec.upsampled("l", 1, 6, "edge").shape == (3, 6, 6)
    with pytest.raises(ValueError, match=re.escape("convention must be 'edge' or 'milan'; got 'MILAN'") + "$"):
        rec.upsampled("l", 1, convention="MILAN")


def test_masks_threshold_strictly_above():
    rec = recording()
    up = rec.upsampled("l", 0, 8)
    m = rec.masks("l", 0)
    assert m.dtype == bool and m.shape == (3, 8, 8) and np.array_equal(m, (up > 1.0).numpy())
    assert up[0, 0, 0] == 1.0 and not m[0, 0, 0] and m[0].any()  # a tie is outside
    mm = rec.masks("l", 1, 16, "milan")
    assert np.array_equal(mm, (rec.upsampled("l", 1, 16, "milan") > 0.5).numpy()) and mm.any() and not mm.all()
    assert not np.array_equal(mm, rec.masks("l", 1, 16))
    flat = recording("flat")
    assert flat.masks("l", 0).shape == (3, 8, 8) and flat.masks("l", 0).all() and flat.masks("l", 1).dtype == bool
    assert flat.masks("l", 1, size=5).shape == (3, 5, 5) and flat.masks("l", 1, 5).all()


def test_exemplars_threshold_and_unit_range():
    rec = recording()
    ex = rec.exemplars("l", 0)
    assert [(e.rank, e.image_id, e.path, e.score) for e in ex] == [(0, 4, Path("/img/4.jpg"), 3.5),
                                                                  (1, 0, Path("/img/0.jpg"), 2.0)]
    assert all(isinstance(e, Exemplar) and e.map.dtype == np.float32 for e in ex)
    assert np.array_equal(ex[1].map, rec.tensors("l")["maps"][0, 1].float().numpy())
    assert [e.rank for e in rec.exemplars("l", 1)] == [0, 1, 2]
    assert rec.threshold("l", 1) == 0.5 and type(rec.threshold("l", 0)) is float
    assert rec.units("l") == 2 and rec.units("t") == 3
    for u in (2, -1):
        with pytest.raises(IndexError, match=re.escape(
                f"unit {u} is out of range for layer 'l', which has units 0..1") + "$"):
            rec.exemplars("l", u)
    with pytest.raises(KeyError, match=re.escape("layer 'k' was not recorded; recorded: ['l', 't'] (nearest: [])")):
        rec.units("k")
    rec.meta["layers"] = {n: {"units": 1, "kind": "conv"} for n in ("la", "lb", "lc", "ld")}
    with pytest.raises(KeyError, match=re.escape("recorded: ['la', 'lb', 'lc', 'ld'] (nearest: ['ld', 'lc', 'lb'])")):
        rec.units("l")


def test_layout_of_a_recorded_layer():
    assert recording().layout("l") == "nchw" and recording(layout="nhwc").layout("l") == "nhwc"
    assert recording("flat").layout("l") is None and recording().layout("t") is None
    assert recording("tokens", layout="nchw").layout("l") == "nchw"


# ============================================================================== views: dimming, outline, crop
def ref_ring(mask: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    return np.array([[not mask[y, x] and any(mask[j, i] for j in range(max(y - 1, 0), min(y + 2, h))
                                             for i in range(max(x - 1, 0), min(x + 2, w)))
                      for x in range(w)] for y in range(h)])


def test_ring_is_the_outside_8_neighbourhood():
    rng = np.random.default_rng(0)
    masks = [rng.random((5, 7)) < 0.2, np.zeros((3, 4), bool), np.ones((3, 4), bool)]
    m = np.zeros((6, 7), bool)
    m[0, 0] = m[5, 6] = m[2, 3] = True  # corners and an interior pixel: the ring stops at the border
    masks.append(m)
    for mask in masks:
        assert np.array_equal(V._ring(mask), ref_ring(mask))
    assert V._ring(m).sum() == 3 + 3 + 8


def test_dim_outside():
    rgb = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3) * 4 + 3
    mask = np.zeros((4, 5), bool)
    mask[1:3, 1:3] = True
    for dim in (0.25, 0.3, 0.0, 1.0):
        # x -> round(x * dim) in float32 (Python's round and np.rint both round half to even)
        lut = np.array([round(float(np.float32(x) * np.float32(dim))) for x in range(256)], dtype=np.uint8)
        for outline in (True, False):
            got = np.asarray(V.dim_outside(Image.fromarray(rgb), mask, dim, outline))
            want = np.where(mask[..., None], rgb, lut[rgb])
            if outline:
                want[ref_ring(mask)] = V.OUTLINE_COLOUR
            assert np.array_equal(got, want), (dim, outline)
    assert np.asarray(V.dim_outside(Image.fromarray(rgb), np.ones((4, 5)), 0.5)).tolist() == rgb.tolist()
    empty = np.asarray(V.dim_outside(Image.fromarray(rgb), np.zeros((4, 5)), 0.5))
    assert np.array_equal(empty, np.rint(rgb.astype(np.float32) * 0.5).astype(np.uint8))  # no outline
    assert np.array_equal(np.asarray(V.dim_outside(Image.fromarray(rgb), mask)),  # defaults: dim 0.25, outlined
                          np.asarray(V.dim_outside(Image.fromarray(rgb), mask, 0.25, True)))
    loose = V.dim_outside(Image.fromarray(rgb), mask * 0.5, 0.3)  # any non-zero value is inside
    assert np.array_equal(np.asarray(loose), np.asarray(V.dim_outside(Image.fromarray(rgb), mask, 0.3)))
    grey = Image.fromarray(rgb[..., 0])
    assert np.array_equal(np.asarray(V.dim_outside(grey, np.ones((4, 5), bool))), rgb[..., :1].repeat(3, 2))
    for dim in (-0.01, 1.01):
        with pytest.raises(ValueError, match=re.escape(f"dim must be a brightness factor in [0, 1]; got {dim}") + "$"):
            V.dim_outside(grey, mask, dim)
    with pytest.raises(ValueError, match=re.escape(
            "mask shape (5, 4) does not match image size 5x4 (masks must be rendered at the view size)")):
        V.dim_outside(grey, np.ones((5, 4), bool))


def box_mask(h, w, top, bottom, left, right):
    m = np.zeros((h, w), bool)
    m[top:bottom, left:right] = True
    return m


@pytest.mark.parametrize("mask, margin, min_size, box", [
    (box_mask(20, 30, 5, 9, 10, 16), 0.15, 0, (9, 3, 17, 11)),      # side 6 -> ceil(7.8) = 8, centred at (13, 7)
    (box_mask(20, 30, 5, 9, 10, 16), 0.5, 0, (7, 1, 19, 13)),       # side 12
    (box_mask(20, 30, 5, 9, 10, 16), 0.0, 0, (10, 4, 16, 10)),      # the box, squared to 6
    (box_mask(20, 30, 5, 9, 10, 16), 0.15, 11, (8, 2, 19, 13)),     # at least 11; centre 13 - 5.5 rounds to 8
    (box_mask(20, 30, 5, 9, 10, 16), 0.15, 48, (3, 0, 23, 20)),     # at most the shorter side, shifted inside
    (box_mask(20, 30, 0, 3, 27, 30), 0.15, 0, (26, 0, 30, 4)),      # at a corner
    (box_mask(20, 30, 0, 3, 27, 30), 0.15, 10, (20, 0, 30, 10)),    # at a corner: shifted inside
    (box_mask(30, 20, 10, 12, 5, 6), 0.15, 48, (0, 1, 20, 21)),     # at most the narrower side
    (box_mask(20, 30, 18, 20, 0, 1), 1.0, 0, (0, 14, 6, 20)),
    (box_mask(10, 12, 4, 5, 6, 7), 0.0, 0, (6, 4, 7, 5)),           # one pixel, no margin: a 1-pixel box
    (box_mask(10, 12, 4, 5, 6, 7), 0.0, 1, (6, 4, 7, 5)),
    (box_mask(10, 12, 4, 6, 6, 7), 0.25, 0, (5, 4, 8, 7)),          # side ceil(2 * 1.5) = 3; round(3.5) = 4
    (box_mask(10, 12, 0, 0, 0, 0), 0.15, 48, (0, 0, 12, 10)),       # empty: the whole image
])
def test_crop_box(mask, margin, min_size, box):
    assert V.crop_box(mask, margin, min_size) == box
    assert all(type(v) is int for v in V.crop_box(mask, margin, min_size))


def test_crop_box_defaults_and_refusals():
    assert V.crop_box(box_mask(100, 100, 40, 50, 40, 60)) == (26, 21, 74, 69)  # side max(ceil(20 * 1.3), 48)
    with pytest.raises(ValueError, match=re.escape("crop margin must be >= 0 (a fraction of the mask box); got -0.1")):
        V.crop_box(np.ones((2, 2)), -0.1)
    with pytest.raises(ValueError, match=re.escape("mask must be 2-D [H, W]; got shape (1, 2, 2)") + "$"):
        V.crop_box(np.ones((1, 2, 2)))


def test_crop_view():
    big = Image.fromarray((np.arange(100 * 100 * 3) % 251).astype(np.uint8).reshape(100, 100, 3))
    assert np.array_equal(np.asarray(V.crop_view(big, box_mask(100, 100, 40, 50, 40, 60))),  # margin 0.15, side 48
                          np.asarray(big.crop((26, 21, 74, 69)).resize((100, 100), Image.BICUBIC)))
    im = Image.fromarray(np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3))
    mask = box_mask(20, 30, 5, 9, 10, 16)
    got = V.crop_view(im, mask, 0.15, 0, 12)
    assert got.size == (12, 12)
    assert np.array_equal(np.asarray(got), np.asarray(im.crop((9, 3, 17, 11)).resize((12, 12), Image.BICUBIC)))
    got = V.crop_view(im, mask, min_size=0)
    assert got.size == (30, 30)
    assert np.array_equal(np.asarray(got), np.asarray(im.crop((9, 3, 17, 11)).resize((30, 30), Image.BICUBIC)))
    assert V.crop_view(im, mask, 0.5, 0).size == (30, 30)
    assert np.array_equal(np.asarray(V.crop_view(im, mask, 0.5, 0, 12)),
                          np.asarray(im.crop((7, 1, 19, 13)).resize((12, 12), Image.BICUBIC)))
