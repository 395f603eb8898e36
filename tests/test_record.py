"""Record stage end to end on the real EfficientNet-Lite0 and real Imagenette photos."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from neuroscribe.config import load_config
from neuroscribe.record.exemplars import Recording
from neuroscribe.record.recorder import record
from neuroscribe.datasets.probe import sample_root

GOLF = 574  # ImageNet-1k index of "golf ball"
LAYERS = ["_blocks.4", "_fc"]


def job(out, **over):
    base = {"model": "efficientnet-lite0", "layers": LAYERS, "out": str(out), "progress": False,
            "batch_size": 20, "workers": 0, "data": {"root": str(sample_root()), "split": "val"},
            "record": {"k": 8}}
    for key, v in over.items():
        base[key] = {**base[key], **v} if isinstance(v, dict) and isinstance(base.get(key), dict) else v
    return load_config(None, base)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("rec") / "job"
    return record(job(out)), out


def test_artifacts_and_golf_ball_logit_unit(small):
    path, out = small
    rec = Recording.open(out)
    assert rec.path == path and rec.meta["n_images"] == 100 and rec.meta["n_skipped"] == 0
    assert set(rec.layers) == set(LAYERS)
    golf_class = rec.meta["class_names"].index("golf ball")
    ex = rec.exemplars("_fc", GOLF)
    labels = [int(rec.labels[e.image_id]) for e in ex]
    assert sum(lbl == golf_class for lbl in labels) >= 7, labels  # all 10 golf-ball photos are in the probe set
    assert all(a.score >= b.score for a, b in zip(ex, ex[1:]))
    t = rec.tensors("_blocks.4")
    assert t["maps"].shape[:2] == (rec.units("_blocks.4"), 8) and str(t["maps"].dtype) == "torch.float16"
    masks = rec.masks("_blocks.4", 0)
    assert masks.shape == (8, 224, 224) and 0 < masks.mean() < 0.5
    assert json.loads((out / "record.json").read_text())["path"].endswith(rec.meta["key"])


def _unit_activations(paths, layer, unit, batch=20):
    """``[N, h, w]``: ``layer``'s channel ``unit`` on each photo, from a plain forward hook (not neuroscribe's
    hooks or recorder), the forward pass stopped at that layer."""
    import torch
    from neuroscribe.datasets.probe import load_image
    from neuroscribe.models import load_model

    class Stop(Exception):
        pass

    lm = load_model("efficientnet-lite0")
    got = []

    def hook(module, inputs, output):
        got.append(output[:, unit].detach().clone())
        raise Stop

    handle = dict(lm.module.named_modules())[layer].register_forward_hook(hook)
    tf = lm.preprocess.transform()
    try:
        for i in range(0, len(paths), batch):
            with torch.no_grad(), pytest.raises(Stop):
                lm.module(torch.stack([tf(load_image(p)) for p in paths[i:i + batch]]))
    finally:
        handle.remove()
    return torch.cat(got).float().numpy()


def test_recorded_exemplars_are_the_units_real_activations(small):
    """Image ids, scores, maps and threshold of a conv unit agree with its activations recomputed independently:
    each exemplar's score is the spatial max of its own image's map, the ids are the unit's top-k images, and
    the threshold is the 0.99 quantile of the unit's activations over every position of every image."""
    from neuroscribe.datasets.probe import open_probe_set
    path, out = small
    rec = Recording.open(out)
    probe = open_probe_set(sample_root(), split="val")
    assert rec.image_paths == [s.path for s in probe.samples]  # image id i is the probe set's i-th photo
    layer, unit = LAYERS[0], 0
    acts = _unit_activations([s.path for s in probe.samples], layer, unit)
    scores = acts.max(axis=(1, 2))
    ex = rec.exemplars(layer, unit)
    assert len(ex) == 8
    tol = 1e-3 * float(np.abs(acts).max())
    for e in ex:
        assert e.score == pytest.approx(float(scores[e.image_id]), abs=tol), (e.rank, e.image_id)
        assert e.map.shape == acts.shape[1:]
        np.testing.assert_allclose(e.map, acts[e.image_id], atol=4 * tol + 1e-2)  # maps are stored as float16
    chosen = {e.image_id for e in ex}
    weakest = min(e.score for e in ex)
    assert all(scores[i] <= weakest + tol for i in range(len(scores)) if i not in chosen)  # no better image left out
    assert rec.threshold(layer, unit) == pytest.approx(float(np.quantile(acts, 0.99)), abs=tol)
    assert ex[0].score > rec.threshold(layer, unit)  # the top exemplar's own map peaks above the threshold


def test_the_pass_runs_on_a_folded_copy_and_records_what_the_model_as_loaded_records(small, tmp_path):
    """``record.fold_model`` (default): the pass runs on a copy with EfficientNet-Lite0's 49 batch norms and its pads
    folded into the convolutions, channels-last, and leaves the loaded model as it was; the recording names it,
    has its own cache key, and holds the same exemplars as a pass on the model as loaded (same top-k image sets of
    every unit; scores and thresholds within float32 rounding)."""
    import torch
    from neuroscribe.record.recorder import prepare
    from neuroscribe.record.state import Recorder
    path, out = small
    folded = Recording.open(out)
    assert folded.meta["fold_model"] is True and folded.meta["fold"]["batchnorm"] == 49 and folded.meta["fold"]["pad"]
    plain = Recording(record(job(tmp_path / "plain", record={"fold_model": False})))
    assert plain.meta["fold"] is None and plain.meta["key"] != folded.meta["key"]
    for layer in LAYERS:
        a, b = folded.tensors(layer), plain.tensors(layer)
        scale = float(b["scores"].abs().max())
        assert [set(r) for r in a["ids"].tolist()] == [set(r) for r in b["ids"].tolist()], layer
        assert float((a["scores"] - b["scores"]).abs().max()) <= 1e-5 * scale, layer
        assert float((a["threshold"] - b["threshold"]).abs().max()) <= 1e-5 * scale, layer
    cfg = job(tmp_path / "unused")
    lm, probe = prepare(cfg, torch.device("cpu"))
    module, nhwc = Recorder(cfg, lm, probe, torch.device("cpu")).run_module()
    assert nhwc and module is not lm.module
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in module.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in lm.module.modules()) == 49  # the loaded model untouched
    conv = next(m for m in lm.module.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous()
    assert next(m for m in module.modules() if isinstance(m, torch.nn.Conv2d)).weight.is_contiguous(
        memory_format=torch.channels_last)


def test_compact_format_is_far_smaller_than_milan(small, tmp_path):
    path, out = small
    rec = Recording.open(out)
    ours = sum(f.stat().st_size for f in (path / "layers").iterdir())
    milan = rec.export_milan(tmp_path / "milan", ["_blocks.4"])
    d = milan / "_blocks.4"
    images, masks, ids = (np.load(d / f"{n}.npy") for n in ("images", "masks", "ids"))
    u = rec.units("_blocks.4")
    assert images.shape == (u, 8, 3, 224, 224) and masks.shape == (u, 8, 1, 224, 224)
    assert np.array_equal(ids, rec.tensors("_blocks.4")["ids"].numpy())
    # the exported image is the exemplar in model geometry
    assert np.array_equal(images[0, 0], np.asarray(rec.image(int(ids[0, 0]))).transpose(2, 0, 1))
    milan_bytes = (d / "images.npy").stat().st_size + (d / "masks.npy").stat().st_size
    assert milan_bytes > 20 * ours


def test_cache_reused_and_invalidated(small, tmp_path):
    path, out = small
    mtime = (path / "meta.json").stat().st_mtime_ns
    assert record(job(out)) == path and (path / "meta.json").stat().st_mtime_ns == mtime  # unchanged: reused
    assert record(job(out, record={"k": 8, "quantile": 0.95})) != path  # changed result-relevant field
    assert record(job(out, batch_size=7)) == path  # batch size does not change the result


def test_dataset_change_invalidates(tmp_path):
    data = tmp_path / "imgs" / "c0"
    data.mkdir(parents=True)
    for p in sorted((sample_root() / "val" / "n03445777").glob("*.jpg"))[:4]:
        shutil.copy(p, data / p.name)
    cfg = job(tmp_path / "j", data={"root": str(tmp_path / "imgs"), "split": None}, layers=["_fc"])
    a = record(cfg)
    (data / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    b = record(cfg)
    assert a != b
    meta = json.loads((b / "meta.json").read_text())
    assert meta["n_skipped"] == 1 and meta["skipped"][0][1].endswith("bad.jpg") and "corrupt" in meta["skipped"][0][2]
    assert Recording(b).tensors("_fc")["ids"].shape == (1000, 8)
    assert (Recording(b).tensors("_fc")["ids"][:, 5:] == -1).all()  # 4 good images < k: padded


def test_unknown_layer_fails_before_work(tmp_path):
    from neuroscribe.hooks import UnknownLayerError
    with pytest.raises(UnknownLayerError, match="_blocks.4"):
        record(job(tmp_path / "j", layers=["_blocks.44"]))
    assert not (tmp_path / "j").exists()


def test_full_imagenette_golf_ball_unit(imagenette, tmp_path):
    """300 real photos of the full Imagenette val set, three times the shipped sample's val split and mostly photos
    outside it: the golf-ball and tench logits still find their classes (the sample's version of this check is
    test_artifacts_and_golf_ball_logit_unit)."""
    cfg = job(tmp_path / "j", data={"root": str(imagenette), "split": "val"}, layers=["_fc"],
              record={"k": 15})
    cfg.data.limit = 300
    rec = Recording(record(cfg))
    golf_class = 8
    labels = [int(rec.labels[e.image_id]) for e in rec.exemplars("_fc", GOLF)]
    assert sum(lbl == golf_class for lbl in labels) >= 12, labels
    tench = [int(rec.labels[e.image_id]) for e in rec.exemplars("_fc", 0)]
    assert sum(lbl == 0 for lbl in tench) >= 10, tench


def test_the_stage_draws_random_weights_from_the_job_seed():
    """``prepare`` (what record, describe and ablate load the model with) passes the job's seed to the model factory:
    two jobs with seed 0 get the same ``@none`` weights, a job with seed 1 others."""
    import torch
    from neuroscribe.record.recorder import prepare
    base = {"model": "torchvision:resnet18@none", "layers": ["layer1"], "progress": False,
            "data": {"root": str(sample_root()), "split": "val", "limit": 4}}
    w = [prepare(load_config(None, dict(base, seed=s)))[0].module.conv1.weight for s in (0, 0, 1)]
    assert torch.equal(w[0], w[1]) and not torch.equal(w[0], w[2])


def test_random_weights_record_the_same_in_two_processes(tmp_path):
    """`@none` weights come from the job seed and spec: two fresh processes record the same model (same cache key,
    identical top-k), as torchrun ranks must."""
    import subprocess
    import sys
    script = (
        "import sys, json; from neuroscribe.config import load_config; from neuroscribe.record.recorder import record;"
        "from neuroscribe.datasets.probe import sample_root;"
        "cfg = load_config(None, {'model': 'torchvision:resnet18@none', 'layers': ['layer1'], 'out': sys.argv[1],"
        "'progress': False, 'workers': 0, 'batch_size': 8, 'record': {'k': 3},"
        "'data': {'root': str(sample_root()), 'split': 'val', 'limit': 12}, 'preprocess': {'resize': 64, 'crop': 64}});"
        "print(record(cfg).name)")
    keys, ids = [], []
    for i in range(2):
        out = tmp_path / f"job{i}"
        res = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        keys.append(res.stdout.strip().splitlines()[-1])
        ids.append(Recording(out / "record" / keys[-1]).tensors("layer1")["ids"])
    assert keys[0] == keys[1]
    assert np.array_equal(ids[0], ids[1])
