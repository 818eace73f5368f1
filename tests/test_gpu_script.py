"""bench/gpu.py does not rot (its dry run covers every code path on the CPU; without a device it says
so), and the static-KV-cache decode path it measures draws the eager path's tokens — uncompiled,
captured whole by torch.compile, in bf16 autocast on the CPU, with guidance."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tokenloom
from tokenloom.backbone.kvcache import StaticDecoder, static_raster_decode
from tokenloom.config import ModelConfig
from tokenloom.errors import InputError
from tokenloom.model import InstrumentedModel, build_model
from tokenloom.orders import raster_decode
from tokenloom.rng import RowRNG
from tokenloom.sampling import SamplerChain

ROOT = Path(__file__).resolve().parents[1]


def small(pos: str = "learned", n_classes: int = 3, **model):
    tok = tokenloom.create("tokenizer", "pixel", bits=1, image_shape=(3, 4, 4))
    gen = tokenloom.create("generator", "raster", tokenizer=tok)
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, d_model=32, n_head=2, pos=pos, **model)
    return build_model(gen.model_spec(), cfg, n_classes=n_classes).eval(), tok.layout.length


def rng(B: int) -> RowRNG:
    return RowRNG(7, torch.arange(B))


@pytest.mark.parametrize("pos", ["learned", "rope2d"])
def test_static_decoding_draws_the_eager_tokens_and_logits(pos):
    model, L = small(pos)
    cond = torch.tensor([0, 1, 2, 1, 0])
    eager = raster_decode(model, SamplerChain(), cond, rng(5), L)
    assert torch.equal(static_raster_decode(model, SamplerChain(), cond, rng(5), L), eager)
    # the graph captured whole (fullgraph, static shapes) by torch.compile: the same tokens
    compiled = static_raster_decode(InstrumentedModel(model), SamplerChain(), cond, rng(5), L, compile=True,
                                    backend="eager")
    assert torch.equal(compiled, eager)
    # step by step, the logits agree with the eager cached forward pass to rounding
    dec = StaticDecoder(model, 5, L)
    cache = model.new_cache(5, L)
    token = torch.zeros(5, 1, dtype=torch.long)
    with torch.no_grad():
        for t in range(L):
            want = model(token, cond, cache=cache, positions=torch.tensor([t - 1 if t else -1]))[:, -1]
            got = dec.step(token, cond, torch.tensor([t]))
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            token = eager[:, t : t + 1]


def test_static_decoding_with_guidance_and_a_reused_decoder():
    model, L = small("rope2d")
    chain = SamplerChain([tokenloom.create("sampler", "cfg", scale=2.0), tokenloom.create("sampler", "top-k", k=2)])
    cond = torch.tensor([0, 2])
    eager = raster_decode(model, chain, cond, rng(2), L)
    dec = StaticDecoder(model, 4, L)  # conditional and null rows in one batch
    assert torch.equal(static_raster_decode(model, chain, cond, rng(2), L, decoder=dec), eager)
    assert torch.equal(static_raster_decode(model, chain, cond, rng(2), L, decoder=dec), eager)  # reset between
    with pytest.raises(InputError, match="the decoder holds 4 rows"):
        static_raster_decode(model, chain, torch.tensor([0, 1, 2]), rng(3), L, decoder=dec)


def test_bf16_autocast_sampling_runs_on_the_cpu():
    model, L = small("rope2d")
    cond = torch.tensor([0, 1, 2, 1])
    fp32 = raster_decode(model, SamplerChain(), cond, rng(4), L)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the eager product path under autocast
        eager_bf16 = raster_decode(model, SamplerChain(), cond, rng(4), L)
    static_bf16 = static_raster_decode(model, SamplerChain(), cond, rng(4), L, bf16=True)
    for codes in (eager_bf16, static_bf16):
        assert codes.shape == (4, L) and int(codes.min()) >= 0 and int(codes.max()) < 8
        assert (codes == fp32).float().mean() > 0.5  # bf16 rounding flips a few draws, not most
    assert StaticDecoder(model, 4, L, bf16=True).k_cache.dtype == torch.bfloat16


def test_static_decoding_refuses_backbones_it_does_not_cover():
    model, _ = small(cond="adaln")
    assert StaticDecoder.unsupported(model) == "AdaLN conditioning"
    with pytest.raises(InputError, match="static decoding: AdaLN conditioning"):
        StaticDecoder(model, 2)


@pytest.mark.slow
def test_static_decoding_compiled_by_inductor_draws_the_eager_tokens():
    model, L = small("rope2d")
    cond = torch.tensor([0, 1])
    eager = raster_decode(model, SamplerChain(), cond, rng(2), L)
    assert torch.equal(static_raster_decode(model, SamplerChain(), cond, rng(2), L, compile=True), eager)


def run_script(*args, env=None):
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600, check=False)


def test_gpu_script_dry_run_covers_every_section_on_the_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    proc = run_script("--dry-run", "--out", str(out), "--work", str(tmp_path / "work"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["dry_run"] and res["device"]["type"] == "cpu" and not res["skipped"]
    variants = res["train"]["variants"]
    assert set(variants) >= {"ours fp32", "ours tf32", "ours bf16", "ours bf16+fused+compile", "bare fp32",
                             "bare bf16+fused+compile"}
    assert all(v["tokens_per_s"] > 0 and 0 < v["mfu"] for v in variants.values())
    assert variants["ours bf16+fused+compile"]["compile"] and variants["ours bf16"]["bf16"]
    rows = res["decode"]["rows"]
    assert [r["batch"] for r in rows] == [1, 2]
    assert all(r["static_equals_eager"] == 1.0 for r in rows)  # the compiled static path: the eager tokens
    assert all("ours static+compile bf16" in r for r in rows)
    spec = {r["generator"]: r for r in res["speculative"]["rows"]}
    assert set(spec) == {"raster", "sjd", "speculative"} and spec["sjd"]["speedup_wallclock"] is not None
    assert "**Training**" in res["markdown"] and "**Decoding**" in res["markdown"]


def test_gpu_script_without_a_device_says_so():
    proc = run_script(env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "--dry-run" in proc.stderr


def test_the_imagenet256_recipe_passes_check_with_local_files(tmp_path):
    """examples/imagenet256.toml (LlamaGen-B-like, ADM protocol) validates once its three local paths
    exist: an ImageNet-layout folder (empty placeholder files: check reads no image), the Inception
    weights and the reference statistics."""
    from click.testing import CliRunner

    from tokenloom.config import load_config, read_toml
    from tokenloom.pipeline_check import preflight
    from tokenloom.running.cli import cli

    text = (ROOT / "examples" / "imagenet256.toml").read_text()
    raw = read_toml(ROOT / "examples" / "imagenet256.toml")
    for d in ("n01440764", "n01443537"):
        (tmp_path / "train" / d).mkdir(parents=True)
    for i in range(raw["data"]["n_holdout"] + 2):  # more images than held out: some left to train on
        (tmp_path / "train" / ("n01440764", "n01443537")[i % 2] / f"{i}.JPEG").touch()
    (tmp_path / "fid").mkdir()
    (tmp_path / "fid" / "pt_inception-2015-12-05-6726825d.pth").touch()
    (tmp_path / "fid" / "VIRTUAL_imagenet256_labeled.npz").touch()
    local = tmp_path / "imagenet256.toml"
    local.write_text(text.replace("/data/imagenet/train", str(tmp_path / "train")).replace("/data/fid", str(tmp_path / "fid")))

    res = CliRunner().invoke(cli, ["check", str(local)])
    assert res.exit_code == 0, res.output
    assert res.output.strip().endswith(": ok")
    cfg = load_config(local)
    parts = preflight(cfg)
    assert parts.tokenizer.layout.length == 256 and parts.tokenizer.vocab_size == 16384  # VQ-16 at 256 px
    assert (cfg.model.n_layer, cfg.model.d_model, cfg.model.n_head) == (12, 768, 12)
    assert cfg.train.bf16 and cfg.train.compile
    fid = next(m for m in cfg.metrics if m.name == "fid")
    assert fid.options["extractor"] == "inception-v3-compat"
    assert fid.options["reference_stats"] == str(tmp_path / "fid" / "VIRTUAL_imagenet256_labeled.npz")
    # the shipped file names paths that do not exist here: check says which
    res = CliRunner().invoke(cli, ["check", str(ROOT / "examples" / "imagenet256.toml")])
    assert res.exit_code == 2 and "data.path: no such directory: /data/imagenet/train" in res.output
