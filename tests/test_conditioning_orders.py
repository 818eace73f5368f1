"""Every generation order works with every conditioner: the generator conformance kit (decode-
time logits equal teacher-forced ones, samples follow ``exp(log_likelihood)``, NFE, guidance,
batch independence, determinism) run over backbones whose conditioning prefix has P = 4
positions with padding — the orders were written for the one-token class prefix and are not
changed. The kit builds its tiny backbones with ``tokenloom.model.build_model``; here that is
a prefix backbone (three captions and the null condition, as the kit's three classes)."""

from __future__ import annotations

import pytest
from test_conditioning import ToyEmbeddings, ToyTokens

import tokenloom
import tokenloom.backbone.model as model_module
import tokenloom.testing

_ORIGINAL = model_module.build_model


def _prefixed(kind):
    cond = (ToyTokens if kind == "tokens" else ToyEmbeddings)(None)
    table = cond.encode([tokenloom.Condition(caption=c) for c in ("ab", "c", "zzzz")])

    def build(spec, config, *, n_classes, seed=0, **kw):
        assert n_classes == 3  # the kit's classes: three captions here
        return _ORIGINAL(spec, config, n_classes=n_classes, seed=seed, conditioner=cond, conditions=table,
                         **kw)  # kw: e.g. head= (the kit's continuous models)

    return build


def _pix(gh, gw, depth3=False):
    return ("pixel", {"bits": 1, "pool": 2, "per_channel": depth3, "image_shape": (3, 2 * gh, 2 * gw)})


_MS = ("multiscale", {"scales": (1, 2, 4), "downsample": 2, "image_shape": (3, 8, 8), "codebook_size": 8,
                      "code_dim": 4})

FAST = [("raster", {}, None, "tokens"), ("masked", {}, None, "embeddings"), ("random", {}, None, "tokens"),
        ("random-parallel", {}, None, "embeddings"), ("sjd", {}, None, "tokens")]
SLOW = [("speculative", {}, None, "tokens"), ("par", {}, _pix(4, 2, True), "tokens"),
        ("zipar", {}, _pix(3, 4), "embeddings"), ("next-scale", {}, _MS, "tokens"),
        ("next-block", {}, None, "tokens"), ("next-cell", {}, _pix(4, 2), "embeddings"),
        ("neighboring", {}, _pix(3, 4), "tokens"), ("next-scale-markov", {"steps": 2}, _MS, "embeddings"),
        ("next-frequency", {}, ("frequency", {"levels": 2, "drop_levels": 0, "bins": 3, "image_shape": (3, 4, 4)}),
         "tokens"), ("depth-stack", {}, _pix(2, 2, True), "tokens"), ("raster", {"rar": True}, None, "embeddings")]


def _check(monkeypatch, name, config, tok, kind):
    monkeypatch.setattr(model_module, "build_model", _prefixed(kind))
    tokenloom.testing.check("generator", name, tokenizer=tok, max_examples=3, **config)


@pytest.mark.parametrize("name,config,tok,kind", FAST, ids=lambda v: str(v))
def test_orders_work_with_a_several_position_prefix(monkeypatch, name, config, tok, kind):
    _check(monkeypatch, name, config, tok, kind)


@pytest.mark.slow
@pytest.mark.parametrize("name,config,tok,kind", SLOW, ids=lambda v: str(v))
def test_every_order_works_with_a_several_position_prefix(monkeypatch, name, config, tok, kind):
    _check(monkeypatch, name, config, tok, kind)


def test_every_registered_order_is_covered():
    covered = {n for n, *_ in FAST + SLOW}
    assert set(tokenloom.available("generator")) <= covered, set(tokenloom.available("generator")) - covered
