"""Shared fixtures: throwaway plugin distributions built in a temporary
directory, exactly as pip would lay them out (a package plus a
``*.dist-info`` with ``entry_points.txt``); the registry of tokenloom's own
plugins, which the whole test session uses as its process-wide registry so
that an installed third-party plugin can never change a test's outcome
(tests of discovery itself build registries from entry points explicitly)."""

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


def builtin_plugins() -> list[tuple[str, str]]:
    """``(entry point name, module)`` of every built-in plugin, as pyproject.toml declares them."""
    import tomllib

    with open(REPO / "pyproject.toml", "rb") as f:
        return sorted(tomllib.load(f)["project"]["entry-points"]["tokenloom"].items())


def builtin_registry():
    """A registry of tokenloom's own plugins only (``Registry.from_plugins``)."""
    import importlib

    import tokenloom
    from tokenloom.registry import Registry

    return Registry.from_plugins([(name, importlib.import_module(mod)) for name, mod in builtin_plugins()],
                                 dist="tokenloom", version=tokenloom.__version__, strict=True)


def _use_builtin_registry():
    from tokenloom.registry import set_registry

    registry = builtin_registry()
    set_registry(registry)
    return registry


# before any test module is collected (several parametrize over `tokenloom.available(...)`)
BUILTIN_REGISTRY = _use_builtin_registry()


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
    """Environment for running the CLI in a subprocess: the installed
    third-party plugins are disabled, so the subprocess sees tokenloom's own."""
    from importlib import metadata

    env = dict(os.environ)
    env.pop("TOKENLOOM_STRICT_PLUGINS", None)
    ours = {name for name, _ in builtin_plugins()}
    others = sorted({ep.name for ep in metadata.entry_points(group="tokenloom")} - ours)
    if others:
        env["TOKENLOOM_DISABLE_PLUGINS"] = ",".join(others)
    else:
        env.pop("TOKENLOOM_DISABLE_PLUGINS", None)
    return env


def tiny_config_toml(*, seed: int | str = 0, n: int | str = 64, n_holdout: int | str = 16, pool: int = 2,
                     generator: str | None = "raster", generator_extra: str | None = None, steps: int | str = 4,
                     warmup: int | None = 1, k: int | str | None = 3, samplers: str | None = None,
                     metrics: tuple[str, ...] = ("nll", "cost"), n_samples: int | str = 8) -> str:
    """The tiny run config many tests share (8-px shapes, 1-bit pixel tokens, a
    one-layer model, a few steps), as TOML text; each keyword replaces one value.

    A value may be a ``str.format`` placeholder such as ``"{steps}"`` for tests
    that fill it in later. ``generator=None`` leaves out the ``[generator]``
    table (a grid supplies it); ``generator_extra`` is a line added to it;
    ``warmup=None`` leaves out ``train.warmup``; ``k`` is the top-k sampler's k,
    ``k=None`` leaves out ``[[sampler]]``; ``samplers`` (text) replaces the
    sampler block verbatim."""
    gen = "" if generator is None else f'[generator]\nname = "{generator}"\n'
    if generator is not None and generator_extra is not None:
        gen += f"{generator_extra}\n"
    if samplers is None:
        samplers = "" if k is None else f'[[sampler]]\nname = "top-k"\nk = {k}\n'
    names = "[" + ", ".join(f'"{m}"' for m in metrics) + "]"
    return (f'\nseed = {seed}\n'
            f'[data]\nname = "shapes"\nsize = 8\nn = {n}\nn_holdout = {n_holdout}\n'
            f'[tokenizer]\nname = "pixel"\nbits = 1\npool = {pool}\n'
            f'{gen}'
            f'[model]\nn_layer = 1\nd_model = 16\nn_head = 2\n'
            f'[train]\nsteps = {steps}\nbatch_size = 8\n' + ("" if warmup is None else f"warmup = {warmup}\n") +
            f'{samplers}'
            f'[metrics]\nnames = {names}\nn_samples = {n_samples}\n')


def tiny_config(**overrides) -> dict:
    """``tiny_config_toml(**overrides)`` parsed: the same config as a fresh dict."""
    import tomllib

    return tomllib.loads(tiny_config_toml(**overrides))
