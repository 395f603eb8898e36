import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

IMAGENETTE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenette"


@pytest.fixture(scope="session")
def imagenette() -> Path:
    """The full Imagenette photos beside the checkout (CI has them); skip where absent."""
    if not (IMAGENETTE / "val").is_dir():
        pytest.skip(f"full Imagenette data not found at {IMAGENETTE} (only the shipped sample is available)")
    return IMAGENETTE
