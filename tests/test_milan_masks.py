"""`export-milan` masks follow MILAN's own upsampling (issue #11 item 6).

MILAN (evandez/neuron-descriptions, ``src/exemplars/compute.py`` -> NetDissect ``ImageVisualizer.pytorch_mask``)
samples the map bilinearly with pixel-centre alignment and treats everything past the outermost cell centres as
zero (``grid_sample(..., padding_mode='zeros', align_corners=True)`` on its own grid), then keeps ``> level``.
The references below are written independently of that code and of ours: the same sampling as ``F.pad`` with
zeros + ``F.interpolate(align_corners=False)`` + a centre crop, and as a separable interpolation matrix in NumPy.
The recording is synthetic (fixed maps, tiny images), so every test runs well under a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from neuroscribe import io
from neuroscribe.record.exemplars import Recording, milan_upsample

K = 4        # exemplars per unit
N_IMAGES = 5


# ---- independent references of MILAN's convention --------------------------------------------------------------

def ref_interpolate(maps: torch.Tensor, size: int) -> torch.Tensor:
    """MILAN's upsampling with F.interpolate: a ring of zero cells, half-pixel bilinear resize (one cell = size/n
    pixels), centre crop. Needs the map side to divide ``size``."""
    n_h, n_w = maps.shape[-2:]
    assert size % n_h == 0 and size % n_w == 0
    ch, cw = size // n_h, size // n_w
    padded = F.pad(maps.float()[:, None], (1, 1, 1, 1))
    big = F.interpolate(padded, size=(size + 2 * ch, size + 2 * cw), mode="bilinear", align_corners=False)
    return big[:, 0, ch:ch + size, cw:cw + size]


def ref_numpy(m: np.ndarray, size: int) -> np.ndarray:
    """The same for any map of side >= 2, from first principles: output pixel t samples map position
    (t + 0.5) * n / size - 0.5, linearly between the two nearest cells, a cell past the edge counting as 0."""
    def matrix(n: int) -> np.ndarray:
        x = (np.arange(size) + 0.5) * n / size - 0.5
        i0 = np.floor(x).astype(int)
        frac = x - i0
        w = np.zeros((size, n))
        for i, wt in ((i0, 1 - frac), (i0 + 1, frac)):
            ok = (i >= 0) & (i < n)
            w[np.arange(size)[ok], i[ok]] += wt[ok]
        return w
    return matrix(m.shape[0]) @ m.astype(np.float64) @ matrix(m.shape[1]).T


def iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    union = (a | b).sum()
    return 1.0 if union == 0 else float((a & b).sum() / union)


# ---- fixed activation maps -------------------------------------------------------------------------------------

def structured(n: int) -> np.ndarray:
    """[K, n, n]: maximum in a corner, on the right edge (ramp), along the top row, and a centred blob."""
    y, x = np.mgrid[0:n, 0:n].astype(np.float64)
    c = (n - 1) / 2
    return np.stack([
        np.exp(-(x ** 2 + y ** 2) / (0.08 * n * n)) * 3.0,           # peak at the (0, 0) corner cell
        x / max(n - 1, 1) * 2.0 + 0.1 * np.sin(y),                   # ramp, max along the right edge
        np.exp(-(y ** 2) / (0.05 * n * n)) * (1.5 + 0.2 * np.cos(x)),  # bar along the top row
        np.exp(-((x - c) ** 2 + (y - c) ** 2) / (0.04 * n * n)) * 2.0,  # centred blob, away from the border
    ])


def unit_maps(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """[3, K, n, n] maps and [3] thresholds: random ReLU-like (70% quantile), structured (half the max),
    signed random with a negative threshold (the 30% quantile)."""
    rng = np.random.default_rng(seed)
    rand = np.maximum(rng.normal(size=(K, n, n)), 0) * 2
    signed = rng.normal(size=(K, n, n))
    maps = np.stack([rand, structured(n), signed]).astype(np.float16)  # stored as a recording stores them
    m32 = maps.astype(np.float32)
    thr = np.array([np.quantile(m32[0], 0.7) + 1e-3, 0.5 * m32[1].max() + 1e-3,
                    np.quantile(m32[2], 0.3) + 1e-3], dtype=np.float32)
    assert thr[2] < 0
    return maps, thr


GRIDS = {"c7": (7, 224), "c14": (14, 224), "c28": (28, 224), "c13": (13, 224), "c4": (4, 64), "c2": (2, 64)}


def make_recording(root: Path, crop: int, layers: dict[str, int]) -> Recording:
    """A complete on-disk recording with the fixed maps above (``layers``: name -> map side)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = np.random.default_rng(0)
    data = root / "data"
    data.mkdir(parents=True)
    paths = []
    for i in range(N_IMAGES):
        Image.fromarray(rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)).save(data / f"{i}.png")
        paths.append(f"{i}.png")
    rec_dir = root / "rec"
    meta = {"preprocess": {"resize": crop, "crop": crop}, "data_root": str(data), "layers": {}}
    for li, (name, n) in enumerate(layers.items()):
        maps, thr = unit_maps(n, seed=n)
        ids = torch.tensor([[(u + r) % N_IMAGES for r in range(K)] for u in range(3)], dtype=torch.int64)
        io.save_tensors(rec_dir / "layers" / f"{name}.safetensors",
                        {"maps": torch.from_numpy(maps), "threshold": torch.from_numpy(thr), "ids": ids,
                         "scores": torch.from_numpy(maps.reshape(3, K, -1).max(-1).astype(np.float32))})
        meta["layers"][name] = {"kind": "conv", "units": 3, "map_shape": [n, n], "file": f"layers/{name}.safetensors"}
    pq.write_table(pa.table({"path": paths, "label": [0] * N_IMAGES}), rec_dir / "images.parquet")
    (rec_dir / "meta.json").write_text(json.dumps(meta))
    return Recording(rec_dir)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """Both crops' recordings, each exported once in MILAN's layout: ``layer -> (rec, masks [3, K, S, S])``."""
    root = tmp_path_factory.mktemp("milanmask")
    out = {}
    for crop in (224, 64):
        layers = {name: n for name, (n, c) in GRIDS.items() if c == crop}
        rec = make_recording(root / str(crop), crop, layers)
        milan = rec.export_milan(root / f"milan{crop}")
        for name in layers:
            masks = np.load(milan / name / "masks.npy")
            assert masks.dtype == np.uint8 and masks.shape == (3, K, 1, crop, crop) and set(np.unique(masks)) <= {0, 1}
            out[name] = (rec, masks[:, :, 0].astype(bool))
    return out


def reference_masks(rec: Recording, layer: str, unit: int, how: str) -> np.ndarray:
    maps = rec.tensors(layer)["maps"][unit].float()
    s, thr = rec.preprocess.crop, rec.threshold(layer, unit)
    if how == "interpolate":
        return (ref_interpolate(maps, s) > thr).numpy()
    return np.stack([ref_numpy(m, s) > thr for m in maps.numpy()])


# ---- the tests -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layer", list(GRIDS))
@pytest.mark.parametrize("unit", [0, 1, 2], ids=["random", "structured-border", "signed-negative-threshold"])
def test_exported_masks_match_milan_reference(exported, layer, unit):
    rec, masks = exported[layer]
    n, crop = GRIDS[layer]
    refs = ["numpy"] + (["interpolate"] if crop % n == 0 else [])
    for how in refs:
        ref = reference_masks(rec, layer, unit, how)
        ious = [iou(a, b) for a, b in zip(masks[unit], ref)]
        assert min(ious) >= 0.95, (how, ious)
        assert min(ious) > 0.999, (how, ious)  # in fact equal up to float rounding at the threshold
    assert masks[unit].any() and not masks[unit].all()


@pytest.mark.parametrize("layer", ["c7", "c14", "c4"])
def test_old_edge_repeating_masks_fail_on_border_maxima(exported, layer):
    """The previous export (now ``convention="edge"``, still used by the views) repeats the edge cells, so a
    unit whose maximum is on the border gets the half-cell border band MILAN leaves out."""
    rec, masks = exported[layer]
    old = rec.masks(layer, 1, convention="edge")
    ref = reference_masks(rec, layer, 1, "interpolate")
    old_ious = [iou(a, b) for a, b in zip(old, ref)]
    assert min(old_ious[:3]) < 0.95, old_ious     # corner peak, right-edge ramp, top bar
    assert old_ious[3] == 1.0                      # the centred blob never reaches the border: no difference
    assert min(iou(a, b) for a, b in zip(masks[1], ref)) > 0.999
    # the difference lies only within half a cell of the border
    n, s = GRIDS[layer][0], rec.preprocess.crop
    band = s // n // 2
    assert np.array_equal(old[:, band:-band, band:-band], masks[1][:, band:-band, band:-band])


def test_views_keep_edge_convention(exported):
    rec, _ = exported["c7"]
    edge = F.interpolate(rec.tensors("c7")["maps"][1].float()[:, None], size=(224, 224), mode="bilinear",
                         align_corners=False)[:, 0] > rec.threshold("c7", 1)
    assert np.array_equal(rec.masks("c7", 1), edge.numpy())
    with pytest.raises(ValueError, match="convention"):
        rec.upsampled("c7", 1, convention="nearest")


@pytest.mark.parametrize("shape,size", [((7, 7), 224), ((14, 14), 224), ((7, 5), 224), ((13, 13), 224),
                                        ((3, 3), 10)])
def test_milan_upsample_values(shape, size):
    maps = torch.from_numpy(np.random.default_rng(1).normal(size=(2, *shape)).astype(np.float32))
    got = milan_upsample(maps, size).numpy()
    for g, m in zip(got, maps.numpy()):
        np.testing.assert_allclose(g, ref_numpy(m, size), atol=1e-5)
    if size % shape[0] == 0 and size % shape[1] == 0:
        np.testing.assert_allclose(got, ref_interpolate(maps, size).numpy(), atol=1e-5)


def test_milan_upsample_one_cell_is_constant():
    """A 1x1 map: MILAN's grid (align_corners=True over one cell) samples the cell everywhere, no zero fade."""
    got = milan_upsample(torch.tensor([[[2.5]]]), 224)
    assert got.shape == (1, 224, 224) and torch.all(got == 2.5)
    with pytest.raises(ValueError, match=r"\[N, h, w\]"):
        milan_upsample(torch.zeros(7, 7), 224)
