"""A head's sampling-only options (``Config.sampling_options``) stay out of the model's cache key
and go into the samples key (``tokenloom.running.cache.head_keys``): sweeping a diffusion head's
``sampling_steps`` reuses the trained model and draws new samples; anything else in ``[head]``
still retrains; discrete runs keep their keys."""

from __future__ import annotations

import pytest

from tokenloom.config import parse_config
from tokenloom.registry import get_registry
from tokenloom.running.cache import head_keys, model_key, samples_key


class _Spec:
    def key(self) -> dict:
        return {"seq_len": 4}


def _cfg(**head):
    raw = {"seed": 0, "data": {"name": "shapes", "size": 8, "n": 48, "n_holdout": 8},
           "tokenizer": {"name": "patch", "patch": 2}, "generator": {"name": "raster"},
           "head": {"name": "diffusion", "width": 16, "depth": 1, "sampling_steps": 3, **head},
           "model": {"n_layer": 1, "d_model": 16, "n_head": 2},
           "train": {"steps": 3, "batch_size": 4, "warmup": 1},
           "metrics": {"names": ["cost"], "n_samples": 4}}
    return parse_config(raw)


def _keys(cfg):
    m = model_key(cfg, _Spec(), "tok", 3, "data")
    return m, samples_key(cfg, m, n=4, region=None, micro_batch=4)


@pytest.fixture
def declared(monkeypatch):
    cls = get_registry().get("head", "diffusion").cls.Config
    monkeypatch.setattr(cls, "sampling_options", ("sampling_steps", "clip_denoised"), raising=False)


def test_sampling_only_options_reuse_the_model_and_change_the_samples(declared):
    (m3, s3), (m7, s7) = _keys(_cfg()), _keys(_cfg(sampling_steps=7))
    assert m3 == m7 and s3 != s7
    assert _keys(_cfg(clip_denoised=False))[0] == m3
    model_part, sampling_part = head_keys(_cfg(sampling_steps=7))
    assert "sampling_steps" not in model_part["head"]["config"]
    assert sampling_part == {"head_sampling": {"sampling_steps": 7, "clip_denoised": True}}
    assert _keys(_cfg(width=32))[0] != m3  # a training option retrains
    assert _keys(_cfg(diffusion_batch_mul=2))[0] != m3


def test_undeclared_options_stay_in_the_model_key(monkeypatch):
    cls = get_registry().get("head", "diffusion").cls.Config
    monkeypatch.setattr(cls, "sampling_options", (), raising=False)
    (m3, _), (m7, _) = _keys(_cfg()), _keys(_cfg(sampling_steps=7))
    assert m3 != m7
    assert head_keys(_cfg())[1] == {}


def test_no_head_adds_nothing_to_either_key():
    raw = {"seed": 0, "data": {"name": "shapes", "size": 8, "n": 48, "n_holdout": 8},
           "tokenizer": {"name": "pixel", "bits": 1}, "generator": {"name": "raster"},
           "model": {"n_layer": 1, "d_model": 16, "n_head": 2}, "train": {"steps": 3, "batch_size": 4}}
    plain = parse_config(raw)
    named = parse_config({**raw, "head": {"name": "categorical"}})
    assert head_keys(plain) == head_keys(named) == ({}, {})
    assert _keys(plain) == _keys(named)
