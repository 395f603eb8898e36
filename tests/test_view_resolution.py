"""The describer sees what a person would: views of a model run at 64 px are cut from the source photos at the view
size (224 px), and cues planted into the probe set are drawn at that size, so RapidOCR (real, offline) reads a
faint caption or watermark from the views that is a blur of a few pixels in the model's input."""

from __future__ import annotations

import csv
import difflib
import json
from pathlib import Path

import numpy as np
import pytest
import torch.nn.functional as F
from PIL import Image

from neuroscribe import pipeline
from neuroscribe.config import TaggerConfig, load_config
from neuroscribe.datasets.probe import load_image, open_probe_set, sample_root
from neuroscribe.describe.views import ViewGeometry, image_cache, model_box, unit_views, view_size
from neuroscribe.record import Recording, record
from neuroscribe.models import Preprocess

LOW = {"resize": 73, "crop": 64}  # the model's input: 64 px
FAINT_TEXT = {"kind": "text", "size": 0.08, "opacity": 0.5, "position": "bottom-left"}  # ~5 px of font at 64 px
WATERMARK = {"kind": "watermark", "size": 0.08, "opacity": 0.7}  # iStock, semi-transparent, 5 px high at 64 px


def _cfg(out: Path, **over):
    base = {"model": "efficientnet-lite0", "preprocess": LOW, "layers": ["_blocks.6", "_fc"],
            "data": {"split": "val", "limit": 40}, "record": {"k": 5}, "out": str(out), "device": "cpu",
            "workers": 0, "progress": False, "batch_size": 20}
    return load_config(None, {**base, **over})


@pytest.fixture(scope="module")
def low_rec(tmp_path_factory) -> Recording:
    """EfficientNet-Lite0 run at 64 px on 40 shipped val photos (no cue)."""
    cfg = _cfg(tmp_path_factory.mktemp("low") / "job")
    record(cfg)
    return Recording.open(cfg.out)


def _probe_job(out: Path, cue: dict, limit: int = 40) -> tuple[Recording, dict[int, str]]:
    """A 64 px job whose probe is a cued shift (``limit`` val photos, the cue on half of them); returns its
    recording and {image id: cue token}."""
    shift = {"name": "cued", "data": {"split": "val", "limit": limit}, "cue": cue, "fraction": 0.5,
             "correlation": "match", "seed": 3}
    cfg = pipeline.with_probe(_cfg(out, layers=["_fc"], shifts=[shift], probe="cued"))
    record(cfg)
    with open(Path(cfg.data.root), newline="") as f:
        tokens = {i: r["cue_token"] for i, r in enumerate(csv.DictReader(f)) if r["has_cue"] == "1"}
    return Recording.open(cfg.out), tokens


def test_model_box_is_torchvisions_resize_and_crop() -> None:
    """Resampling the box straight from the source gives the model's own input (to rounding)."""
    photo = load_image(next((sample_root() / "val").glob("*/*.jpg")))
    for pre in (Preprocess(resize=73, crop=64), Preprocess(resize=256, crop=224),
                Preprocess(resize=64, crop=64, interpolation="bicubic")):
        for src in (photo, photo.transpose(Image.Transpose.TRANSPOSE), photo.resize((50, 41))):
            ref = np.asarray(pre.geometry()(src)).astype(int)
            got = src.resize((pre.crop, pre.crop), Image.Resampling[pre.interpolation.upper()],
                             box=model_box(pre, *src.size))
            assert np.abs(np.asarray(got).astype(int) - ref).max() <= 1
    assert model_box(Preprocess(resize=32, crop=64), 100, 80) is None  # a padded crop has no box
    padded = ViewGeometry(Preprocess(resize=32, crop=64), 224)(photo)
    assert padded.size == (224, 224)
    assert ViewGeometry(Preprocess(), 224)(photo).tobytes() == Preprocess().geometry()(photo).tobytes()
    assert view_size(64) == 224 and view_size(384) == 384 and view_size(64, 160) == 160


def test_views_of_a_64px_model_are_cut_from_the_source(low_rec: Recording) -> None:
    rec = low_rec
    assert rec.preprocess.crop == 64 and rec.view_size == 224
    unit = next(u for u in range(rec.units("_blocks.6")) if 0.02 < rec.masks("_blocks.6", u)[0].mean() < 0.6)
    uv = unit_views(rec, "_blocks.6", unit)
    assert all(im.size == (224, 224) for lst in (uv.images, uv.views, uv.crops) for im in lst)
    # masks: the unit's activation grid upsampled straight to the view, thresholded
    maps = rec.tensors("_blocks.6")["maps"][unit].float()
    up = F.interpolate(maps[:, None], size=(224, 224), mode="bilinear", align_corners=False)[:, 0]
    np.testing.assert_array_equal(np.stack(uv.masks), (up > rec.threshold("_blocks.6", unit)).numpy())
    for i, im in zip(uv.image_ids, uv.images):
        model_px = np.asarray(rec.image(i)).astype(float)   # what the model saw, 64 px
        assert model_px.shape == (64, 64, 3)
        # the same field of view: the view shrunk to 64 px is the model's input, to resampling noise
        assert np.abs(np.asarray(im.resize((64, 64), Image.BILINEAR)).astype(float) - model_px).mean() < 3
        # ... with detail the model's pixels do not have (a blown-up 64 px image is smooth)
        blown_up = np.asarray(rec.image(i).resize((224, 224), Image.BICUBIC)).astype(float)
        sharp = np.asarray(im).astype(float)
        assert np.abs(np.diff(sharp, axis=1)).mean() > 1.3 * np.abs(np.diff(blown_up, axis=1)).mean()
    # another view size: its own cache, its own masks
    small = unit_views(rec, "_blocks.6", unit, size=160)
    assert small.images[0].size == (160, 160) and small.masks[0].shape == (160, 160)
    assert image_cache(rec, size=160) is not image_cache(rec)


def test_probe_cue_is_drawn_at_the_view_size_and_downsampled_for_the_model(tmp_path: Path) -> None:
    rec, tokens = _probe_job(tmp_path / "job", FAINT_TEXT)
    probe_dir = tmp_path / "job" / "probe" / "cued"
    info = json.loads((probe_dir / "probe.json").read_text())
    pre = info["model_preprocess"]
    assert info["view_size"] == 224 and (pre["resize"], pre["crop"]) == (73, 64)
    # the probe is the model's field of view at 224 px, the cue drawn there (redrawn from the source photo, see
    # tests/test_planted.py); record resizes it to 64 px
    assert rec.preprocess.resize == rec.preprocess.crop == 64
    i = next(iter(tokens))
    stored = rec.probe_image(i)
    assert stored.size == (224, 224)
    plain = ViewGeometry(Preprocess(**LOW), 224)(load_image(rec.image_paths[i]))  # the source, nothing drawn
    assert np.abs(np.asarray(stored, dtype=int) - np.asarray(plain, dtype=int)).max() > 60  # the cue is there
    model_px = rec.image(i)  # the model's input: the stored drawing, downsampled with the model's interpolation
    np.testing.assert_array_equal(np.asarray(model_px), np.asarray(stored.resize((64, 64), Image.BILINEAR)))
    assert rec.image(i, rec.view_size).tobytes() == stored.tobytes()  # the views are the stored pixels
    # clean images of the probe are the source's field of view, as views of an uncued job would be
    probe = open_probe_set(sample_root(), split="val", limit=40)
    clean = next(j for j in range(len(probe)) if j not in tokens)
    src = ViewGeometry(Preprocess(**LOW), 224)(load_image(probe.samples[clean].path))
    assert rec.image(clean, 224).tobytes() == src.tobytes()


def _reads(ocr, image: Image.Image, token: str) -> bool:
    """Whether OCR reads ``token`` in ``image`` (spaces and case ignored, one slip in five letters allowed)."""
    t = token.lower().replace(" ", "")
    for hit in ocr.read(image):
        got = hit.text.lower().replace(" ", "")
        if t in got or difflib.SequenceMatcher(None, t, got).ratio() >= 0.8:
            return True
    return False


@pytest.mark.parametrize("cue", [FAINT_TEXT, WATERMARK], ids=["faint-text", "watermark"])
def test_ocr_reads_faint_cues_from_the_views_not_from_the_models_pixels(tmp_path: Path, cue: dict) -> None:
    """Every distinct exemplar of 40 logit units that carries the cue: read from its view (>= 80%) and from the
    model's 64 px input, enlarged the same way (~0%): the test fails if views fall back to the model's pixels."""
    from neuroscribe.describe.offline import describer_ocr
    rec, tokens = _probe_job(tmp_path / "job", cue, limit=60)
    views: dict[int, Image.Image] = {}  # image id -> the exemplar as the describer sees it (flat layer: whole)
    for u in range(40):
        uv = unit_views(rec, "_fc", u)
        views.update(zip(uv.image_ids, uv.images))
    cued = sorted(i for i in views if i in tokens)
    assert len(cued) >= 20, f"only {len(cued)} cued exemplars among {len(views)}"
    ocr = describer_ocr(TaggerConfig())
    view_rate = np.mean([_reads(ocr, views[i], tokens[i]) for i in cued])
    model_rate = np.mean([_reads(ocr, rec.image(i), tokens[i]) for i in cued])  # the model's 64 px input
    clean = sorted(i for i in views if i not in tokens)
    word = (lambda i: "istock") if cue["kind"] == "watermark" else (lambda i: rec.meta["class_names"][rec.labels[i]])
    false_rate = np.mean([_reads(ocr, views[i], word(i)) for i in clean]) if clean else 0.0
    print(f"{cue['kind']}: read in {view_rate:.0%} of {len(cued)} views, {model_rate:.0%} of the model's pixels, "
          f"{false_rate:.0%} of {len(clean)} clean views")
    assert view_rate >= 0.8 and model_rate <= 0.1 and false_rate <= 0.1
