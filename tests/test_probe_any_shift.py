"""Any shift can be the probe set: one on disk without a cue (a Waterbirds-format split, a plain image folder) is
written under JOBDIR/probe/NAME as it is, with its own groups, and recorded; it used to crash in with_probe
(AttributeError: the cue-less dataset had no render)."""
import csv
from pathlib import Path

import numpy as np
import pytest

import group_data
from neuroscribe import pipeline
from neuroscribe.config import load_config
from neuroscribe.datasets.geometry import ViewGeometry
from neuroscribe.datasets.probe import load_image, manifest, open_probe_set, sample_root
from neuroscribe.record.recorder import record
from neuroscribe.runtime import job_model


@pytest.fixture(scope="module")
def wb(tmp_path_factory):
    return group_data.waterbirds(tmp_path_factory.mktemp("wb") / "wb", per_class=6)


@pytest.mark.parametrize("kind", ["waterbirds", "folder"])
def test_cue_less_probe_is_written_as_it_is_and_recorded(kind, wb, tmp_path):
    data = ({"root": str(wb), "format": "waterbirds", "split": "train"} if kind == "waterbirds"
            else {"root": str(sample_root()), "split": "val", "limit": 6})
    cfg = load_config(None, {"model": {"spec": "torchvision:resnet18@none", "num_classes": 2}, "layers": ["layer4"],
                             "shifts": [{"name": "mine", "data": data}], "probe": "mine", "record": {"k": 2},
                             "out": str(tmp_path / "job"), "progress": False, "workers": 0, "batch_size": 8})
    probe_cfg = pipeline.with_probe(cfg)
    out = tmp_path / "job" / "probe" / "mine"
    assert Path(probe_cfg.data.root) == out / "manifest.csv"
    src = open_probe_set(data["root"], data.get("format", "auto"), data["split"], data.get("limit"), cfg.seed)
    with open(out / "manifest.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [Path(r["source"]) for r in rows] == [s.path for s in src.samples]
    assert [r["group"] for r in rows] == [s.group or "" for s in src.samples]  # the data's own groups kept
    assert {r["has_cue"] for r in rows} == {"0"}
    lm, _ = job_model(cfg)
    view = ViewGeometry(lm.preprocess, 224)
    probe = manifest(out / "manifest.csv")  # planted: redrawn from the sources, no image written
    assert not list(out.rglob("*.png")) and probe.planting.cue is None
    for i, s in enumerate(src.samples[:3]):  # the model's field of view at the view size, nothing drawn
        got = np.asarray(probe.load(i))
        assert got.shape == (224, 224, 3) and np.array_equal(got, np.asarray(view(load_image(s.path))))
    rec = record(probe_cfg)
    assert (Path(rec) / "meta.json").is_file() and (tmp_path / "job" / "record.json").is_file()
