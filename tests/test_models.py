"""Model factory: specs to (module, preprocessing, classes); local checkpoints; clear errors."""
import json
import pickle

import pytest
import torch

from neuroscribe.models import ModelSpecError, list_models, load_model


def test_efficientnet_lite0_offline_real_weights():
    lm = load_model("efficientnet-lite0")
    assert lm.preprocess.mean == (0.5, 0.5, 0.5) and lm.preprocess.std == (0.5, 0.5, 0.5)
    assert len(lm.class_names) == 1000 and lm.class_names[574] == "golf ball"
    assert not lm.module.training
    from neuroscribe.datasets.probe import load_image, sample_root
    imgs = sorted((sample_root() / "val" / "n03445777").glob("*.jpg"))[:6]
    x = torch.stack([lm.preprocess.transform()(load_image(p)) for p in imgs])
    with torch.no_grad():
        pred = lm.module(x).argmax(1)
    assert (pred == 574).sum() >= 4, pred  # real pretrained weights recognise golf balls


def test_torchvision_random_and_unknown():
    lm = load_model("torchvision:resnet18@none", num_classes=10)
    assert lm.module.fc.out_features == 10 and lm.preprocess.crop == 224
    with pytest.raises(ModelSpecError, match="resnet18"):
        load_model("torchvision:resnet81@none")
    with pytest.raises(ModelSpecError, match="did you mean"):
        load_model("efficientnet-lite")
    assert "efficientnet-lite0" in list_models()


def test_missing_weights_say_how_to_get_them():
    with pytest.raises(ModelSpecError, match="network"):
        load_model("torchvision:resnet18@IMAGENET1K_V1")


def test_timm_random():
    pytest.importorskip("timm")
    lm = load_model("timm:resnet10t@none")
    assert lm.preprocess.crop >= 160


def test_checkpoint_state_dict_with_sidecar(tmp_path):
    base = load_model("torchvision:resnet18@none", num_classes=3)
    p = tmp_path / "m.pt"
    torch.save(base.module.state_dict(), p)
    (tmp_path / "m.pt.spec.json").write_text(json.dumps({
        "arch": "torchvision:resnet18", "num_classes": 3, "class_names": ["a", "b", "c"],
        "preprocess": {"resize": 64, "crop": 64, "mean": [0.5] * 3, "std": [0.5] * 3}}))
    lm = load_model(f"checkpoint:{p}")
    assert lm.class_names == ["a", "b", "c"] and lm.preprocess.crop == 64
    assert lm.fingerprint() != load_model("torchvision:resnet18@none", num_classes=3).fingerprint()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(lm.module(x), base.module.eval()(x))


def test_checkpoint_safetensors_needs_arch(tmp_path):
    from safetensors.torch import save_file
    base = load_model("torchvision:resnet18@none", num_classes=2)
    p = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in base.module.state_dict().items()}, str(p))
    with pytest.raises(ModelSpecError, match="model.arch"):
        load_model(f"checkpoint:{p}")
    lm = load_model(f"checkpoint:{p}", arch="torchvision:resnet18", num_classes=2)
    assert lm.module.fc.out_features == 2


class Evil:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_malicious_pickle_refused_by_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "evil.pt"
    with open(p, "wb") as f:
        pickle.dump({"w": Evil()}, f)
    with pytest.raises(ModelSpecError, match="allow_pickle"):
        load_model(f"checkpoint:{p}", arch="torchvision:resnet18")
    assert not (tmp_path / "PWNED").exists()


def test_torchscript_checkpoint(tmp_path):
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1), torch.nn.ReLU()).eval()
    p = tmp_path / "s.pt"
    torch.jit.script(m).save(str(p))
    with pytest.raises(ModelSpecError, match="TorchScript.*allow_pickle"):
        load_model(f"checkpoint:{p}")  # TorchScript carries code: refused unless allowed
    lm = load_model(f"checkpoint:{p}", allow_pickle=True)
    assert lm.info["format"] == "torchscript"


def test_random_weights_are_seeded_by_job_seed_and_spec():
    a = load_model("torchvision:resnet18@none")
    b = load_model("torchvision:resnet18@none")
    c = load_model("torchvision:resnet18@none", seed=1)
    wa, wb, wc = (m.module.conv1.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    from neuroscribe.models import weights_seed  # the spec is part of the seed (resnet18 vs 34 differ anyway)
    assert weights_seed(0, "torchvision:resnet18@none") != weights_seed(0, "torchvision:resnet34@none")
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    load_model("torchvision:resnet18@none")
    assert torch.equal(torch.rand(3), before)  # the caller's RNG is untouched
    torch.manual_seed(5)
    d = load_model("torchvision:resnet18@none", seed=None)  # seed=None: the caller's RNG decides
    torch.manual_seed(5)
    e = load_model("torchvision:resnet18@none", seed=None)
    assert torch.equal(d.module.conv1.weight, e.module.conv1.weight)
    assert not torch.equal(d.module.conv1.weight, wa)


def test_unknown_spec_suggests_specs_across_zoos():
    with pytest.raises(ModelSpecError, match=r"torchvision:resnet18") as e:
        load_model("resnet18")
    assert "timm:resnet18" in str(e.value)


def test_demo_model_is_a_real_text_shortcut_model_and_never_saw_the_demo_holdout():
    """``resnet18-imagenette-text`` (shipped, float16 on disk): ResNet-18 trained on Imagenette with the true class
    name written on half the photos. On the 100 shipped val photos it must recognise clean photos well above chance
    and fail when a wrong class name is written on them (the shortcut the demo ablates); random or wrongly converted
    weights fail the first, a model without the shortcut the second. The demo chooses N on ``sample/holdout``: every
    one of those photos must be one the model held out before training (its sidecar lists them)."""
    from pathlib import Path
    from neuroscribe.config import DataConfig, ShiftSetConfig
    from neuroscribe.datasets.probe import sample_root
    from neuroscribe.datasets.sets import collate, shift_set
    import hashlib
    import neuroscribe
    lm = load_model("resnet18-imagenette-text")
    assert {p.dtype for p in lm.module.parameters()} == {torch.float32} and lm.preprocess.crop == 64
    assert lm.class_names[8] == "golf ball" and len(lm.class_names) == 10
    weights = Path(neuroscribe.__file__).parent / "data" / "models" / "resnet18-imagenette-text.safetensors"
    spec = json.loads(Path(str(weights) + ".spec.json").read_text())
    acc = {}
    for name, cue in (("clean", None), ("wrong-text", spec["cue"])):  # the cue it was trained with, wrong names
        shift = ShiftSetConfig(name=name, data=DataConfig(split="val"), cue=cue, correlation="wrong")
        ds, _, _ = shift_set(shift, lm.preprocess, 0, lm.class_names)
        x, y = collate([ds[i] for i in range(len(ds))])[:2]
        with torch.no_grad():
            acc[name] = (lm.module(x).argmax(1) == y).float().mean().item()
    assert acc["clean"] >= 0.5 and acc["wrong-text"] <= 0.25, acc  # measured 0.65 and 0.07
    # the list of held-out photos belongs to these very weights
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == spec["sha256"]
    held = {Path(p).stem for p in spec["holdout_sources"]}
    hold = sorted((sample_root() / "holdout").rglob("*.jpg"))
    assert len(hold) == 200 and all(p.stem in held for p in hold)
    assert spec["data"]["n_holdout"] == len(held) == 568
