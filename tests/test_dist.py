"""Several processes: ``torchrun --nproc_per_node=2`` (gloo on CPU) against
one process on the same tiny grid.

What is guaranteed, and tested: with the same trained weights, two processes
generate exactly the samples of one (image i depends only on (seed, i); fixed
micro-batches shared out over ranks) and report exactly the same metrics
(timing fields aside). DDP training itself sees the very batches of one
process (every rank builds the global batch and trains on its rows, the loss
normalised by the global count), but summing gradients over ranks changes
the order of floating-point additions, so its weights agree with one
process's to rounding, not bit for bit — the test checks that tolerance."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import tiny_config_toml

from tokenloom.ablation import run_ablation
from tokenloom.checkpoint import load_tensors
from tokenloom.interfaces import TrainBatch
from tokenloom.reports import TIMING_KEYS
from tokenloom.train import shard_batch

GRID = tiny_config_toml(n_holdout=70, generator=None, steps=8, metrics=("nll", "cost", "shapes-oracle"),
                        n_samples=40) + """
[grid]
generator = [{name = "raster"}, {name = "masked", steps = 3}]
"""


def _timing_free(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in TIMING_KEYS}


def test_torchrun_two_processes_match_one(tmp_path, cli_env):
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the CPU thread count is part of the training caches' keys: torchrun's ranks use 1
    try:
        one = run_ablation(grid, tmp_path / "one", progress=False, echo=lambda m: None, plots=False)
    finally:
        torch.set_num_threads(before)
    by_gen = {r["components"]["generator"]: r for r in one["runs"]}

    # two processes start from one process's tokenizer, codes and raster model; the masked model they
    # train themselves with DDP; every sample and report is theirs
    two = tmp_path / "two"
    (two / "cache").mkdir(parents=True)
    masked_model = f"model-{by_gen['masked']['cache']['model']}.safetensors"
    for f in (tmp_path / "one" / "cache").glob("*.safetensors"):
        if f.name.startswith("tokenizer-") or f.name == f"model-{by_gen['raster']['cache']['model']}.safetensors":
            shutil.copy(f, two / "cache" / f.name)
    for f in (tmp_path / "one" / "cache").glob("codes-*"):  # the code stores (directories of shards)
        shutil.copytree(f, two / "cache" / f.name)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tokenloom", "ablate", str(grid), "--out", str(two), "--no-progress"]
    res = subprocess.run(cmd, check=False, env={**cli_env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("2 models, 2 generation cells") == 1  # rank 0 alone prints

    data = json.loads((two / "results.json").read_text())
    assert data["world_size"] == 2
    got = {r["components"]["generator"]: r for r in data["runs"]}
    assert got["raster"]["cache"]["model_reused"] and not got["masked"]["cache"]["model_reused"]

    # same weights -> the same samples, bit for bit, and the same metrics (timing aside)
    r1, r2 = by_gen["raster"], got["raster"]
    assert r1["id"] == r2["id"]
    assert _timing_free(r1["metrics"]) == _timing_free(r2["metrics"])
    assert r1["nll"] == r2["nll"] and r1["eval_cards"] == r2["eval_cards"]
    png1, png2 = (tmp_path / "one" / r1["artifacts"]["samples"]), (two / r2["artifacts"]["samples"])
    assert hashlib.sha256(png1.read_bytes()).digest() == hashlib.sha256(png2.read_bytes()).digest()
    samples = sorted(p.name for p in (tmp_path / "one" / "cache").glob("samples-*.safetensors"))
    assert samples == sorted(p.name for p in (two / "cache").glob("samples-*.safetensors"))  # same cache keys

    # DDP training: the same batches and schedule; weights equal up to float reduction order
    a, b = load_tensors(tmp_path / "one" / "cache" / masked_model)[0], load_tensors(two / "cache" / masked_model)[0]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k
    assert got["masked"]["train"]["steps"] == 8
    assert got["masked"]["train"]["final_loss"] == pytest.approx(by_gen["masked"]["train"]["final_loss"], rel=1e-5)
    assert got["masked"]["metrics"]["nfe"] == by_gen["masked"]["metrics"]["nfe"] == 3
    assert (two / got["masked"]["artifacts"]["samples"]).is_file() and (two / "results.md").is_file()


def test_shard_batch_takes_every_worlds_rows():
    B, T = 6, 6  # square on purpose: a 1-D extra of length T == B stays whole
    batch = TrainBatch(inputs=torch.arange(B * T).reshape(B, T), targets=torch.arange(B * T).reshape(B, T),
                       loss_mask=torch.rand(B, T) > 0.5, cond=torch.arange(B), positions=torch.arange(T),
                       attn_mask=torch.ones(B, T, T, dtype=torch.bool),
                       extra={"target_positions": torch.arange(B * T).reshape(B, T), "shared": torch.arange(T)})
    parts = [shard_batch(batch, r, 2) for r in range(2)]
    assert torch.equal(parts[1].inputs, batch.inputs[1::2]) and torch.equal(parts[0].cond, torch.tensor([0, 2, 4]))
    assert torch.equal(parts[0].positions, batch.positions)  # [T] positions are shared by every row
    assert parts[1].attn_mask.shape == (3, T, T)
    assert torch.equal(parts[1].extra["target_positions"], batch.extra["target_positions"][1::2])
    assert torch.equal(parts[1].extra["shared"], batch.extra["shared"])
    # the rows of all ranks together are the global batch, and the mask count splits exactly
    assert sum(int(p.loss_mask.sum()) for p in parts) == int(batch.loss_mask.sum())
