"""Conditioning through a whole run: ``[conditioner] name = "class"`` gives the numbers of a run
without it; a caption-conditioned run trains, generates from the held-out captions or a prompts
file, and says what was asked for."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config

from tokenloom.config import parse_config
from tokenloom.pipeline import run

pytest.importorskip("tokenizers", reason="the caption conditioner needs tokenizers (pip install 'tokenloom[text]')")

BASE = tiny_config(n=48, n_holdout=8, pool=4, warmup=None, samplers='[[sampler]]\nname = "cfg"\nscale = 2.0\n',
                   metrics=(), n_samples=16)


def config(**extra):
    raw = json.loads(json.dumps(BASE))
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(raw.get(k), dict):
            raw[k].update(v)
        else:
            raw[k] = v
    return parse_config(raw)


def test_the_class_conditioner_reproduces_a_run_without_one(tmp_path):
    plain = run(config(), tmp_path / "a", progress=False)
    explicit = run(config(conditioner={"name": "class"}), tmp_path / "b", progress=False)
    for key in ("nll_bits_per_image", "nfe"):
        assert plain["metrics"][key] == explicit["metrics"][key]
    pa = sorted((tmp_path / "a" / "cache").glob("samples-*.safetensors"))
    pb = sorted((tmp_path / "b" / "cache").glob("samples-*.safetensors"))
    from tokenloom.checkpoint import load_tensors

    assert torch.equal(load_tensors(pa[0])[0]["codes"], load_tensors(pb[0])[0]["codes"])
    assert "conditioner" not in plain["config"] and "conditioning" not in plain


def test_a_caption_run_generates_from_held_out_captions_and_a_prompts_file(tmp_path):
    cfg = config(conditioner={"name": "caption", "max_words": 8}, metrics={"names": ["shapes-oracle"]})
    rec = run(cfg, tmp_path / "c", progress=False)
    cond = rec["conditioning"]
    assert cond["conditioner"] == "caption" and 1 <= cond["n_prompts"] <= 8
    assert rec["metrics"]["nll_bits_per_image"] is not None and rec["metrics"]["shapes_valid"] is not None
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\ntwo red squares\n\na blue circle\n")
    cfg2 = config(conditioner={"name": "caption", "max_words": 8},
                  metrics={"names": ["shapes-oracle"], "prompts": str(prompts)})
    rec2 = run(cfg2, tmp_path / "c", progress=False)
    assert rec2["conditioning"]["prompts"] == ["two red squares", "a blue circle"]
    assert rec2["cache"]["model_reused"]  # the prompts do not retrain the model


def test_caption_conditioner_on_a_data_set_without_captions_is_a_config_error(tmp_path):
    from tokenloom.errors import ConfigError

    cfg = config(conditioner={"name": "caption"}, data={"name": "digits", "size": 8, "n": 40, "n_holdout": 8,
                                                         "channels": 3})
    with pytest.raises(ConfigError, match="reads captions, but the data set has none"):
        run(cfg, tmp_path / "d", progress=False)


def test_prompts_on_a_class_conditioned_run_are_a_config_error(tmp_path):
    from tokenloom.errors import ConfigError

    prompts = tmp_path / "p.txt"
    prompts.write_text("two red squares\n")
    with pytest.raises(ConfigError, match="prompts need a conditioner that reads captions"):
        run(config(metrics={"prompts": str(prompts)}), tmp_path / "e", progress=False)
    with pytest.raises(ConfigError, match="no such file"):
        run(config(conditioner={"name": "caption"}, metrics={"prompts": str(tmp_path / "none.txt")}),
            tmp_path / "f", progress=False)
