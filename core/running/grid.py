"""Ablation grids: a base config plus axes, expanded into cells.

A grid file is a run config (see :mod:`tokenloom.config`) with a ``[grid]``
table. Each axis replaces one part of the base config; the cells are the
Cartesian product of all axes, minus declared exclusions::

    [grid]
    tokenizer = [{name = "vq"}, {name = "fsq", levels = [8, 5, 5, 5]}]
    generator = [{name = "raster"}, {name = "masked", steps = 8}]
    sampler   = [[{name = "top-k", k = 32}], [{name = "cfg", scale = 2.0}, {name = "top-k", k = 32}]]
    metrics   = [["fid", "nll"]]          # metric sets (lists of names)
    seed      = [0, 1, 2]
    exclude   = [{tokenizer = "fsq", generator = "masked"}]

    [grid.sweep]                          # one parameter over values, no table copying
    "sampler.cfg.scale" = [1.0, 1.5, 2.0, 3.0]
    "generator.steps"   = [4, 8, 16]

Sweep paths: ``<section>.<key>`` for ``data``, ``model``, ``train``,
``tokenizer`` and ``generator`` (a key of that table), and
``sampler.<name>.<key>`` (a key of the sampler of that name in the chain;
cells whose chain has no such sampler are skipped with that reason).

An exclusion matches a cell when every key it names matches: a string
matches a component's name (``tokenizer = "fsq"``), a table matches when its
keys agree (``generator = {name = "masked", steps = 4}``), a number matches
a seed or a swept value (``"generator.steps" = 16``).
"""

from __future__ import annotations

import copy
import itertools
import re
from pathlib import Path
from typing import Any

import attrs

from ..contract.config import read_toml
from ..contract.errors import ConfigError
from .cache import stable_hash

AXES = ("tokenizer", "generator", "sampler", "metrics", "seed")
#: Cell labels that are not part of a table row's identity: several seeds of
#: one composition are aggregated into one row (mean ± standard deviation).
SEED_AXIS = "seed"
SECTIONS = ("data", "model", "train", "tokenizer", "generator")


@attrs.frozen
class Cell:
    """One composition of the grid: its raw config and how it differs from
    the base (``labels``: axis -> short description). ``id``: the tokenizer and
    generator labels and a config hash, made a safe file name (at most 80
    characters of ``A-Z a-z 0-9 . _ + - [ ]``, the hash always kept)."""

    id: str
    config: dict[str, Any]
    labels: dict[str, str]


@attrs.frozen
class Skipped:
    labels: dict[str, str]
    reason: str


def _label_table(table: Any) -> str:
    if not isinstance(table, dict):
        return str(table)
    name = table.get("name", "?")
    rest = ",".join(f"{k}={v}" for k, v in table.items() if k != "name")
    return f"{name}({rest})" if rest else str(name)


def _label(axis: str, value: Any) -> str:
    if axis == "sampler":
        return "+".join(_label_table(t) for t in value) or "none"
    if axis == "metrics":
        return ",".join(value)
    return _label_table(value)


def describe_labels(labels: dict[str, str], *, skip: tuple[str, ...] = ()) -> str:
    """``tokenizer=pixel(bits=1) generator=raster ...`` (or ``base`` for none)."""
    parts = [f"{k}={v}" for k, v in labels.items() if k not in skip]
    return " ".join(parts) or "base"


def _matches(pattern: Any, value: Any) -> bool:
    if isinstance(pattern, dict):
        if isinstance(value, dict):
            return all(k in value and _matches(v, value[k]) for k, v in pattern.items())
        return False
    if isinstance(pattern, str) and isinstance(value, dict):
        return value.get("name") == pattern
    if isinstance(pattern, str) and isinstance(value, list):  # sampler chain: any sampler named so
        return any(isinstance(t, dict) and t.get("name") == pattern for t in value)
    return pattern == value


def _apply_sweep(cfg: dict[str, Any], path: str, value: Any) -> str | None:
    """Set ``path`` to ``value`` in ``cfg``; return why not, or None."""
    parts = path.split(".")
    if parts[0] == "sampler":
        if len(parts) != 3:
            return f"sweep path {path!r}: expected sampler.<name>.<key>"
        chain = cfg.get("sampler", [])
        hits = [t for t in chain if isinstance(t, dict) and t.get("name") == parts[1]]
        if not hits:
            return f"the sampler chain has no '{parts[1]}' for sweep {path!r}"
        for t in hits:
            t[parts[2]] = value
        return None
    if parts[0] in SECTIONS and len(parts) == 2:
        cfg.setdefault(parts[0], {})[parts[1]] = value
        return None
    if parts[0] == "seed" and len(parts) == 1:
        cfg["seed"] = value
        return None
    return f"sweep path {path!r}: expected <{'|'.join(SECTIONS)}>.<key> or sampler.<name>.<key>"


def expand_grid(raw: dict[str, Any], *, source: str | None = None) -> tuple[dict[str, Any], list[Cell], list[Skipped]]:
    """Split a grid document into (base config, cells, skipped cells).

    Structural problems of the ``[grid]`` table are a :class:`ConfigError`;
    cells that cannot be built (a sweep that does not apply) are returned as
    skipped with their reason. Component compatibility is checked by the
    runner, which also validates each cell's config."""
    raw = copy.deepcopy(raw)
    grid = raw.pop("grid", None)
    if grid is None:
        grid = {}
    if not isinstance(grid, dict):
        raise ConfigError(["grid: expected a table"], source=source)
    problems: list[str] = []
    axes: list[tuple[str, list[Any]]] = []
    for key, values in grid.items():
        if key in ("exclude", "sweep"):
            continue
        if key not in AXES:
            problems.append(f"grid.{key}: unknown axis (axes: {', '.join(AXES)}, exclude, sweep)")
            continue
        if not isinstance(values, list) or not values:
            problems.append(f"grid.{key}: expected a non-empty list")
            continue
        for i, v in enumerate(values):
            if key in ("tokenizer", "generator") and not isinstance(v, dict):
                problems.append(f"grid.{key}[{i}]: expected a table with a name, got {v!r}")
            elif key == "sampler" and not (isinstance(v, list) and all(isinstance(t, dict) for t in v)):
                problems.append(f"grid.sampler[{i}]: expected a list of sampler tables (a chain), got {v!r}")
            elif key == "metrics" and not (isinstance(v, list) and all(isinstance(t, str) for t in v)):
                problems.append(f"grid.metrics[{i}]: expected a list of metric names, got {v!r}")
            elif key == "seed" and (isinstance(v, bool) or not isinstance(v, int)):
                problems.append(f"grid.seed[{i}]: expected an int, got {v!r}")
        axes.append((key, values))
    sweep = grid.get("sweep", {})
    if not isinstance(sweep, dict):
        problems.append("grid.sweep: expected a table of \"path\" = [values]")
        sweep = {}
    for path, values in sweep.items():
        if not isinstance(values, list) or not values:
            problems.append(f"grid.sweep.{path!r}: expected a non-empty list of values")
        else:
            axes.append((f"sweep:{path}", values))
    exclude = grid.get("exclude", [])
    if not isinstance(exclude, list) or not all(isinstance(e, dict) for e in exclude):
        problems.append("grid.exclude: expected a list of tables, e.g. [{tokenizer = \"fsq\", generator = \"masked\"}]")
        exclude = []
    for i, e in enumerate(exclude):
        for k in e:
            if k not in AXES and k not in sweep:
                problems.append(f"grid.exclude[{i}].{k}: not an axis of this grid")
    if problems:
        raise ConfigError(problems, source=source)

    cells: list[Cell] = []
    skipped: list[Skipped] = []
    seen: set[str] = set()
    for combo in itertools.product(*[[(name, v) for v in values] for name, values in axes]):
        cfg = copy.deepcopy(raw)
        labels: dict[str, str] = {}
        chosen: dict[str, Any] = {}
        reason = None
        for name, value in combo:
            if name.startswith("sweep:"):
                path = name[len("sweep:"):]
                chosen[path] = value
                labels[path] = str(value)
                continue
            chosen[name] = value
            labels[name] = _label(name, value)
            if name == "metrics":
                m = cfg.setdefault("metrics", {})
                m["names"] = list(value)
            else:
                cfg[name] = copy.deepcopy(value)
        for name, value in combo:  # sweeps after the axes they modify
            if name.startswith("sweep:") and reason is None:
                reason = _apply_sweep(cfg, name[len("sweep:"):], value)
        if any(all(_matches(v, chosen.get(k)) for k, v in e.items()) for e in exclude):
            continue  # declared exclusions are silent: the user asked for them
        if reason is not None:
            skipped.append(Skipped(labels, reason))
            continue
        key = stable_hash(cfg, 8)
        if key in seen:
            continue
        seen.add(key)
        slug = "-".join(
            labels[k] for k in labels if k in ("tokenizer", "generator")
        ).replace("(", "_").replace(")", "").replace(",", "_").replace("=", "")
        # a file name (cells/<id>.json): option values such as paths must not make it leave its folder
        slug = re.sub(r"[^A-Za-z0-9._+\-\[\]]", "_", slug).lstrip(".")[:71]
        cell_id = f"{slug}-{key}" if slug else key
        cells.append(Cell(cell_id, cfg, labels))
    return raw, cells, skipped


def load_grid(path: str | Path) -> tuple[dict[str, Any], list[Cell], list[Skipped]]:
    """Read and expand a grid file (see the module docstring)."""
    return expand_grid(read_toml(path), source=str(path))
