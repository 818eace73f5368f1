"""Ablation grids as scheduler jobs (tokenloom.running.executor): the local submitit executor with
two workers gives the serial run's table and weights bit for bit; the scheduler respects the stage
graph (a tokenizer before its models, one model trained once, never two holders of one claim),
retries failed jobs and reports the rest with their logs; bad [executor] input is one readable error."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_config_toml

from tokenloom.ablation import plan_grid, run_ablation
from tokenloom.checkpoint import load_tensors
from tokenloom.config import read_toml
from tokenloom.errors import ConfigError
from tokenloom.reports import TIMING_KEYS
from tokenloom.running.cli import cli
from tokenloom.running.executor import (
    ExecutorConfig,
    Task,
    parse_executor,
    require_submitit,
    run_tasks,
)

BASE = tiny_config_toml(n=48)

# 2 tokenizers (one fitted per stage job), 2 models (one per tokenizer), 4 cells (two share each model)
GRID = """
[grid]
tokenizer = [{name = "pixel", bits = 1, pool = 2}, {name = "pixel", bits = 2, pool = 2}]
[grid.sweep]
"sampler.top-k.k" = [2, 3]
"""


def strip(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in TIMING_KEYS}


def table(report: dict) -> list:
    return [(r["id"], r["labels"], {k: v for k, v in r["metrics"].items() if k not in TIMING_KEYS})
            for r in report["rows"]]


def test_local_executor_with_two_workers_gives_the_serial_table(tmp_path):
    pytest.importorskip("submitit")
    grid = tmp_path / "grid.toml"
    grid.write_text(BASE + GRID)
    serial = run_ablation(grid, tmp_path / "serial", progress=False, echo=lambda m: None, plots=False)
    lines: list[str] = []
    jobs = run_ablation(grid, tmp_path / "jobs", progress=False, echo=lines.append, plots=False,
                        executor={"kind": "local", "workers": 2})
    text = "\n".join(lines)
    assert "executor: local (submitit, 2 workers" in text and "6 jobs (2 tokenizer stages, 4 cells)" in text

    assert table(jobs) == table(serial)  # the table, row by row
    assert [r["id"] for r in jobs["runs"]] == [r["id"] for r in serial["runs"]]
    for a, b in zip(serial["runs"], jobs["runs"]):
        assert strip(a["metrics"]) == strip(b["metrics"])
    # the stage graph: both tokenizers came from their stage jobs; each model was trained by one cell only
    assert all(r["cache"]["tokenizer_reused"] for r in jobs["runs"])
    trained = [r["cache"]["model"] for r in jobs["runs"] if not r["cache"]["model_reused"]]
    assert sorted(trained) == sorted({r["cache"]["model"] for r in jobs["runs"]}) and len(trained) == 2
    # the same tokenizers, weights and samples, bit for bit
    def stages(d):
        return sorted(p.name for pre in ("tokenizer", "model", "samples") for p in (d / "cache").glob(f"{pre}-*.safetensors"))

    names = stages(tmp_path / "serial")
    assert names == stages(tmp_path / "jobs") and len(names) == 2 + 2 + 4
    for name in names:
        ta, tb = load_tensors(tmp_path / "serial" / "cache" / name)[0], load_tensors(tmp_path / "jobs" / "cache" / name)[0]
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name
    # every cell recorded by its job; the job logs are kept
    assert len(list((tmp_path / "jobs" / "cells").glob("*.json"))) == 4
    assert list((tmp_path / "jobs" / "jobs").rglob("*_log.out"))
    stored = json.loads((tmp_path / "jobs" / "results.json").read_text())
    assert stored["executor"]["kind"] == "local" and stored["executor"]["workers"] == 2
    md = [(tmp_path / d / "results.md").read_text().splitlines() for d in ("serial", "jobs")]
    assert len(md[0]) == len(md[1]) and md[0][:3] == md[1][:3]


class FakeJob:
    def __init__(self, ok: bool, value, log: str):
        self.ok, self.value = ok, value
        self.paths = type("P", (), {"stderr": f"{log}.err", "stdout": f"{log}.out"})()
        self.polls = 0
        self.on_end = lambda: None

    def done(self):
        self.polls += 1
        return self.polls > 1  # every job runs across one poll, so two can overlap

    def result(self):
        self.on_end()
        if not self.ok:
            raise RuntimeError("boom\nValueError: cell exploded")
        return self.value


class FakeExecutor:
    """Runs nothing: records which tasks were in flight together and fails the scripted ones."""

    def __init__(self, fail: dict[str, int]):
        self.fail, self.started, self.n = dict(fail), [], 0

    def submit(self, fn, *args):
        name = args[0]
        self.n += 1
        self.started.append(name)
        bad = self.fail.get(name, 0) > 0
        if bad:
            self.fail[name] -= 1
        return FakeJob(not bad, name, f"logs/{self.n}")


def test_the_scheduler_respects_claims_retries_and_reports_failures_with_logs():
    ex = FakeExecutor(fail={"cell-a": 1, "cell-d": 5})
    held: dict[str, str] = {}
    events: list[str] = []

    def fn(name):
        return name

    tasks = [Task("tok-1", fn, ("tok-1",), frozenset({"tok:1"})),
             Task("cell-a", fn, ("cell-a",), frozenset({"tok:1", "model:m1"}), cell="a"),
             Task("cell-b", fn, ("cell-b",), frozenset({"tok:1", "model:m1"}), cell="b"),
             Task("cell-c", fn, ("cell-c",), frozenset({"tok:2", "model:m2"}), cell="c"),
             Task("cell-d", fn, ("cell-d",), frozenset({"tok:2", "model:m3"}), cell="d")]
    orig_submit = ex.submit

    def submit(fn_, *args):
        task = next(t for t in tasks if t.args == args)
        for c in task.holding:  # no claim is ever held by two running jobs
            assert c not in held, f"{task.name} and {held.get(c)} both hold {c}"
            held[c] = task.name
        events.append(f"start {task.name}")
        job = orig_submit(fn_, *args)

        def release(names=tuple(task.holding)):
            for c in names:
                held.pop(c, None)

        job.on_end = release
        return job

    ex.submit = submit
    results: list[str] = []
    done: set[str] = set()

    def on_result(task, result):
        results.append(result)
        events.append(f"end {task.name}")

    said: list[str] = []
    failures = run_tasks(tasks, ex, workers=3, retries=1, done=done, on_result=on_result, say=said.append, poll_s=0)
    assert events.index("end tok-1") < events.index("start cell-a")  # the tokenizer stage first
    assert events.index("end cell-a") < events.index("start cell-b")  # m1 trained once, then reused
    assert ex.started.count("cell-a") == 2  # failed once, retried, then finished
    assert "cell-a" in results and "cell-b" in results and "cell-c" in results
    assert [f.name for f in failures] == ["cell-d"]  # failed twice: reported with its logs
    assert failures[0].logs and failures[0].logs[0].endswith(".err") and "ValueError: cell exploded" in failures[0].error
    assert any("retry 1 of 1" in m for m in said)
    assert {"tok:1", "model:m1", "tok:2", "model:m2"} <= done and "model:m3" not in done


def test_parse_executor_reports_every_bad_key_and_flags_override_the_table():
    cfg = parse_executor({"kind": "slurm", "partition": "gpu", "workers": 4}, overrides={"workers": 8, "retries": None})
    assert cfg == ExecutorConfig(kind="slurm", partition="gpu", workers=8)
    with pytest.raises(ConfigError) as err:
        parse_executor({"kind": "ray", "wokers": 2, "retries": -1, "mem_gb": "lots"})
    text = str(err.value)
    for part in ("executor.kind: expected one of serial, local, slurm", ("executor.wokers: unknown key (did you mean "
                 "'workers'?"), "executor.retries: expected an integer >= 0", "executor.mem_gb: expected a positive"):
        assert part in text


def test_check_validates_the_executor_table_and_it_does_not_change_the_cells(tmp_path):
    plain = tmp_path / "plain.toml"
    plain.write_text(BASE + GRID)
    with_table = tmp_path / "with.toml"
    with_table.write_text(BASE + GRID + '\n[executor]\nkind = "slurm"\npartition = "gpu"\ngpus_per_node = 1\n')
    assert [c.id for c in plan_grid(read_toml(with_table)).cells] == [c.id for c in plan_grid(read_toml(plain)).cells]
    res = CliRunner().invoke(cli, ["check", str(with_table)])
    assert res.exit_code == 0 and "grid ok" in res.output
    bad = tmp_path / "bad.toml"
    bad.write_text(BASE + GRID + "\n[executor]\ngpus = 1\n")
    res = CliRunner().invoke(cli, ["check", str(bad)])
    assert res.exit_code == 2 and "executor.gpus: unknown key" in res.output


def test_a_missing_scheduler_names_the_extra_and_slurm_needs_sbatch(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit -> ImportError
    with pytest.raises(ConfigError, match=r"install the 'cluster' extra: pip install 'tokenloom\[cluster\]'"):
        require_submitit()
    grid = tmp_path / "grid.toml"
    grid.write_text(BASE + GRID)
    res = CliRunner().invoke(cli, ["ablate", str(grid), "--out", str(tmp_path / "o"), "--executor", "local"])
    assert res.exit_code == 2 and "tokenloom[cluster]" in res.output
    monkeypatch.delitem(sys.modules, "submitit")
    pytest.importorskip("submitit")
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    res = CliRunner().invoke(cli, ["ablate", str(grid), "--out", str(tmp_path / "o"), "--executor", "slurm",
                                   "--partition", "gpu"])
    assert res.exit_code == 2 and "slurm needs the sbatch command" in res.output
