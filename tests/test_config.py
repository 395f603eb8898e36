"""Config validation: wrong keys, types and values are named before any work starts."""
import subprocess
import sys

import pytest

from neuroscribe.config import ConfigError, JobConfig, load_config, parse_overrides


def write(tmp_path, text):
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return p


def test_defaults_and_shorthands(tmp_path):
    cfg = load_config(write(tmp_path, "model: efficientnet-lite0\nlayers: _blocks.2, _fc\n"))
    assert cfg.model.spec == "efficientnet-lite0" and cfg.layers == ["_blocks.2", "_fc"]
    assert cfg.record.k == 15 and cfg.record.quantile == 0.99
    assert "quantile: 0.99" in cfg.dump()


@pytest.mark.parametrize("text, field, hint", [
    ("record:\n  kk: 3\n", "record.kk", "unknown field"),
    ("record:\n  k: 0\n", "record.k", "greater than or equal to 1"),
    ("record:\n  quantile: 1.5\n", "record.quantile", "less than 1"),
    ("batch_size: many\n", "batch_size", "valid integer"),
    ("device: tpu\n", "device", "auto, cpu, cuda"),
    ("layers: [a, a]\n", "layers", "listed twice"),
    ("preprocess:\n  std: [1, 0, 1]\n", "preprocess.std", "> 0"),
])
def test_errors_name_the_field(tmp_path, text, field, hint):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    msg = str(e.value)
    assert f"- {field}:" in msg and hint in msg, msg


def test_not_a_mapping_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_parse_yaml_values_and_merge(tmp_path):
    over = parse_overrides(["record.k=20", "layers=[a,b]", "data.limit=5"])
    cfg = load_config(write(tmp_path, "record:\n  quantile: 0.9\n"), over)
    assert cfg.record.k == 20 and cfg.record.quantile == 0.9 and cfg.layers == ["a", "b"]
    assert cfg.data.limit == 5
    with pytest.raises(ConfigError, match="FIELD=VALUE"):
        parse_overrides(["record.k"])


def test_relative_data_root_is_relative_to_job_file(tmp_path):
    (tmp_path / "imgs").mkdir()
    cfg = load_config(write(tmp_path, "data: imgs\n"))
    assert cfg.data.root == tmp_path / "imgs"


def test_cli_exits_nonzero_before_work(tmp_path):
    job = write(tmp_path, "model: efficientnet-lite0\nrecord:\n  k: -1\n")
    r = subprocess.run([sys.executable, "-m", "neuroscribe", "record", str(job), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "record.k" in r.stderr
    assert not (tmp_path / "o").exists()
    r = subprocess.run([sys.executable, "-m", "neuroscribe", "config", "show", str(job), "--set", "record.k=7"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "k: 7" in r.stdout and "quantile: 0.99" in r.stdout


def test_jobconfig_schema_has_docs():
    props = JobConfig.model_json_schema()["$defs"]["RecordConfig"]["properties"]
    assert "description" in props["k"]


def test_demo_job_is_valid_and_configs_copy_matches_the_packaged_one():
    from pathlib import Path
    from neuroscribe.demo import demo_config_path
    packaged = demo_config_path()
    cfg = load_config(packaged)
    assert cfg.train is None and cfg.model.spec == "resnet18-imagenette-text" and cfg.probe == "train-text"
    assert {s.name: s.data.split for s in cfg.shifts}[cfg.ablate.validation] == "holdout"
    # its choosing sets (probe: sample/train, validation: sample/holdout) share no file with a test set (sample/test)
    tests = {s.data.split for s in cfg.shifts if s.name not in (cfg.probe, cfg.ablate.validation)}
    assert cfg.data.split == "test" and tests == {"test"}
    from neuroscribe.datasets.sets import check_disjoint
    check_disjoint(cfg)
    import hashlib  # ... nor a photo under another name: no two shipped files hold the same bytes
    from neuroscribe.datasets.probe import sample_root
    digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in sample_root().rglob("*.jpg")]
    assert len(digests) == 1000 and len(set(digests)) == len(digests)
    def on_test(s):
        return s.model_copy(update={"data": s.data.model_copy(update={"split": "test"})})
    shared = cfg.model_copy(update={"shifts": [on_test(s) if s.name == cfg.ablate.validation else s
                                               for s in cfg.shifts]})
    with pytest.raises(ValueError, match="shares 300 images"):
        check_disjoint(shared)
    # DFR's training photos (ablate.dfr_train) are a fitting set too: trained on the test split, refused; on the
    # sample's train split, the same job passes
    trained = dict(cfg.model_dump(), train={"data": {"split": "test"}, "holdout": 0.2},
                   ablate=dict(cfg.ablate.model_dump(), dfr="holdout", dfr_train=0.5))
    with pytest.raises(ValueError, match=r"data \(a test set\) shares 300 images with train.data \(ablate.dfr_train\)"):
        check_disjoint(load_config(None, trained))
    check_disjoint(load_config(None, dict(trained, train={"data": {"split": "train"}, "holdout": 0.2})))
    assert (Path(__file__).resolve().parents[1] / "configs" / "demo.yaml").read_text() == packaged.read_text()
    load_config(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
    study = load_config(Path(__file__).resolve().parents[1] / "configs" / "milan_study.yaml")
    assert study.train.seeds == [0, 1, 2] and study.ablate.refit and study.probe == "train-text"
    patch = load_config(Path(__file__).resolve().parents[1] / "configs" / "milan_study_patch.yaml")
    assert patch.train.cue["kind"] == "patch" and set(patch.flag.cues) == {"colour"} and patch.probe == "train-patch"
    assert patch.flag.embedding_threshold == study.flag.embedding_threshold and patch.describe == study.describe


def test_evidence_shift_cannot_be_a_test_set(tmp_path):
    shifts = ("shifts:\n  - {name: train-text, data: {split: train}, cue: {kind: text}, correlation: match}\n"
              "  - {name: wrong-text, data: {split: val}, cue: {kind: text}}\n")
    with pytest.raises(ConfigError, match="would choose units on test images"):
        load_config(write(tmp_path, shifts + "probe: train-text\nflag: {evidence_shift: wrong-text}\n"))
    cfg = load_config(write(tmp_path, shifts + "probe: train-text\nflag: {evidence_shift: train-text}\n"))
    assert cfg.flag.evidence_shift == "train-text"


def test_runtime_threads_and_quiet(monkeypatch):
    import os
    import torch
    from neuroscribe import runtime
    cores = runtime.physical_cores()
    assert 1 <= cores <= (os.cpu_count() or 1)
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert runtime.apply(None) == cores and torch.get_num_threads() == cores
        assert runtime.apply(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert runtime.apply(None) == 1
        monkeypatch.delenv("TQDM_DISABLE", raising=False)
        monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
        runtime.apply(None, progress=False)
        assert os.environ["TQDM_DISABLE"] == "1" and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
        from transformers.utils import logging as hf_logging
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        torch.set_num_threads(before)
        from transformers.utils import logging as hf_logging
        hf_logging.enable_progress_bar()
    cfg = load_config(None, {"threads": 3})
    assert cfg.threads == 3
