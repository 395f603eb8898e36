"""The group formats (datasets/readers.py) read small files in exactly the field's formats, built over the shipped
photos with the cue drawn by the test on the cue group's images; the config names them and bad input is refused
with an error naming what is wrong."""
import numpy as np
import pytest
from PIL import Image

import group_data
from neuroscribe.config import ConfigError, load_config
from neuroscribe.datasets.probe import ProbeSetError, open_probe_set
from neuroscribe.datasets.readers import group_value


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("groups")
    return {"waterbirds": group_data.waterbirds(root / "wb"), "celeba": group_data.celeba(root / "celeba"),
            "csv": group_data.table(root / "csv"), "parquet": group_data.table(root / "pq", parquet=True)}


def _open(sets, kind, split=None, limit=None, seed=0):
    fmt = {"csv": "table", "parquet": "table"}.get(kind, kind)
    extra = {"target": "Blond_Hair", "spurious": "Male"} if kind == "celeba" else {}
    return open_probe_set(sets[kind], fmt, split, limit, seed, **extra)


def _patched(path) -> bool:
    """Whether the test's patch (class colour 3, top-left) is in the image's pixels."""
    from neuroscribe.datasets.cues import class_colour
    a = np.asarray(Image.open(path).convert("RGB"), dtype=np.int64)
    h, w, _ = a.shape
    corner = a[int(0.05 * h):int(0.3 * h), int(0.05 * w):int(0.3 * w)]
    return bool(np.abs(corner - np.array(class_colour(3))).max() < 24)


@pytest.mark.parametrize("kind", ["waterbirds", "celeba", "csv", "parquet"])
def test_reader_splits_labels_and_groups_follow_the_files(sets, kind):
    """Each split holds the rows the file puts there; every image's label is its row's; groups are CLASS/VALUE with
    the VALUE of the cue group exactly on the images whose pixels carry the patch."""
    rows = group_data.plan()
    everything = _open(sets, kind)
    assert len(everything) == len(rows)
    cue_value = {"waterbirds": "water", "celeba": "Male", "csv": "patch", "parquet": "patch"}[kind]
    for split in ("train", "val", "test"):
        ps = _open(sets, kind, split)
        want = [r for r in rows if r["split"] == split]
        assert len(ps) == len(want)
        assert sorted(s.label for s in ps.samples) == sorted(r["y"] for r in want)
        for s in ps.samples:
            cls, value = s.group.rsplit("/", 1)
            assert cls == ps.class_names[s.label] and group_value(s.group) == value
            assert (value == cue_value) == _patched(s.path), s
    assert len({s.group for s in _open(sets, kind, "test").samples}) == 4  # every class x group cell


def test_reader_class_names(sets):
    assert _open(sets, "waterbirds").class_names == ["landbird", "waterbird"]
    assert _open(sets, "celeba").class_names == ["not Blond_Hair", "Blond_Hair"]
    assert _open(sets, "csv").class_names == ["parachute", "tench"]  # names: sorted, as a manifest's
    auto = open_probe_set(sets["parquet"])  # format auto: a .parquet file is a table
    assert auto.source == "table"
    assert [s.group for s in auto.samples] == [s.group for s in _open(sets, "parquet").samples]


def test_limit_is_a_seeded_sample_stratified_by_class_and_group(sets):
    """data.limit on a group format draws from every class x group cell, seeded, not the first rows."""
    full = _open(sets, "waterbirds", "train")
    cells = {}
    for s in full.samples:
        cells.setdefault(s.group, []).append(s.path)
    n = 2 * len(cells)
    a, b, c = (_open(sets, "waterbirds", "train", n, seed) for seed in (0, 0, 1))
    assert [s.path for s in a.samples] == [s.path for s in b.samples]
    assert [s.path for s in a.samples] != [s.path for s in c.samples]
    got = {}
    for s in a.samples:
        got[s.group] = got.get(s.group, 0) + 1
    assert sum(got.values()) == n and all(got.get(g, 0) >= min(2, len(cells[g])) for g in cells)
    assert [s.path for s in a.samples] != [s.path for s in full.samples[:n]]


def test_splits_are_disjoint(sets):
    for kind in ("waterbirds", "celeba", "csv"):
        paths = [{s.path for s in _open(sets, kind, sp).samples} for sp in ("train", "val", "test")]
        assert not paths[0] & paths[1] and not paths[0] & paths[2] and not paths[1] & paths[2]


def test_bad_files_are_refused_naming_what_is_wrong(sets, tmp_path):
    wb = tmp_path / "metadata.csv"
    wb.write_text("img_filename,y,split\na.jpg,0,0\n")
    with pytest.raises(ProbeSetError, match="missing \\['place'\\]"):
        open_probe_set(wb, "waterbirds")
    wb.write_text("img_filename,y,split,place\na.jpg,0,5,1\n")
    with pytest.raises(ProbeSetError, match="row 2: column 'split' is '5'"):
        open_probe_set(wb, "waterbirds")
    wb.write_text("img_filename,y,split,place\n../a.jpg,0,0,1\n")
    with pytest.raises(ProbeSetError, match="escapes"):
        open_probe_set(wb, "waterbirds")
    with pytest.raises(ProbeSetError, match="nearest: \\['Blond_Hair'\\]"):
        open_probe_set(sets["celeba"], "celeba", target="Blond_hair", spurious="Male")
    with pytest.raises(ProbeSetError, match="no images in split 'dev'"):
        open_probe_set(sets["csv"], "table", "dev")
    bad = tmp_path / "t.csv"
    bad.write_text("path,label\na.jpg,cat\n")
    with pytest.raises(ProbeSetError, match="missing \\['group'\\]"):
        open_probe_set(bad, "table")


def test_config_names_the_readers_and_checks_their_fields(sets):
    cfg = load_config(None, {"data": {"root": str(sets["celeba"]), "format": "celeba", "target": "Blond_Hair",
                                      "spurious": "Male", "split": "test"},
                             "shifts": [{"name": "tr", "data": {"root": str(sets["celeba"]), "format": "celeba",
                                                                "target": "Blond_Hair", "spurious": "Male",
                                                                "split": "train"}}], "probe": "tr"})
    assert cfg.data.target == "Blond_Hair"
    with pytest.raises(ConfigError, match="format celeba needs target"):
        load_config(None, {"data": {"root": "x", "format": "celeba", "target": "Blond_Hair"}})
    with pytest.raises(ConfigError, match="only format celeba takes them"):
        load_config(None, {"data": {"root": "x", "format": "waterbirds", "target": "Blond_Hair"}})
    with pytest.raises(ConfigError, match="record reads it only as the probe"):
        load_config(None, {"data": {"root": "x", "format": "celeba", "target": "A", "spurious": "B"}})
    with pytest.raises(ConfigError, match="group_shift and flag.group_cue go together"):
        load_config(None, {"flag": {"group_cue": "water"}})


def test_run_refuses_choosing_sets_that_share_images_with_a_test_set(sets, tmp_path):
    """Validation named on the test split (the same images as data) stops `run` before any work; the data's own
    val split passes the check."""
    from neuroscribe import pipeline
    from neuroscribe.datasets.sets import check_disjoint
    split = lambda s: {"root": str(sets["waterbirds"]), "format": "waterbirds", "split": s}  # noqa: E731
    job = {"model": {"spec": "torchvision:resnet18@none", "num_classes": 2}, "layers": ["layer4"],
           "data": split("test"),
           "shifts": [{"name": "tr", "data": split("train")}, {"name": "v", "data": split("val")}],
           "probe": "tr", "ablate": {"validation": "v"}, "out": str(tmp_path / "job"), "progress": False}
    check_disjoint(load_config(None, job))
    job["shifts"][1]["data"] = split("test")
    with pytest.raises(ValueError, match=r"data \(a test set\) shares 6 images with shift 'v'"):
        pipeline.run(load_config(None, job))
    assert not (tmp_path / "job" / "record.json").exists()
