"""The package's shape: stages in pipeline order over a small core, no module over 400 lines.

The import contract lives in pyproject.toml ([tool.importlinter]) and is checked by import-linter itself, so a
stage that imports a later stage (or the core that imports a stage) fails here."""
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "neuroscribe"


def test_stages_import_only_earlier_stages_and_the_core():
    pytest.importorskip("importlinter")
    res = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                          "sys.exit(lint_imports_command())", "--no-cache"],
                         cwd=PACKAGE.parent, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "1 kept, 0 broken" in res.stdout


def test_no_module_over_400_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"modules over 400 lines: {long}"
