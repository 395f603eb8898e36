"""Manifest labels: integers are indices into the model's class list, names match by name, mixing is an error, and
every label problem stops a job at its start (issue #19). Shipped photos only; no training, no recording."""
import csv
import json
import shutil

import pytest
import torch
from torch import nn

from neuroscribe import pipeline
from neuroscribe.config import DataConfig, ShiftSetConfig, load_config
from neuroscribe.datasets.probe import load_image, open_probe_set, sample_root
from neuroscribe.datasets.sets import class_index
from neuroscribe.models import LoadedModel, Preprocess

SAMPLE = sample_root()
WNIDS = sorted(json.loads((SAMPLE / "classes.json").read_text()))
FOLDER_NAMES = [json.loads((SAMPLE / "classes.json").read_text())[w] for w in WNIDS]
MODEL_NAMES = FOLDER_NAMES[3:] + FOLDER_NAMES[:3]  # the model's class order differs from the folders'


def _photos(tmp_path, per_class=2):
    """``[(relative path, class name)]``: val photos copied under ``tmp_path/img`` (manifests name files below them)."""
    out = []
    for wnid, name in zip(WNIDS, FOLDER_NAMES):
        for src in sorted((SAMPLE / "val" / wnid).iterdir())[:per_class]:
            rel = f"img/{wnid}_{src.name}"
            (tmp_path / "img").mkdir(exist_ok=True)
            shutil.copy(src, tmp_path / rel)
            out.append((rel, name))
    return out


def _csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows(rows)
    return path


def _checkpoint_spec(tmp_path, names=MODEL_NAMES):
    """A name-labelled model as a job names it: only its sidecar is read before any work."""
    side = tmp_path / "model.safetensors.spec.json"
    side.write_text(json.dumps({"arch": "torchvision:resnet18", "num_classes": len(names), "class_names": names}))
    return f"checkpoint:{tmp_path / 'model.safetensors'}"


class Oracle(nn.Module):
    """Knows each photo (nearest stored input) and answers its true class, as an index into ``MODEL_NAMES``."""

    def __init__(self, refs: torch.Tensor, classes: list[int]):
        super().__init__()
        self.register_buffer("refs", refs.flatten(1))
        self.register_buffer("classes", torch.tensor(classes))

    def forward(self, x):
        k = torch.cdist(x.flatten(1), self.refs).argmin(1)
        return nn.functional.one_hot(self.classes[k], len(MODEL_NAMES)).float()


def _oracle(tmp_path, photos) -> LoadedModel:
    pre = Preprocess(resize=32, crop=32)
    refs = torch.stack([pre.transform()(load_image(tmp_path / rel)) for rel, _ in photos])
    return LoadedModel("oracle", Oracle(refs, [MODEL_NAMES.index(n) for _, n in photos]), pre, MODEL_NAMES)


def _job(tmp_path, data, shifts=(), **over):
    return load_config(None, {"model": _checkpoint_spec(tmp_path), "data": str(data), "out": str(tmp_path / "job"),
                              "shifts": [{"name": n, "data": {"root": str(r)}} for n, r in shifts],
                              "evaluate": {"bootstrap": 20}, "workers": 0, "progress": False, "device": "cpu",
                              **over})


def _stop_work(monkeypatch):
    """Any stage that starts work before the labels are checked fails the test."""
    import neuroscribe.record.recorder as rec
    import neuroscribe.train.classifier as tr

    def started(*a, **k):
        raise AssertionError("the job started work before its labels were checked")
    monkeypatch.setattr(rec, "record", started)
    monkeypatch.setattr(tr, "train_classifier", started)


def test_integer_csv_and_jsonl_shift_evaluated_against_a_name_labelled_model(tmp_path, monkeypatch):
    photos = _photos(tmp_path)
    ints = _csv(tmp_path / "test.csv", [(rel, MODEL_NAMES.index(n)) for rel, n in photos])
    jsonl = tmp_path / "shift.jsonl"
    jsonl.write_text("".join(json.dumps({"path": rel, "label": MODEL_NAMES.index(n)}) + "\n" for rel, n in photos))
    names = _csv(tmp_path / "names.csv", photos)
    cfg = _job(tmp_path, ints, [("ints-jsonl", jsonl), ("names", names)])
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "ablation.json").write_text(json.dumps(
        {"key": "k", "variants": {}, "controls": {"n": 0, "random": [], "sort_all": []}}))
    lm = _oracle(tmp_path, photos)
    from neuroscribe.ablate import measure
    monkeypatch.setattr(measure, "model_and_means", lambda cfg: (lm, torch.device("cpu"), None, None))
    ev = pipeline.evaluate(cfg)
    assert {s: ev["results"]["base"][s]["acc"] for s in ev["test_sets"]} == \
        {"in-distribution": 1.0, "ints-jsonl": 1.0, "names": 1.0}
    # label i is the model's class i: the set takes the model's class list and needs no re-mapping
    ds, set_names, _ = pipeline.shift_set(ShiftSetConfig(name="t", data=DataConfig(root=jsonl)), lm.preprocess, 0,
                                          lm.class_names)
    assert set_names == MODEL_NAMES and class_index(lm, set_names) is None
    assert [ds[i][1] for i in range(len(ds))] == [MODEL_NAMES.index(n) for _, n in photos]
    from neuroscribe.datasets.labels import check_job_labels
    check_job_labels(cfg)  # the job-start check accepts indices and names alike


def test_label_out_of_range_names_row_and_range_at_job_start(tmp_path, monkeypatch):
    photos = _photos(tmp_path, per_class=1)
    rows = [(rel, i) for i, (rel, _) in enumerate(photos)]
    rows[2] = (rows[2][0], 10)  # line 4 of the file (the header is line 1)
    bad = _csv(tmp_path / "test.csv", rows)
    cfg = load_config(None, {"train": {"data": {"split": "train"}}, "out": str(tmp_path / "job"), "progress": False,
                             "shifts": [{"name": "ints", "data": {"root": str(bad)}}], "workers": 0})
    _stop_work(monkeypatch)
    with pytest.raises(ValueError, match=r"row 4: label 10 out of range.*valid 0\.\.9") as e:
        pipeline.run(cfg)
    assert "'parachute'" in str(e.value)  # the model's classes (here: the ones training gives it)
    with pytest.raises(ValueError, match=r"row 4: label 10 out of range"):
        open_probe_set(bad, classes=MODEL_NAMES)  # the reader itself refuses it too


def test_name_that_is_no_class_shows_the_nearest_names(tmp_path, monkeypatch):
    photos = _photos(tmp_path, per_class=1)
    rows = [(rel, {"golf ball": "golf bal", "church": "churchh"}.get(n, n)) for rel, n in photos]
    cfg = _job(tmp_path, SAMPLE, [("typos", _csv(tmp_path / "typos.csv", rows))])
    _stop_work(monkeypatch)
    with pytest.raises(ValueError) as e:
        pipeline.run(cfg)
    msg = str(e.value)
    assert "shifts[typos].data" in msg and "does not know: ['churchh', 'golf bal']" in msg
    assert "'golf bal': ['golf ball'" in msg and "'churchh': ['church'" in msg  # nearest model classes
    assert str(MODEL_NAMES) in msg  # and the model's whole class list


def test_column_mixing_integers_and_names_is_an_error_naming_the_rows(tmp_path, monkeypatch):
    photos = _photos(tmp_path, per_class=1)
    rows = [(rel, i) for i, (rel, _) in enumerate(photos)]
    rows[1] = (rows[1][0], "tench")  # line 3
    rows[5] = (rows[5][0], "church")  # line 7
    mixed = _csv(tmp_path / "mixed.csv", rows)
    with pytest.raises(ValueError, match=r"mixes class indices and class names: rows 3, 7 hold names"):
        open_probe_set(mixed)
    cfg = _job(tmp_path, mixed)
    _stop_work(monkeypatch)
    with pytest.raises(ValueError, match=r"rows 3, 7 hold names \('tench', 'church'\)"):
        pipeline.run(cfg)
