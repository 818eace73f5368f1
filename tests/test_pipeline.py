"""End to end on tiny configs (8-px shapes, a few training steps): files
written, NFE per order, caches reused across runs, resumption after a kill,
the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import tokenloom
from tokenloom.checkpoint import load_tensors
from tokenloom.cli import cli
from tokenloom.config import load_config
from tokenloom.pipeline import demo_config, region_mask, run

TOML = """
seed = 0
[data]
name = "shapes"
size = 8
n = 64
n_holdout = 16
[tokenizer]
name = "pixel"
bits = 1
pool = 2
[generator]
name = "{generator}"
{generator_extra}
[model]
n_layer = 1
d_model = 16
n_head = 2
[train]
steps = 4
batch_size = 8
warmup = 1
{samplers}
[metrics]
names = ["nll", "cost"]
n_samples = 8
"""

TOPK = '[[sampler]]\nname = "top-k"\nk = 3\n'
CFG = '[[sampler]]\nname = "cfg"\nscale = 2.0\n' + TOPK


def write(tmp_path, name="raster", extra="", samplers=TOPK, file=None):
    path = tmp_path / (file or f"{name}.toml")
    path.write_text(TOML.format(generator=name, generator_extra=extra, samplers=samplers))
    return path


def test_run_writes_results_samples_and_reuses_caches(tmp_path):
    out = tmp_path / "out"
    rec = run(load_config(write(tmp_path)), out, progress=False)
    assert rec["metrics"]["nfe"] == 16  # raster: L = 4×4
    assert rec["metrics"]["seconds_per_image"] > 0 and rec["metrics"]["tokens_per_second"] > 0
    assert rec["metrics"]["uniform_bits_per_image"] == pytest.approx(16 * 3)
    assert 0 < rec["metrics"]["nll_bits_per_image"] < 100
    for key in ("nfe", "seconds_per_image", "tokens_per_second", "peak_memory_bytes", "kv_cache_bytes",
                "train_tokens", "train_flops"):
        assert rec["stats"][key] is not None and rec["stats"][key] >= 0, key
    assert rec["stats"]["train_tokens"] == 4 * 8 * 16
    # k+v, layers, rows (a full micro-batch of 16: the 8 samples and 8 extras), heads, L, hd, fp32
    assert rec["stats"]["kv_cache_bytes"] == 2 * 1 * 16 * 2 * 16 * 8 * 4
    data = json.loads((out / "results.json").read_text())
    assert data["tokenloom_version"] == tokenloom.__version__
    (r,) = data["runs"]
    assert r["id"] == rec["id"] and r["components"] == {"tokenizer": "pixel", "generator": "raster",
                                                        "sampler": ["top-k"], "metrics": ["nll", "cost"]}
    assert set(r["eval_cards"]) == {"nll", "cost"}
    png = out / r["artifacts"]["samples"]
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 8 * 8
    assert rec["id"] in (out / "results.md").read_text()
    assert not rec["cache"]["tokenizer_reused"] and not rec["cache"]["model_reused"]

    # a changed sampler chain reuses tokenizer and model; the table gets a second row
    rec2 = run(load_config(write(tmp_path, samplers=CFG, file="cfg.toml")), out, progress=False)
    assert rec2["cache"]["tokenizer_reused"] and rec2["cache"]["model_reused"]
    assert rec2["id"] != rec["id"] and rec2["stats"]["train_tokens"] == rec["stats"]["train_tokens"]
    assert len(json.loads((out / "results.json").read_text())["runs"]) == 2

    # other orders share the tokenizer, train their own backbone, and cost L, L and T passes
    rnd = run(load_config(write(tmp_path, "random")), out, progress=False)
    msk = run(load_config(write(tmp_path, "masked", extra="steps = 3")), out, progress=False)
    assert rnd["cache"]["tokenizer_reused"] and msk["cache"]["tokenizer_reused"]
    assert not rnd["cache"]["model_reused"] and rnd["cache"]["model"] != rec["cache"]["model"]
    assert rnd["metrics"]["nfe"] == 16 and msk["metrics"]["nfe"] == 3
    assert rnd["metrics"]["nll_bits_per_image"] is not None and msk["metrics"]["nll_bits_per_image"] is None
    assert len(list((out / "cache").glob("tokenizer-*.safetensors"))) == 1


def test_inpainting_run_shows_the_known_region(tmp_path):
    out = tmp_path / "out"
    plain = run(load_config(write(tmp_path, "random")), out, progress=False)
    inpaint = run(load_config(write(tmp_path, "random")), out, progress=False, region="center")
    assert inpaint["cache"]["model_reused"] and inpaint["id"] != plain["id"] and inpaint["region"] == "center"
    with Image.open(out / plain["artifacts"]["samples"]) as a, Image.open(out / inpaint["artifacts"]["samples"]) as b:
        assert b.height > a.height  # a row of known context above each row of samples
    samples = max((out / "cache").glob("samples-*.safetensors"), key=lambda p: p.stat().st_mtime)
    codes = load_tensors(samples)[0]["codes"]
    held = load_tensors(next((out / "cache").glob("codes-*.safetensors")))[0]["holdout"]
    keep = region_mask(tokenloom.TokenLayout(scales=((4, 4),)), "center")
    assert keep.sum() == 12 and not keep[5] and keep[0]
    assert torch.equal(codes[:, keep], held[:8, keep])  # every known token kept


def test_region_needs_a_generator_that_supports_it(tmp_path):
    with pytest.raises(tokenloom.ConfigError, match="does not support known"):
        run(load_config(write(tmp_path)), tmp_path / "out", progress=False, region="left")
    assert not list((tmp_path / "out" / "cache").glob("model-*"))  # refused before training


def test_a_killed_run_resumes_and_matches_an_uninterrupted_one(tmp_path, monkeypatch):
    from tokenloom.plugins.generators.raster import RasterGenerator

    cfg = load_config(write(tmp_path))
    straight = run(cfg, tmp_path / "a", progress=False)

    original = RasterGenerator.on_train_step

    def die_at_step_3(self, step, n_steps):
        if step == 3:
            raise KeyboardInterrupt  # the process is killed in step 3
        original(self, step, n_steps)

    monkeypatch.setattr(RasterGenerator, "on_train_step", die_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "b", progress=False)
    assert list((tmp_path / "b" / "cache").glob("model-*.train.safetensors"))
    monkeypatch.setattr(RasterGenerator, "on_train_step", original)
    resumed = run(cfg, tmp_path / "b", progress=False)
    assert resumed["cache"]["tokenizer_reused"] and resumed["train"]["resumed_from"] == 3
    a = load_tensors(next((tmp_path / "a" / "cache").glob("model-*.safetensors")))[0]
    b = load_tensors(next((tmp_path / "b" / "cache").glob("model-*.safetensors")))[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["id"] == straight["id"]


def test_cli_run_prints_the_table_and_errors_cleanly(tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["run", str(write(tmp_path)), "--out", str(tmp_path / "o"), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "| raster-" in res.output and "results.md" in res.output and "samples/" in res.output
    res = runner.invoke(cli, ["run", str(write(tmp_path)), "--out", str(tmp_path / "o"), "--region", "top",
                              "--no-progress"])
    assert res.exit_code == 2 and "does not support known" in res.output and "Traceback" not in res.output
    bad = tmp_path / "bad.toml"
    bad.write_text(TOML.format(generator="rastr", generator_extra="", samplers=TOPK))
    res = runner.invoke(cli, ["run", str(bad), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "did you mean 'raster'" in res.output


def test_demo_config_is_a_valid_small_run():
    cfg, _note = demo_config()
    assert cfg.data.name == "shapes" and cfg.generator.name == "raster"
    assert [s.name for s in cfg.sampler] == ["top-k"]
    assert cfg.tokenizer.name in ("vq", "pixel") and "nll" in [m.name for m in cfg.metrics]
