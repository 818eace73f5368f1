"""Ablations: every composition of a grid, one shared cache, one report.

``tokenloom ablate GRID --out DIR`` (or :func:`run_ablation`) reads a grid
file (:mod:`tokenloom.grid`: a base config plus ``[grid]`` axes, sweeps and
exclusions) and

1. **plans** before anything trains: every cell's config is validated
   (:func:`tokenloom.config.parse_config`) and checked like a run checks it
   before any work (:func:`tokenloom.pipeline_check.preflight`: composition,
   data, device); incompatible cells are listed with their reason and
   skipped. The plan counts what will be
   computed from the pipeline's own cache keys — tokenizers by
   :func:`tokenloom.running.cache.tokenizer_key`, models by tokenizer × the
   generator's ``model_spec()`` (train order, length, vocabulary, ...) ×
   ``[model]`` × ``[train]`` × seed, plus auxiliary models (a speculative
   draft) — and prints e.g. ``3 tokenizers, 4 models, 24 generation cells``;
2. **runs** each cell through :func:`tokenloom.pipeline.run` against one
   shared ``DIR/cache``, so cells that share a tokenizer or a model fit or
   train it once;
3. **records** each finished cell atomically in ``DIR/cells/<cell>.json``
   (the cell id is a safe file name, checked to stay inside ``DIR``)
   and rewrites the report (:mod:`tokenloom.reports`) after every cell.

Resume: kill the process at any point and run the same command again —
finished cells are read back from ``DIR/cells`` (not recomputed), the cell
that was interrupted continues from the pipeline's caches (a training run
from its last checkpoint), and every file is written atomically with its
content hash checked on load (a corrupt one is reported, moved aside and
recomputed).

Several processes: under ``torchrun`` every rank walks the same plan; rank 0
decides which cells are finished, prints, and alone writes files.

A scheduler: with ``--executor local|slurm`` (or an ``[executor]`` table in the grid file) the
tokenizer stages and the cells run as submitit jobs, in the order the stage graph allows, with the
same table as a serial run (:mod:`tokenloom.running.executor`).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from ..backbone import dist
from ..contract.checkpoint import write_json
from ..contract.config import RunConfig, parse_config
from ..contract.errors import ConfigError, TokenloomError
from .cache import data_key, model_key, stable_hash, tokenizer_key
from .grid import SEED_AXIS, Cell, Skipped, describe_labels, expand_grid
from .pipeline_check import preflight
from .results import inside, move_aside, safe_name


@attrs.frozen
class PlannedCell:
    """A valid cell: its grid cell, structured config, the cache keys it
    needs (tokenizer; target and auxiliary models) and its table row."""

    cell: Cell
    cfg: RunConfig
    tokenizer: str
    models: tuple[str, ...]
    row: str

    @property
    def id(self) -> str:
        return self.cell.id

    def config_hash(self) -> str:
        return stable_hash(self.cell.config, 16)


@attrs.frozen
class Plan:
    """What an ablation will compute: the valid cells, the skipped ones
    (with reasons) and how many distinct tokenizers and models they share."""

    cells: tuple[PlannedCell, ...]
    skipped: tuple[Skipped, ...]
    tokenizers: int
    models: int
    seeds: tuple[int, ...]

    @property
    def rows(self) -> int:
        return len({c.row for c in self.cells})

    def summary(self) -> str:
        """``3 tokenizers, 4 models, 24 generation cells`` (+ rows, skipped)."""

        def n(k: int, word: str) -> str:
            return f"{k} {word}{'' if k == 1 else 's'}"

        text = f"{n(self.tokenizers, 'tokenizer')}, {n(self.models, 'model')}, {n(len(self.cells), 'generation cell')}"
        if len(self.seeds) > 1:
            text += f" ({len(self.seeds)} seeds → {n(self.rows, 'table row')})"
        if self.skipped:
            text += f"; {len(self.skipped)} skipped"
        return text

    def describe(self) -> str:
        """The summary and one line per skipped cell with its reason."""
        lines = [self.summary()]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} cell{'' if len(self.skipped) == 1 else 's'} "
                         "(incompatible or not applicable):")
            lines += [f"  {describe_labels(s.labels)}: {s.reason}" for s in self.skipped]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"tokenizers": self.tokenizers, "models": self.models, "cells": len(self.cells), "rows": self.rows,
                "seeds": list(self.seeds), "skipped": len(self.skipped), "summary": self.summary()}


def row_key(cell: Cell) -> str:
    """The table row of a cell: its config without the seed."""
    cfg = {k: v for k, v in cell.config.items() if k != SEED_AXIS}
    return "row-" + stable_hash(cfg, 10)


def _problems(exc: ConfigError) -> str:
    return "; ".join(exc.problems)


def plan_grid(raw: dict[str, Any], *, source: str | None = None, registry: Any = None) -> Plan:
    """Expand and validate a grid document (see the module docstring)."""
    from ..contract.registry import get_registry
    from .executor import parse_executor

    registry = registry or get_registry()
    if isinstance(raw, dict) and "executor" in raw:  # how the grid runs, not part of any cell
        parse_executor(raw["executor"], source=source)
        raw = {k: v for k, v in raw.items() if k != "executor"}
    _base, cells, skipped = expand_grid(raw, source=source)
    skipped = list(skipped)
    planned: list[PlannedCell] = []
    tokenizers: set[str] = set()
    models: set[str] = set()
    for cell in cells:
        try:
            cfg = parse_config(cell.config, registry=registry)
            gen = preflight(cfg, registry=registry).generator  # what the run would refuse: skipped here
            data_id = data_key(cfg)
            tkey = tokenizer_key(cfg, data_id)
            spec = gen.model_spec()
            # the pipeline keys models by the fitted tokenizer's weights; before fitting, the tokenizer's
            # config key stands in for them (fitting is deterministic), and n_classes follows from [data]
            keys = [model_key(cfg, spec, tkey, 0, data_id)]
            for name, mcfg in gen.auxiliary_models(cfg.model).items():
                steps = gen.auxiliary_train_steps(name, cfg.train.steps)
                aux = attrs.evolve(cfg, model=mcfg, train=attrs.evolve(cfg.train, steps=steps))
                keys.append(model_key(aux, spec, tkey, 0, data_id))
        except ConfigError as exc:
            skipped.append(Skipped(cell.labels, _problems(exc)))
            continue
        except TokenloomError as exc:
            skipped.append(Skipped(cell.labels, str(exc)))
            continue
        tokenizers.add(tkey)
        models.update(keys)
        planned.append(PlannedCell(cell, cfg, tkey, tuple(keys), row_key(cell)))
    seeds = tuple(sorted({c.cfg.seed for c in planned}))
    return Plan(tuple(planned), tuple(skipped), len(tokenizers), len(models), seeds)


def load_plan(path: str | Path, *, registry: Any = None) -> Plan:
    from ..contract.config import read_toml

    return plan_grid(read_toml(path), source=str(path), registry=registry)


# ---------------------------------------------------------------------------
# Finished cells
# ---------------------------------------------------------------------------


def cell_path(out: Path, pc: PlannedCell) -> Path:
    """``out/cells/<cell>.json`` (the id made a safe file name), checked to stay inside ``out``."""
    return inside(out, out / "cells" / f"{safe_name(pc.id)}.json")


def finished_record(out: Path, pc: PlannedCell) -> dict | None:
    """The stored record of a finished cell, or None (absent, or its sample
    grid is missing: the cell is recomputed). A record that cannot be read
    (truncated, not JSON, written for another config, no run record in it)
    is reported on stderr and moved aside to ``<cell>.json.corrupt``."""
    path = cell_path(out, pc)
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(stored, dict) or not isinstance(stored.get("record"), dict):
            raise TypeError("not a cell record")
        if stored.get("config_hash") != pc.config_hash():
            raise TypeError("written for another configuration (config_hash does not match)")
        record = stored["record"]
        artifacts = record.get("artifacts")
        if not isinstance(artifacts, dict) or not isinstance(record.get("metrics"), dict):
            raise TypeError("the run record has no metrics or artifacts")
    except (UnicodeDecodeError, ValueError, TypeError) as exc:
        move_aside(path, str(exc), "recomputing the cell")
        return None
    samples = artifacts.get("samples")
    if not isinstance(samples, str) or not (out / samples).is_file():
        print(f"[tokenloom] cell {pc.id}: its sample grid {samples} is missing; recomputing the cell",
              file=sys.stderr, flush=True)
        return None
    return record


# ---------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------


def cell_info(pc: PlannedCell) -> dict[str, Any]:
    """What a job needs to know of its cell besides the config: id, row, labels, config hash."""
    return {"id": pc.id, "row": pc.row, "labels": dict(pc.cell.labels), "config_hash": pc.config_hash()}


def generation_key(pc: PlannedCell) -> str:
    """Cells with the same config but their metrics share their generated samples."""
    return stable_hash({k: v for k, v in pc.cell.config.items() if k != "metrics"}, 16)


def run_ablation(grid: str | Path | dict[str, Any], out: str | Path, *, progress: bool = True,
                 registry: Any = None, echo: Callable[[str], None] | None = None,
                 plots: bool = True, executor: Any = None) -> dict[str, Any]:
    """Plan, run and report a grid (a file path or a parsed document) into
    ``out``; returns the report (what ``results.json`` holds). ``echo``
    receives the plan and progress lines (default: stdout, rank 0 only);
    ``plots``: also draw ``plots/`` and ``overview.png`` at the end;
    ``executor``: an :class:`~tokenloom.running.executor.ExecutorConfig`, or a dict of overrides
    of the grid's ``[executor]`` table (None: the table as written; without one, serial)."""
    from ..contract.config import read_toml
    from ..contract.registry import get_registry
    from .pipeline import run as run_cell
    from .reports import write_ablation_report

    registry = registry or get_registry()
    if echo is None:
        def echo(msg: str) -> None:
            print(msg, flush=True)
    say = echo if dist.is_main() else (lambda _msg: None)

    source = str(grid) if not isinstance(grid, dict) else None
    raw = read_toml(grid) if source is not None else grid
    t0 = time.perf_counter()
    plan = plan_grid(raw, source=source, registry=registry)
    ecfg = _executor_config(raw, executor, source)
    name = Path(source).name if source else "grid"
    say(f"{name}: {plan.describe()}")
    if not plan.cells:
        raise ConfigError(["grid: no cell can run"] + [f"{describe_labels(s.labels)}: {s.reason}"
                                                       for s in plan.skipped], source=source)
    out = Path(out)
    done_ids = dist.agree([pc.id for pc in plan.cells if finished_record(out, pc) is not None]
                          if dist.is_main() else None)
    records: dict[str, dict] = {}
    if dist.is_main():
        records = {pc.id: finished_record(out, pc) for pc in plan.cells if pc.id in done_ids}
    if done_ids:
        say(f"{len(done_ids)} of {len(plan.cells)} cells already finished in {out}; continuing with the rest")
    meta = {"grid": source, "plan": plan.as_dict(), "world_size": dist.world()}

    todo = [pc for pc in plan.cells if pc.id not in done_ids]
    if ecfg.kind != "serial" and todo:
        if dist.world() > 1:
            raise ConfigError([(f"executor.kind: {ecfg.kind} runs each job in its own process; start "
                               "`tokenloom ablate` once, not under torchrun")], source=source)
        failures = _run_jobs(plan, todo, done_ids, records, out, ecfg, meta, say)
        meta["executor"] = attrs.asdict(ecfg)
        return _finish(out, plan, records, meta, t0, plots, say, len(todo), len(done_ids), failures)
    for k, pc in enumerate(todo):
        say(f"[{len(done_ids) + k + 1}/{len(plan.cells)}] {describe_labels(pc.cell.labels) or pc.id}")
        record = run_cell(pc.cfg, out, progress=progress, registry=registry, write_report=False)
        if dist.is_main():
            record = {**record, "cell": pc.id, "row": pc.row, "labels": dict(pc.cell.labels)}
            write_json(cell_path(out, pc), {"cell": pc.id, "config_hash": pc.config_hash(), "config": pc.cell.config,
                                            "record": record})
            records[pc.id] = record
            write_ablation_report(out, plan, records, meta=meta, plots=False)
    return _finish(out, plan, records, meta, t0, plots, say, len(todo), len(done_ids), [])


def _finish(out: Path, plan: Plan, records: dict[str, dict], meta: dict[str, Any], t0: float, plots: bool,
            say: Callable[[str], None], n_run: int, n_done: int, failures: list) -> dict[str, Any]:
    from .reports import write_ablation_report

    report: dict[str, Any] = {}
    if dist.is_main():
        meta["seconds_this_invocation"] = time.perf_counter() - t0
        report = write_ablation_report(out, plan, records, meta=meta, plots=plots)
        say(f"results: {out / 'results.md'}  ({out / 'results.json'})")
        if report.get("plots"):
            say(f"plots: {', '.join(str(out / p) for p in report['plots'])}")
        if report.get("overview"):
            say(f"overview: {out / report['overview']}")
        say(f"ablation finished in {meta['seconds_this_invocation']:.0f} s ({n_run} cells run, "
            f"{n_done} already finished)")
    if failures:
        raise TokenloomError(f"{len(failures)} job(s) failed after every retry (the report holds the other cells; "
                             "run the same command again to retry them):\n"
                             + "\n".join(f"  {f.describe()}" for f in failures))
    return dist.broadcast(report)


def _executor_config(raw: dict[str, Any], executor: Any, source: str | None) -> Any:
    from .executor import ExecutorConfig, parse_executor

    if isinstance(executor, ExecutorConfig):
        return executor
    return parse_executor(raw.get("executor"), source=source, overrides=executor)


def _run_jobs(plan: Plan, todo: list[PlannedCell], done_ids: Any, records: dict[str, dict], out: Path,
              ecfg: Any, meta: dict[str, Any], say: Callable[[str], None]) -> list:
    """The cells ``todo`` as jobs of ``ecfg``'s executor: one tokenizer stage per tokenizer not yet
    cached, then the cells, each holding the tokenizer, models and samples it may compute
    (:func:`tokenloom.running.executor.run_tasks`); each finished cell is recorded and the report
    rewritten here. Returns the failures."""
    from .cache import cache_ok
    from .executor import (
        Task,
        cell_job,
        default_threads,
        fit_stage,
        make_executor,
        run_tasks,
        visible_gpus,
    )
    from .reports import write_ablation_report

    folder = out / (ecfg.folder or "jobs")
    executor = make_executor(ecfg, folder)
    threads = ecfg.threads or default_threads()
    out_s = str(out.resolve())
    (out / "cache").mkdir(parents=True, exist_ok=True)
    done: set[str] = set()
    for pc in plan.cells:  # what finished cells computed is cached
        if pc.id in done_ids:
            done |= {f"tok:{pc.tokenizer}", *(f"model:{k}" for k in pc.models), f"gen:{generation_key(pc)}"}
    tasks: list[Task] = []
    seen: set[str] = set()
    for pc in todo:
        if pc.tokenizer in seen or f"tok:{pc.tokenizer}" in done:
            continue
        seen.add(pc.tokenizer)
        if cache_ok(out / "cache" / f"tokenizer-{pc.tokenizer}.safetensors"):
            done.add(f"tok:{pc.tokenizer}")
            continue
        tasks.append(Task(f"tokenizer {pc.cell.config.get('tokenizer', {}).get('name', '?')} ({pc.tokenizer[:8]})",
                          fit_stage, (pc.cell.config, out_s, threads), frozenset({f"tok:{pc.tokenizer}"})))
    for pc in todo:
        claims = {f"tok:{pc.tokenizer}", *(f"model:{k}" for k in pc.models), f"gen:{generation_key(pc)}"}
        tasks.append(Task(f"cell {describe_labels(pc.cell.labels) or pc.id}", cell_job,
                          (pc.cell.config, out_s, threads, cell_info(pc)), frozenset(claims), cell=pc.id))
    say(f"executor: {ecfg.describe()}; {len(tasks)} jobs ({len(tasks) - len(todo)} tokenizer stages, "
        f"{len(todo)} cells), {threads} CPU threads each, logs in {folder}")
    n_done = len(records)

    def on_result(task: Any, result: Any) -> None:
        nonlocal n_done
        if task.cell is None:
            say(f"done: {task.name}")
            return
        n_done += 1
        records[task.cell] = result
        say(f"[{n_done}/{len(plan.cells)}] done: {task.name}")
        write_ablation_report(out, plan, records, meta=meta, plots=False)

    return run_tasks(tasks, executor, workers=ecfg.workers, retries=ecfg.retries, done=done,
                     on_result=on_result, say=say, gpus=visible_gpus(ecfg))


__all__ = [
    "SEED_AXIS",
    "Plan",
    "PlannedCell",
    "describe_labels",
    "finished_record",
    "load_plan",
    "plan_grid",
    "row_key",
    "run_ablation",
]
