"""``tokenloom sample``: new samples from a finished run's cached tokenizer and model — the same
codes the run generated for the same prompts and seed, any prompt typed, never a retraining."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_config
from PIL import Image

import tokenloom
from tokenloom.checkpoint import load_tensors
from tokenloom.cli import cli
from tokenloom.config import parse_config
from tokenloom.pipeline import run
from tokenloom.running.images import GRID_LAYOUT_KEY
from tokenloom.running.sample import parse_sampler, sample_run

pytest.importorskip("tokenizers", reason="the caption conditioner needs tokenizers (pip install 'tokenloom[text]')")

BASE = tiny_config(n=48, n_holdout=8, pool=4, warmup=None, samplers='[[sampler]]\nname = "cfg"\nscale = 2.0\n',
                   metrics=(), n_samples=16)


@pytest.fixture(scope="module")
def caption_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("t2i")
    raw = json.loads(json.dumps(BASE))
    raw["conditioner"] = {"name": "caption"}
    record = run(parse_config(raw), out, progress=False)
    return out, record


def test_sampling_the_runs_prompts_gives_the_runs_codes(caption_run):
    out, record = caption_run
    prompts = record["conditioning"]["prompts"]
    got = sample_run(out, prompts=tuple(prompts), n=16, progress=False)
    run_codes = load_tensors(next((out / "cache").glob("samples-*.safetensors")))[0]["codes"]
    assert torch.equal(got["codes"], run_codes)
    assert (out / "samples").is_dir() and got["path"].endswith(".png")
    # image i is prompt i mod k: k columns (a multiple of k, 8 or more wide), one prompt per column
    for asked, ncol in (((prompts[0],), 8), (("a red circle", "two blue squares", "a green triangle"), 9)):
        got = sample_run(out, prompts=asked, n=18, progress=False)
        assert json.loads(Image.open(got["path"]).text[GRID_LAYOUT_KEY])["ncol"] == ncol, asked


def test_a_typed_prompt_seed_and_sampler(caption_run, tmp_path):
    out, _ = caption_run
    a = sample_run(out, prompts=("two red squares",), n=4, seed=3, out=tmp_path / "a.png", progress=False)
    b = sample_run(out, prompts=("two red squares",), n=4, seed=3, out=tmp_path / "b.png", progress=False)
    assert torch.equal(a["codes"], b["codes"]) and (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    greedy = sample_run(out, prompts=("two red squares",), n=4, seed=3, samplers=("greedy",), progress=False)
    assert (greedy["codes"] == greedy["codes"][:1]).all()  # greedy: every image of one prompt is the same
    assert parse_sampler("top-k:k=16,x=yes") == {"name": "top-k", "k": 16, "x": "yes"}


def test_clear_errors_and_never_training(caption_run, tmp_path):
    out, _ = caption_run
    with pytest.raises(tokenloom.ConfigError, match="use --prompt"):
        sample_run(out, classes=("circle",), progress=False)
    with pytest.raises(tokenloom.InputError, match="no results.json"):
        sample_run(tmp_path, prompts=("a red circle",), progress=False)
    res = CliRunner().invoke(cli, ["sample", str(out), "--prompt", "two red squares", "-n", "2", "--out",
                                   str(tmp_path / "g.png"), "--no-progress"])
    assert res.exit_code == 0 and "grid:" in res.output and (tmp_path / "g.png").is_file()
    # a class-conditional run: --class by name; its model gone from the cache -> refused, not retrained
    raw = json.loads(json.dumps(BASE))
    cls_out = tmp_path / "cls"
    run(parse_config(raw), cls_out, progress=False)
    got = sample_run(cls_out, classes=("circle", "2"), n=4, progress=False)
    assert got["conditions"] == ["circle", "triangle"]
    for f in (cls_out / "cache").glob("model-*.safetensors"):
        f.unlink()
    with pytest.raises(tokenloom.InputError, match="never trains"):
        sample_run(cls_out, classes=("circle",), progress=False)
    with pytest.raises(tokenloom.ConfigError, match="use --class"):
        sample_run(cls_out, prompts=("a red circle",), progress=False)
