"""The whole repository passes ``ruff check`` with the project's own settings
(pyproject.toml ``[tool.ruff]``), so a lint regression fails the test suite."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _ruff() -> list[str] | None:
    if importlib.util.find_spec("ruff") is not None:
        return [sys.executable, "-m", "ruff"]
    exe = Path(sys.executable).with_name("ruff")
    return [str(exe)] if exe.is_file() else None


def test_ruff_check_is_clean():
    ruff = _ruff()
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    out = subprocess.run([*ruff, "check", str(REPO)], cwd=REPO, capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, f"ruff check found problems:\n{out.stdout}\n{out.stderr}"
