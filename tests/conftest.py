"""Shared fixtures: throwaway plugin distributions built in a temporary
directory, exactly as pip would lay them out (a package plus a
``*.dist-info`` with ``entry_points.txt``)."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest

# before torch is first imported: OpenMP threads that spin while waiting make
# small matmuls ~1000x slower on a shared 2-core machine (see tokenloom/__init__)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]


def make_dist(root: Path, dist: str, version: str, module: str, source: str, entry_name: str | None = None) -> Path:
    """Lay out an installed distribution under ``root``: ``module/__init__.py``
    and ``<dist>-<version>.dist-info`` declaring one entry point in the
    ``tokenloom`` group. Returns ``root`` (put it on sys.path / PYTHONPATH)."""
    root.mkdir(parents=True, exist_ok=True)
    pkg = root / module
    pkg.mkdir(exist_ok=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[tokenloom]\n{entry_name or module} = {module}\n")
    (info / "RECORD").write_text("")
    return root


@pytest.fixture
def on_path(monkeypatch):
    """Put directories on sys.path for this test only, and forget modules
    imported from them afterwards."""
    added: list[str] = []
    before = set(sys.modules)

    def add(path: Path) -> None:
        monkeypatch.syspath_prepend(str(path))
        added.append(str(path))

    yield add
    for name in set(sys.modules) - before:
        mod = sys.modules.get(name)
        f = getattr(mod, "__file__", None) or ""
        if any(f.startswith(a) for a in added):
            del sys.modules[name]


@pytest.fixture
def cli_env():
    """Environment for running the CLI in a subprocess."""
    env = dict(os.environ)
    env.pop("TOKENLOOM_STRICT_PLUGINS", None)
    env.pop("TOKENLOOM_DISABLE_PLUGINS", None)
    return env
