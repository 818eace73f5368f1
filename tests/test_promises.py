"""Tests that hold the README to its word: ``tokenloom demo`` runs end to end (shrunk), and
``torchrun … run`` (not only ``ablate``) agrees with one process at the tolerance the README states
("weights agree to rounding"; with the same weights, exactly the samples and metrics of one)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_config_toml

from tokenloom import pipeline
from tokenloom.checkpoint import load_tensors
from tokenloom.cli import cli
from tokenloom.reports import TIMING_KEYS

RUN = tiny_config_toml(seed=3, n_holdout=40, steps=8, metrics=("nll", "cost", "shapes-oracle"), n_samples=24)


def _timing_free(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in TIMING_KEYS}


def _only_run(out) -> dict:
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert len(runs) == 1
    return runs[0]


def test_demo_command_runs_end_to_end_shrunk(tmp_path, monkeypatch):
    """`tokenloom demo` — the command a newcomer types first — on the demo's own config with every
    budget shrunk: it trains, samples, scores and writes the table and the sample grid it announces."""
    small = json.loads(json.dumps(pipeline.DEMO))
    small["data"].update(n=96, n_holdout=24)
    if "steps" in small["tokenizer"]:
        small["tokenizer"]["steps"] = 3
    small["train"].update(steps=3, batch_size=8, warmup=1)
    small["model"].update(n_layer=1, d_model=16, n_head=2)
    small["metrics"]["n_samples"] = 16
    monkeypatch.setattr(pipeline, "DEMO", small)
    out = tmp_path / "demo"
    res = CliRunner().invoke(cli, ["demo", "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "demo finished in" in res.output and "results.md" in res.output
    record = _only_run(out)
    assert record["components"]["tokenizer"] == pipeline.DEMO["tokenizer"]["name"]
    assert record["components"]["generator"] == "raster"
    # the demo's metrics that are installed are all there, with numbers
    assert record["metrics"]["nfe"] > 0
    assert 0.0 <= record["metrics"]["shapes_valid"] <= 1.0
    assert (out / "results.md").is_file() and (out / record["artifacts"]["samples"]).is_file()


def test_torchrun_run_matches_one_process(tmp_path, cli_env):
    """`torchrun --nproc_per_node=2 -m tokenloom run` against `tokenloom run` on one process.

    Two processes train the backbone themselves under DDP: the README promises weights equal to one
    process's up to the order of floating-point sums (checked at rtol 1e-4 / atol 1e-6, the same
    tolerance as the ablation test; about 1e-8 in practice). Then, handed one process's weights,
    they must generate exactly its samples and report exactly its metrics (timing aside)."""
    cfg = tmp_path / "run.toml"
    cfg.write_text(RUN)
    env = {**cli_env, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "tokenloom", "run", str(cfg), "--out", str(tmp_path / "one"),
                          "--no-progress"], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert one.returncode == 0, one.stdout + one.stderr
    r1 = _only_run(tmp_path / "one")

    # 1. DDP training from scratch: weights to rounding
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tokenloom", "run", str(cfg), "--out", str(two), "--no-progress"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    r2 = _only_run(two)
    assert not r2["cache"]["model_reused"]  # trained by the two processes themselves
    model = f"model-{r1['cache']['model']}.safetensors"
    assert r2["cache"]["model"] == r1["cache"]["model"]  # the world size is not part of the cache key
    a, b = load_tensors(tmp_path / "one" / "cache" / model)[0], load_tensors(two / "cache" / model)[0]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k
    assert r2["train"]["final_loss"] == pytest.approx(r1["train"]["final_loss"], rel=1e-5)
    assert r2["metrics"]["nfe"] == r1["metrics"]["nfe"]
    assert r2["metrics"]["nll_bits_per_image"] == pytest.approx(r1["metrics"]["nll_bits_per_image"], rel=1e-4)

    # 2. the same weights: exactly the samples and metrics of one process
    same = tmp_path / "same"
    shutil.copytree(tmp_path / "one" / "cache", same / "cache",
                    ignore=shutil.ignore_patterns("samples-*"))
    res = subprocess.run(cmd[:-2] + [str(same), "--no-progress"], env=env, capture_output=True, text=True,
                         timeout=300, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    r3 = _only_run(same)
    assert r3["cache"]["model_reused"]
    assert _timing_free(r3["metrics"]) == _timing_free(r1["metrics"])
    png1, png3 = tmp_path / "one" / r1["artifacts"]["samples"], same / r3["artifacts"]["samples"]
    assert hashlib.sha256(png1.read_bytes()).digest() == hashlib.sha256(png3.read_bytes()).digest()
