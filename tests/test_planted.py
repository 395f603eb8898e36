"""A planted probe is kept as what redraws it (source photo, cue, seed), not as image copies: the model and the
describer see exactly the pixels the old written copies held, in every process, and the recording alone redraws
them (datasets/planted.py)."""

from __future__ import annotations

import csv
import random
import shutil
from pathlib import Path

import pytest
import torch

from neuroscribe import pipeline
from neuroscribe.config import load_config
from neuroscribe.datasets.cues import render_cue
from neuroscribe.datasets.geometry import ViewGeometry
from neuroscribe.datasets.probe import IMAGE_EXTENSIONS, ImageDataset, ProbeSetError, load_image, manifest
from neuroscribe.datasets.sets import shift_set
from neuroscribe.record import Recording, record
from neuroscribe.runtime import job_model

CUE = {"kind": "text", "size": 0.15, "position": "random", "background": None, "stroke": 0.1}


def _cfg(out: Path, cue: dict = CUE):
    shift = {"name": "cued", "data": {"split": "val", "limit": 16}, "cue": cue, "fraction": 0.5,
             "correlation": "match", "seed": 5}
    return load_config(None, {"model": "efficientnet-lite0", "preprocess": {"resize": 73, "crop": 64},
                              "layers": ["_fc"], "shifts": [shift], "probe": "cued", "record": {"k": 3},
                              "out": str(out), "device": "cpu", "workers": 0, "progress": False, "batch_size": 8})


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    cfg = _cfg(tmp_path_factory.mktemp("planted") / "job")
    probe_cfg = pipeline.with_probe(cfg)
    record(probe_cfg)
    return cfg, probe_cfg


def _written_copies(cfg):
    """What the probe used to be: the shift's images in the model's field of view at 224 px, the cue drawn there
    (``materialise`` of this dataset wrote exactly these pixels as lossless PNGs)."""
    lm, _ = job_model(cfg)
    ds, _, _ = shift_set(cfg.shifts[0], lm.preprocess, cfg.seed, lm.class_names)
    ds.transform, ds.geometry = None, ViewGeometry(lm.preprocess, 224)
    return ds


def test_no_image_is_written_and_every_image_is_the_old_copy_pixel_for_pixel(planted):
    cfg, probe_cfg = planted
    probe_dir = Path(probe_cfg.data.root).parent
    assert not [p for p in probe_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS]
    probe = manifest(probe_cfg.data.root)
    old = _written_copies(cfg)
    assert probe.source == "planted" and len(probe) == len(old) == 16
    cued = [i for i in range(len(probe)) if probe.samples[i].cue is not None]
    assert 0 < len(cued) < 16 and cued == [i for i in range(16) if old.plan()[i]["has_cue"]]
    for i in range(len(probe)):
        assert probe.samples[i].path == Path(old.samples[i][0]).resolve()
        assert probe.load(i).tobytes() == old.render(i)[0].tobytes()
    # the model's input: that picture resized to its 64 px crop, as the record pass reads it
    x, sid, _ = ImageDataset(probe, job_model(probe_cfg)[0].preprocess.transform())[cued[0]]
    assert x.shape == (3, 64, 64) and sid == cued[0]
    ref = job_model(probe_cfg)[0].preprocess.transform()(old.render(cued[0])[0])
    assert torch.equal(x, ref)


def test_the_seed_decides_the_drawing(planted):
    """A row's draw_seed is what places its cue: another seed draws it elsewhere (position: random)."""
    cfg, probe_cfg = planted
    probe = manifest(probe_cfg.data.root)
    i = next(i for i in range(len(probe)) if probe.samples[i].cue is not None)
    cls, seed = probe.samples[i].cue
    a = probe.planting.render(probe.samples[i].path, (cls, seed))
    b = probe.planting.render(probe.samples[i].path, (cls, seed + 1))
    assert a.tobytes() == probe.load(i).tobytes() and a.tobytes() != b.tobytes()
    # the drawing from first principles: the source's field of view at 224 px, the class name drawn with that seed
    lm, _ = job_model(cfg)
    view = ViewGeometry(lm.preprocess, 224)(load_image(probe.samples[i].path))
    name = lm.class_names[cls]
    assert render_cue(view, CUE, name, random.Random(seed)).image.tobytes() == a.tobytes()


def test_the_recording_alone_redraws_its_images(planted):
    """meta.json keeps the planting and images.parquet each image's cue: views need no probe folder."""
    cfg, probe_cfg = planted
    rec = Recording.open(cfg.out)
    assert rec.meta["planted"]["view_size"] == 224 and rec.meta["planted"]["cue"]["position"] == "random"
    old = _written_copies(cfg)
    ids = sorted({e.image_id for u in range(10) for e in rec.exemplars("_fc", u)})
    want = {i: old.render(i)[0] for i in ids}
    probe_dir = Path(probe_cfg.data.root).parent
    shutil.rmtree(probe_dir)
    fresh = Recording.open(cfg.out)  # nothing cached from before the folder went
    for i in ids:
        assert fresh.image(i, 224).tobytes() == want[i].tobytes()
        assert fresh.image(i).tobytes() == want[i].resize((64, 64), resample=2).tobytes()  # what the model saw
    pipeline.with_probe(cfg)  # the folder comes back as it was: same rows
    assert (probe_dir / "planted.json").is_file()


def test_a_planted_manifest_needs_absolute_sources_and_integer_seeds(planted, tmp_path):
    _, probe_cfg = planted
    src = Path(probe_cfg.data.root).parent
    for name in ("planted.json", "shift.json"):
        shutil.copy(src / name, tmp_path / name)
    rows = list(csv.DictReader(open(src / "manifest.csv", newline="")))
    cued = next(k for k, r in enumerate(rows) if r["has_cue"] == "1")

    def write(rows):
        with open(tmp_path / "manifest.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)

    write(rows)
    assert len(manifest(tmp_path / "manifest.csv")) == 16  # a copy elsewhere reads the same photos
    bad = [dict(r) for r in rows]
    bad[cued]["draw_seed"] = "x"
    write(bad)
    with pytest.raises(ProbeSetError, match=f"row {cued + 2}: has_cue is set but cue_class / draw_seed"):
        manifest(tmp_path / "manifest.csv")
    bad = [dict(r) for r in rows]
    bad[0]["source"] = bad[0]["path"] = "val/a.jpg"
    write(bad)
    with pytest.raises(ProbeSetError, match="row 2: a planted probe names its source photos by absolute path"):
        manifest(tmp_path / "manifest.csv")
