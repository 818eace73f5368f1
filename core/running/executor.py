"""Ablation grids as jobs of a scheduler: stages and cells on submitit (SLURM, or local processes).

``tokenloom ablate GRID --executor local|slurm`` (or an ``[executor]`` table in the grid file) runs
the plan of :mod:`tokenloom.running.ablation` as jobs of `submitit <https://github.com/facebookincubator/submitit>`_
— the launcher DiT, MAE and MAR use for SLURM — instead of one cell after another in one process:

- **stages first**: one job per tokenizer that is not cached yet fits it and encodes the data
  (:func:`fit_stage`); the cells that need it wait for that job;
- **cells**: each cell is one job (:func:`cell_job`, :func:`tokenloom.pipeline.run`); the first cell
  that needs a model trains it, and every other cell that needs the same model (target or auxiliary)
  waits until it is cached, so two jobs never train one model at the same time. Cells that differ only
  in their metrics share their generated samples, so they are not run at the same time either;
- **the cache** is the run's ``<out>/cache`` on a filesystem every job sees (the same path on every
  node); every file in it is written atomically (a unique temporary file, then ``os.replace``) and
  checked by its content hash when read, so concurrent readers never see half a file;
- **failures**: a failed job is submitted again up to ``retries`` times; after that the cell is
  reported with the paths of its job's logs, the other cells go on, and the ablation ends with an
  error listing the failed cells (run the same command again to retry them: finished cells are kept);
- **the same numbers**: each job sets torch's CPU thread count to the submitting process's (the
  stage caches are keyed by it, and results depend on it), so the table is the table of a serial run.

``[executor]`` keys (each also a flag of ``tokenloom ablate``; a flag overrides the table)::

    [executor]
    kind = "slurm"        # serial (default: one process, no submitit) | local | slurm
    workers = 8           # jobs in flight at once
    retries = 1           # a failed job is submitted again this many times
    timeout_min = 240     # the limit of one job (SLURM --time)
    partition = "gpu"     # SLURM partition
    gpus_per_node = 1     # GPUs of one job (local: GPUs given round-robin to the jobs)
    cpus_per_task = 8
    mem_gb = 64
    account = "lab"       # optional SLURM account, qos and constraint
    qos = "normal"
    constraint = "a100"
    threads = 8           # torch CPU threads in a job (default: the submitting process's count)
    folder = "jobs"       # job logs, relative to the ablation directory (default: <out>/jobs)
"""

from __future__ import annotations

import difflib
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from ..contract.errors import ConfigError, TokenloomError

KINDS = ("serial", "local", "slurm")
INSTALL_HINT = "pip install 'tokenloom[cluster]'"


@attrs.frozen
class ExecutorConfig:
    """How an ablation runs its jobs (the ``[executor]`` table; see the module docstring)."""

    kind: str = "serial"
    workers: int = 2
    retries: int = 1
    timeout_min: int = 240
    partition: str | None = None
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    threads: int | None = None
    folder: str | None = None

    def describe(self) -> str:
        if self.kind == "serial":
            return "serial (one process)"
        extra = f", partition {self.partition}" if self.partition else ""
        gpus = f", {self.gpus_per_node} GPU(s) per job" if self.gpus_per_node else ""
        return f"{self.kind} (submitit, {self.workers} workers, {self.retries} retries{extra}{gpus})"


_INT_KEYS = ("workers", "retries", "timeout_min", "gpus_per_node", "cpus_per_task", "threads")
_MIN = {"workers": 1, "retries": 0, "timeout_min": 1, "gpus_per_node": 0, "cpus_per_task": 1, "threads": 1}
_STR_KEYS = ("kind", "partition", "account", "qos", "constraint", "folder")


def parse_executor(table: Any, *, source: str | None = None, overrides: dict[str, Any] | None = None
                   ) -> ExecutorConfig:
    """An :class:`ExecutorConfig` from the ``[executor]`` table (None: the defaults) with
    ``overrides`` (command-line flags; None values ignored) on top. Every problem is reported at
    once as a :class:`~tokenloom.ConfigError` naming the key."""
    if table is None:
        table = {}
    if not isinstance(table, dict):
        raise ConfigError([f"executor: expected a table, got {table!r}"], source=source)
    merged = {**table, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    fields = [f.name for f in attrs.fields(ExecutorConfig)]
    problems: list[str] = []
    for key, value in merged.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'? " if close else ""
            problems.append(f"executor.{key}: unknown key ({hint}known keys: {', '.join(fields)})")
        elif key in _INT_KEYS and (isinstance(value, bool) or not isinstance(value, int) or value < _MIN[key]):
            problems.append(f"executor.{key}: expected an integer >= {_MIN[key]}, got {value!r}")
        elif key == "mem_gb" and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            problems.append(f"executor.mem_gb: expected a positive number, got {value!r}")
        elif key in _STR_KEYS and not isinstance(value, str):
            problems.append(f"executor.{key}: expected a string, got {value!r}")
        elif key == "kind" and value not in KINDS:
            problems.append(f"executor.kind: expected one of {', '.join(KINDS)}, got {value!r}")
    if problems:
        raise ConfigError(problems, source=source)
    return ExecutorConfig(**merged)


def require_submitit() -> Any:
    """The ``submitit`` module, or a :class:`~tokenloom.ConfigError` naming the extra to install."""
    try:
        import submitit
    except ImportError:
        raise ConfigError([(f"executor: the local and slurm executors need submitit, which is not installed; "
                           f"install the 'cluster' extra: {INSTALL_HINT} (or run with --executor serial)")]
                          ) from None
    return submitit


# ---------------------------------------------------------------------------
# What a job runs (in its own process; arguments are plain data)
# ---------------------------------------------------------------------------


def _job_setup(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def fit_stage(config: dict[str, Any], out: str, threads: int) -> str:
    """The tokenizer stage of ``config`` as a job: fit the tokenizer (or find it cached) and encode
    the training and held-out sets into ``<out>/cache``; returns the tokenizer's identity."""
    _job_setup(threads)
    from ..contract.config import parse_config
    from ..contract.registry import get_registry
    from .pipeline import encode_all, fit_tokenizer, prepare_data, resolve_device
    from .pipeline_check import preflight

    registry = get_registry()
    cfg = parse_config(config, registry=registry)
    parts = preflight(cfg, registry=registry)
    cache = Path(out) / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    train_set, holdout, data_id = prepare_data(cfg, None)
    tok, tok_hash, _ = fit_tokenizer(cfg, train_set.images, cache, registry=registry, device=device,
                                     progress=False, data_id=data_id, tokenizer=parts.tokenizer)
    encode_all(tok, tok_hash, {"train": train_set, "holdout": holdout}, cache,
               key_extra={"data": data_id, "seed": cfg.seed}, device=device)
    return tok_hash


def cell_job(config: dict[str, Any], out: str, threads: int, cell: dict[str, Any]) -> dict[str, Any]:
    """One cell as a job: :func:`tokenloom.pipeline.run` against the shared ``<out>/cache``, then
    its record written atomically to ``<out>/cells/<cell>.json``; returns that record. ``cell``:
    ``{"id", "row", "labels", "config_hash"}``."""
    _job_setup(threads)
    from ..contract.config import parse_config
    from ..contract.registry import get_registry
    from .pipeline import run

    registry = get_registry()
    cfg = parse_config(config, registry=registry)
    record = run(cfg, out, progress=False, registry=registry, write_report=False)
    record = {**record, "cell": cell["id"], "row": cell["row"], "labels": dict(cell["labels"])}
    write_cell_file(Path(out), cell, config, record)
    return record


def write_cell_file(out: Path, cell: dict[str, Any], config: dict[str, Any], record: dict[str, Any]) -> None:
    """``out/cells/<cell>.json`` (atomically): what :func:`tokenloom.ablation.finished_record` reads."""
    from ..contract.checkpoint import write_json
    from .results import inside, safe_name

    path = inside(out, out / "cells" / f"{safe_name(cell['id'])}.json")
    write_json(path, {"cell": cell["id"], "config_hash": cell["config_hash"], "config": config, "record": record})


# ---------------------------------------------------------------------------
# The scheduler
# ---------------------------------------------------------------------------


@attrs.define
class Task:
    """A job to run: a tokenizer stage or a cell. ``claims``: the cache entries it may compute
    (``tok:<key>``, ``model:<key>``, ``gen:<key>``); two tasks never hold one claim at once."""

    name: str
    fn: Callable[..., Any]
    args: tuple
    claims: frozenset[str]
    cell: str | None = None
    attempts: int = 0
    holding: frozenset[str] = frozenset()
    logs: list[str] = attrs.Factory(list)


@attrs.frozen
class Failure:
    """A task that failed after every retry: its name, last error and job log paths."""

    name: str
    cell: str | None
    error: str
    logs: tuple[str, ...]

    def describe(self) -> str:
        logs = ", ".join(self.logs) or "(no log)"
        return f"{self.name}: {self.error} (logs: {logs})"


def make_executor(ecfg: ExecutorConfig, folder: Path) -> Any:
    """A submitit executor for ``ecfg.kind`` (``local`` or ``slurm``) writing its logs under ``folder``."""
    submitit = require_submitit()
    if ecfg.kind == "local":
        ex = submitit.LocalExecutor(folder=str(folder))
        ex.update_parameters(timeout_min=ecfg.timeout_min, gpus_per_node=ecfg.gpus_per_node)
        return ex
    if ecfg.kind == "slurm":
        if shutil.which("sbatch") is None:
            raise ConfigError([("executor.kind: slurm needs the sbatch command, which is not on PATH; submit from "
                               "a node of the cluster, or use --executor local on one machine")])
        ex = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
        params: dict[str, Any] = {"timeout_min": ecfg.timeout_min, "nodes": 1, "tasks_per_node": 1,
                                  "gpus_per_node": ecfg.gpus_per_node, "name": "tokenloom"}
        if ecfg.cpus_per_task is not None:
            params["cpus_per_task"] = ecfg.cpus_per_task
        if ecfg.mem_gb is not None:
            params["mem_gb"] = ecfg.mem_gb
        if ecfg.partition is not None:
            params["slurm_partition"] = ecfg.partition
        for key in ("account", "qos", "constraint"):
            if getattr(ecfg, key) is not None:
                params[f"slurm_{key}"] = getattr(ecfg, key)
        ex.update_parameters(**params)
        return ex
    raise ConfigError([f"executor.kind: {ecfg.kind!r} is not a job executor (local, slurm)"])


def _log_paths(job: Any) -> list[str]:
    try:
        return [str(job.paths.stderr), str(job.paths.stdout)]
    except Exception:  # noqa: BLE001 — a job that never started has no paths worth naming
        return []


def run_tasks(tasks: Sequence[Task], executor: Any, *, workers: int, retries: int, done: set[str],
              on_result: Callable[[Task, Any], None], say: Callable[[str], None],
              gpus: Sequence[int] = (), poll_s: float = 0.2) -> list[Failure]:
    """Run ``tasks`` as jobs of ``executor`` (``submit(fn, *args)`` returning a submitit job), at
    most ``workers`` at once, in order where their claims allow: a task starts when none of its
    claims that are not ``done`` is held by a running task; it then holds them until it ends.
    ``on_result(task, result)`` is called in this process for each success; a failed task is
    submitted again up to ``retries`` times, then returned as a :class:`Failure`. ``gpus``: for
    the local executor, GPU ids handed round-robin to the jobs."""
    pending = list(tasks)
    running: list[tuple[Task, Any]] = []
    busy: set[str] = set()
    failures: list[Failure] = []
    slot = 0
    while pending or running:
        for task in list(pending):
            if len(running) >= workers:
                break
            need = task.claims - done
            if need & busy:
                continue
            task.holding = frozenset(need)
            busy |= need
            if gpus:
                executor.update_parameters(visible_gpus=(gpus[slot % len(gpus)],))
                slot += 1
            job = executor.submit(task.fn, *task.args)
            task.attempts += 1
            task.logs = _log_paths(job)
            running.append((task, job))
            pending.remove(task)
        if not running:
            if pending:  # cannot happen: a task with no running holder of its claims can always start
                raise TokenloomError(f"executor: {len(pending)} jobs cannot start (claims held by nobody)")
            break
        finished = [(t, j) for t, j in running if j.done()]
        if not finished:
            time.sleep(poll_s)
            continue
        for task, job in finished:
            running.remove((task, job))
            try:
                result = job.result()
            except Exception as exc:  # noqa: BLE001 — the job's own exception, re-raised by submitit with its traceback
                first = str(exc).strip().splitlines()
                error = f"{type(exc).__name__}: {first[-1] if first else ''}"
                if task.attempts <= retries:
                    say(f"job {task.name} failed ({error}); retry {task.attempts} of {retries} "
                        f"(log: {task.logs[0] if task.logs else '-'})")
                    pending.insert(0, task)  # it keeps its place at the head of the queue
                    busy -= task.holding
                    continue
                busy -= task.holding
                failures.append(Failure(task.name, task.cell, error, tuple(task.logs)))
                say(f"job {task.name} failed after {task.attempts} attempts: {error} (logs: {', '.join(task.logs)})")
                continue
            busy -= task.holding
            done |= task.holding
            on_result(task, result)
    return failures


def default_threads() -> int:
    import torch

    return torch.get_num_threads()


def visible_gpus(ecfg: ExecutorConfig) -> tuple[int, ...]:
    """GPU ids the local executor hands to its jobs (none without ``gpus_per_node`` or CUDA)."""
    if ecfg.kind != "local" or ecfg.gpus_per_node <= 0:
        return ()
    import torch

    return tuple(range(torch.cuda.device_count()))


__all__ = [
    "INSTALL_HINT",
    "KINDS",
    "ExecutorConfig",
    "Failure",
    "Task",
    "cell_job",
    "fit_stage",
    "make_executor",
    "parse_executor",
    "require_submitit",
    "run_tasks",
    "write_cell_file",
]
