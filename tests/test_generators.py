"""Generation orders (raster with RAR, random/RandAR, masked/MaskGIT) and
classifier-free guidance: the conformance kit on every registered
generator, plus each order's own decisive details."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenloom
import tokenloom.testing
from tokenloom.backbone.instrumented import InstrumentedModel
from tokenloom.config import ModelConfig
from tokenloom.model import build_model
from tokenloom.rng import RowRNG
from tokenloom.sampling import SamplerChain


def tok(gh: int = 3, gw: int = 4, bits: int = 1):
    return tokenloom.create("tokenizer", "pixel", bits=bits, pool=2, image_shape=(3, 2 * gh, 2 * gw))


def tiny(gen, seed: int = 0, n_classes: int = 3) -> InstrumentedModel:
    cfg = ModelConfig(n_layer=2, d_model=16, n_head=2)
    return InstrumentedModel(build_model(gen.model_spec(), cfg, n_classes=n_classes, seed=seed).eval())


class Spy(InstrumentedModel):
    """Records every forward pass's inputs, positions and row count."""

    def __init__(self, model):
        super().__init__(model.model)
        self.calls = []

    def __call__(self, inputs, cond=None, **kw):
        self.calls.append({"inputs": inputs.clone(), "rows": inputs.shape[0], "positions": kw.get("positions"),
                           "cache": kw.get("cache") is not None})
        return super().__call__(inputs, cond, **kw)


# -- the conformance kit, on every registered generator ------------------------

GENERATORS = [("raster", {}), ("raster", {"rar": True}), ("random", {}), ("masked", {}), ("masked", {"steps": 3})]


@pytest.mark.parametrize("name,config", GENERATORS, ids=lambda v: str(v))
def test_conformance(name, config):
    tokenloom.testing.check("generator", name, max_examples=6, **config)


# Orders that refuse some pixel layouts by contract (a multi-scale tokenizer, a cell or window that must fit
# the grid, one code per position) — tests/test_orders.py runs the kit over each with tokenizers that fit.
KIT_IN_TEST_ORDERS = {"next-cell", "neighboring", "par", "zipar", "next-scale", "next-scale-markov",
                      "next-frequency"}


def test_every_registered_generator_is_covered():
    assert set(tokenloom.available("generator")) >= {"raster", "random", "masked"}
    for name in tokenloom.available("generator"):
        if name not in {n for n, _ in GENERATORS} | KIT_IN_TEST_ORDERS:
            tokenloom.testing.check("generator", name, max_examples=3)


# -- the conformance kit on continuous tokens ----------------------------------

_KL_SCALES = ("kl", {"token_dim": 2, "downsample": 1, "channels": 4, "steps": 0, "scales": [1, 2, 4],
                     "image_shape": (3, 4, 4)})
CONTINUOUS_KIT = [("raster", {}, None), ("raster", {"rar": True}, ("patch", {"patch": 2, "image_shape": (1, 4, 6)})),
                  ("masked", {}, None), ("masked", {"steps": 3}, ("patch", {"patch": 1, "image_shape": (3, 3, 3)})),
                  ("next-cell", {"cell": 2}, ("patch", {"patch": 1, "image_shape": (2, 4, 4)})),
                  ("next-scale", {}, _KL_SCALES)]


@pytest.mark.parametrize("name,config,tok", CONTINUOUS_KIT, ids=lambda v: str(v))
def test_conformance_on_continuous_tokens(name, config, tok):
    # a continuous `tokenizer` is checked as such (the discrete properties need codes)
    tokenloom.testing.check("generator", name, tokenizer=tok, max_examples=6, token_kinds=("continuous",),
                            **config)


def test_every_continuous_order_is_covered_on_continuous_tokens():
    declared = {n for n in tokenloom.available("generator")
                if tokenloom.get_registry().get("generator", n).cls.continuous_ok}
    assert declared >= {"raster", "masked", "next-scale", "next-cell"}
    assert declared <= {n for n, _, _ in CONTINUOUS_KIT}


def test_the_kit_checks_a_continuous_tokenizer_alone_and_skips_discrete_only_options():
    # tokenizer= continuous: only the continuous properties (the discrete ones would refuse latents)
    tokenloom.testing.check("generator", "next-scale", tokenizer=_KL_SCALES, max_examples=2)
    # style = "maskgit" needs codes by contract: that configuration is checked on codes only
    tokenloom.testing.check("generator", "masked", style="maskgit", max_examples=2)
    with pytest.raises(tokenloom.ConfigError, match="maskgit"):
        tokenloom.create("generator", "masked", style="maskgit",
                         tokenizer=tokenloom.create("tokenizer", "patch", image_shape=(1, 2, 2)))


def test_a_discrete_order_is_not_checked_on_continuous_tokens_unless_asked():
    # random does not declare continuous_ok: asked for continuous tokens, the kit says so
    with pytest.raises(AssertionError, match="does not declare continuous_ok"):
        tokenloom.testing.check("generator", "random", max_examples=2, token_kinds=("continuous",),
                                continuous_tokenizer=("patch", {"patch": 1, "image_shape": (2, 2, 2)}))
    tokenloom.testing.check("generator", "random", max_examples=2, token_kinds=("continuous",))  # nothing to do


# -- raster (LlamaGen) and RAR --------------------------------------------------


def test_raster_nfe_is_L_and_each_position_is_decoded_once_in_raster_order():
    t = tok()
    gen = tokenloom.create("generator", "raster", tokenizer=t)
    spy = Spy(tiny(gen))
    out = gen.generate(spy, SamplerChain(), torch.tensor([0, 1]), rng=RowRNG(0, [0, 1]))
    L = t.layout.length
    assert len(spy.calls) == L == gen.expected_nfe() and all(c["cache"] for c in spy.calls)
    assert all(c["inputs"].shape == (2, 1) for c in spy.calls)  # one token per pass
    fed = torch.cat([c["inputs"] for c in spy.calls[1:]], 1)  # each decoded token is fed back exactly once
    assert torch.equal(fed, out[:, :-1])
    assert [int(c["positions"][0]) for c in spy.calls] == list(range(-1, L - 1))


def test_raster_earlier_logits_ignore_later_codes():
    t = tok()
    gen = tokenloom.create("generator", "raster", tokenizer=t)
    m = tiny(gen)
    codes = torch.randint(0, t.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    for j in (0, 5, 11):
        other = codes.clone()
        other[:, j] = (codes[:, j] + 1) % t.vocab_size
        a, b = gen.training_batch(codes, torch.zeros(2)), gen.training_batch(other, torch.zeros(2))
        la = m(a.inputs, a.cond, positions=a.positions)
        lb = m(b.inputs, b.cond, positions=b.positions)
        torch.testing.assert_close(la[:, : j + 1], lb[:, : j + 1], atol=1e-6, rtol=0)


def test_rar_anneals_permutation_probability_from_one_to_zero():
    t = tok()
    gen = tokenloom.create("generator", "raster", tokenizer=t, rar=True, rar_start=0.2, rar_end=0.6)
    spec = gen.model_spec()
    assert spec.train_order == "raster-rar" and spec.option("target_aware") is True
    assert spec.key() != tokenloom.create("generator", "raster", tokenizer=t).model_spec().key()
    expect = {0: 1.0, 20: 1.0, 40: 0.5, 60: 0.0, 99: 0.0}
    for step, r in expect.items():
        gen.on_train_step(step, 100)
        assert gen.permute_probability() == pytest.approx(r)
    codes = torch.arange(12).repeat(64, 1) % t.vocab_size
    torch.manual_seed(0)
    gen.on_train_step(0, 100)  # r = 1: every row in its own random order
    b = gen.training_batch(codes, torch.zeros(64))
    order = b.extra["target_positions"]
    assert (order.sort(-1).values == torch.arange(12)).all()  # permutations
    assert (order != torch.arange(12)).any(-1).float().mean() > 0.9
    assert torch.equal(b.targets, codes.gather(1, order))  # target-aware: input t predicts position π(t)
    assert torch.equal(b.positions[:, 1:], order[:, :-1]) and (b.positions[:, 0] == -1).all()
    gen.on_train_step(80, 100)  # r = 0: raster
    b = gen.training_batch(codes, torch.zeros(64))
    assert (b.extra["target_positions"] == torch.arange(12)).all() and torch.equal(b.targets, codes)


def test_raster_refuses_known_tokens():
    gen = tokenloom.create("generator", "raster", tokenizer=tok())
    known = tokenloom.Known(torch.zeros(1, 12, dtype=torch.long), torch.ones(1, 12, dtype=torch.bool))
    with pytest.raises(tokenloom.InputError, match="known"):
        gen.generate(tiny(gen), SamplerChain(), torch.tensor([0]), rng=RowRNG(0, [0]), known=known)


# -- random (RandAR) ---------------------------------------------------------------


def test_randar_sequence_interleaves_position_instructions():
    t = tok(2, 2)  # L = 4
    gen = tokenloom.create("generator", "random", tokenizer=t)
    spec = gen.model_spec()
    V = t.vocab_size
    assert spec.seq_len == 2 * 4 and spec.vocab_size == V + 1 and spec.n_extra_tokens == 1
    codes = torch.tensor([[1, 2, 3, 4]])
    order = torch.tensor([[2, 0, 3, 1]])
    b = gen.sequence(codes, order)
    # [cls, p2, x2, p0, x0, p3, x3, p1]  (the last image token is never an input)
    assert b.inputs.tolist() == [[0, V, 3, V, 1, V, 4, V]]
    assert b.positions.tolist() == [[-1, 2, 2, 0, 0, 3, 3, 1]]
    assert b.loss_mask.tolist() == [[False, True, False, True, False, True, False, True]]
    assert b.targets[b.loss_mask].tolist() == [3, 1, 4, 2]


def test_randar_decodes_each_position_once_in_a_per_image_order():
    t = tok()
    gen = tokenloom.create("generator", "random", tokenizer=t)
    spy = Spy(tiny(gen))
    out = gen.generate(spy, SamplerChain(), torch.tensor([0, 1, 2]), rng=RowRNG(4, [0, 1, 2]))
    L = t.layout.length
    assert len(spy.calls) == L
    asked = torch.stack([c["positions"][:, 1] for c in spy.calls], 1)  # the instruction of each pass
    assert (asked.sort(-1).values == torch.arange(L)).all()  # every position exactly once
    assert not torch.equal(asked[0], asked[1])  # each image its own order
    fed = torch.stack([c["inputs"][:, 0] for c in spy.calls[1:]], 1)  # tokens fed back
    assert torch.equal(fed, out.gather(1, asked[:, :-1]))
    # the order depends only on (seed, image index)
    spy2 = Spy(tiny(gen))
    gen.generate(spy2, SamplerChain(), torch.tensor([1]), rng=RowRNG(4, [1]))
    assert torch.equal(torch.stack([c["positions"][:, 1] for c in spy2.calls], 1)[0], asked[1])


def test_randar_inpainting_visits_known_positions_first():
    t = tok()
    gen = tokenloom.create("generator", "random", tokenizer=t)
    spy = Spy(tiny(gen))
    codes = torch.randint(0, t.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[:, :5] = True
    out = gen.generate(spy, SamplerChain(), torch.tensor([0, 1]), rng=RowRNG(0, [0, 1]),
                       known=tokenloom.Known(codes, mask))
    assert torch.equal(out[:, :5], codes[:, :5])
    asked = torch.stack([c["positions"][:, 1] for c in spy.calls], 1)
    assert (asked[:, :5] < 5).all() and (asked[:, 5:] >= 5).all()


# -- masked (MaskGIT) -----------------------------------------------------------


def test_maskgit_training_masks_follow_the_cosine_schedule():
    t = tok(4, 4)  # L = 16
    gen = tokenloom.create("generator", "masked", tokenizer=t)
    codes = torch.randint(0, t.vocab_size, (4000, 16), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    b = gen.training_batch(codes, torch.zeros(4000))
    masked = b.loss_mask[:, 1:]
    assert torch.equal(b.inputs[:, 1:] == gen.mask_id, masked)
    assert torch.equal(b.targets[:, 1:], codes) and not b.loss_mask[:, 0].any()
    # n = ceil(cos(π/2 r)·L), r ~ U(0, 1): E[n]/L ≈ 2/π, and at least one token is masked
    frac = masked.sum(1).float() / 16
    assert frac.min() >= 1 / 16
    expected = sum(math.ceil(math.cos(math.pi / 2 * (k + 0.5) / 1000) * 16) for k in range(1000)) / 1000 / 16
    assert frac.mean().item() == pytest.approx(expected, abs=0.02)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(steps=st.integers(1, 10), seed=st.integers(0, 999), with_known=st.booleans())
def test_maskgit_finalises_every_position_exactly_once_in_T_passes(steps, seed, with_known):
    t = tok()
    L = t.layout.length
    gen = tokenloom.create("generator", "masked", tokenizer=t, steps=steps)
    spy = Spy(tiny(gen, seed=seed))
    known = None
    g = torch.Generator().manual_seed(seed)
    if with_known:
        mask = torch.rand(3, L, generator=g) < 0.4
        known = tokenloom.Known(torch.randint(0, t.vocab_size, (3, L), generator=g), mask)
    out = gen.generate(spy, SamplerChain(), torch.tensor([0, 1, 2]), rng=RowRNG(seed, [0, 1, 2]), known=known)
    assert len(spy.calls) == steps == gen.expected_nfe()
    seen = [c["inputs"][:, 1:] for c in spy.calls] + [out]
    for before, after in itertools.pairwise(seen):
        final = before != gen.mask_id
        assert torch.equal(after[final], before[final])  # a finalised token never changes
    assert (out != gen.mask_id).all()
    n_unknown = (seen[0] == gen.mask_id).sum(1)
    for k, (before, after) in enumerate(itertools.pairwise(seen)):  # tokens revealed per step follow the schedule
        left = (after == gen.mask_id).sum(1)
        r = (k + 1) / steps
        target = torch.floor(n_unknown * math.cos(math.pi / 2 * r)).long()
        if k < steps - 1:
            target = torch.maximum(torch.ones_like(target), torch.minimum((before == gen.mask_id).sum(1) - 1, target))
            target = torch.minimum(target, (before == gen.mask_id).sum(1))
        else:
            target = torch.zeros_like(target)
        assert torch.equal(left, target)
    if known is not None:
        assert torch.equal(out[known.mask], known.codes[known.mask])


def test_maskgit_confidence_uses_gumbel_noise_annealed_by_temperature():
    t = tok()
    greedyish = tokenloom.create("generator", "masked", tokenizer=t, steps=4, choice_temperature=0.0)
    noisy = tokenloom.create("generator", "masked", tokenizer=t, steps=4, choice_temperature=1e6)
    m = tiny(greedyish)
    chain = SamplerChain([tokenloom.create("sampler", "greedy")])
    a = greedyish.generate(m, chain, torch.zeros(8, dtype=torch.long), rng=RowRNG(0, range(8)))
    # with τ = 0 confidence is the model's own: images with the same class are identical under greedy sampling
    assert (a == a[0]).all()
    b = noisy.generate(m, chain, torch.zeros(8, dtype=torch.long), rng=RowRNG(0, range(8)))
    assert not (b == b[0]).all()  # the Gumbel noise picks different unmasking orders per image


# -- classifier-free guidance ---------------------------------------------------


@pytest.mark.parametrize("schedule", ["constant", "linear", "interval"])
def test_cfg_conformance(schedule):
    tokenloom.testing.check("sampler", "cfg", scale=3.0, schedule=schedule, start=0.25, end=0.75)


def test_cfg_formula_and_its_endpoints():
    g = torch.Generator().manual_seed(0)
    c, u = torch.randn(3, 7, generator=g) * 4, torch.randn(3, 7, generator=g) * 4
    info = tokenloom.StepInfo(step=2, n_steps=5, uncond_logits=u)
    one = tokenloom.create("sampler", "cfg", scale=1.0)
    zero = tokenloom.create("sampler", "cfg", scale=0.0)
    assert torch.equal(one(c, info), c) and torch.equal(zero(c, info), u)
    s = 2.5
    ref = u.double() + s * (c.double() - u.double())
    torch.testing.assert_close(tokenloom.create("sampler", "cfg", scale=s)(c, info).double(), ref, atol=1e-5, rtol=0)
    # schedules: linear ramps 1 → s over progress, interval guides only inside [start, end]
    lin = tokenloom.create("sampler", "cfg", scale=3.0, schedule="linear")
    itv = tokenloom.create("sampler", "cfg", scale=3.0, schedule="interval", start=0.4, end=0.6)
    for step, p in [(0, 0.0), (2, 0.5), (4, 1.0)]:
        inf = tokenloom.StepInfo(step=step, n_steps=5, uncond_logits=u)
        assert lin.scale_at(inf) == pytest.approx(1 + 2 * p)
        assert itv.scale_at(inf) == (3.0 if step == 2 else 1.0)
    assert torch.equal(itv(c, tokenloom.StepInfo(step=0, n_steps=5, uncond_logits=u)), c)
    # -inf in the conditional logits stays excluded
    cm = c.clone()
    cm[0, 3] = float("-inf")
    assert torch.isneginf(tokenloom.create("sampler", "cfg", scale=0.0)(cm, info)[0, 3])
    with pytest.raises(tokenloom.InputError, match="unconditional"):
        one(c, tokenloom.StepInfo())
    with pytest.raises(tokenloom.ConfigError):
        tokenloom.create("sampler", "cfg", scale=-1.0)


@pytest.mark.parametrize("name", ["raster", "random", "masked"])
def test_guidance_runs_both_rows_in_one_batched_pass(name):
    t = tok()
    gen = tokenloom.create("generator", name, tokenizer=t)
    chain = SamplerChain([tokenloom.create("sampler", "cfg", scale=200.0)])  # an untrained model: tiny c − u
    spy = Spy(tiny(gen))
    cond = torch.tensor([0, 1, 2])
    guided = gen.generate(spy, chain, cond, rng=RowRNG(0, [0, 1, 2]))
    assert len(spy.calls) == gen.expected_nfe()  # no extra passes for the unconditional rows
    assert all(c["rows"] == 6 for c in spy.calls)
    plain = gen.generate(tiny(gen), SamplerChain(), cond, rng=RowRNG(0, [0, 1, 2]))
    assert not torch.equal(guided, plain)  # guidance changed the samples
    # s = 1 is plain conditional sampling
    same = gen.generate(tiny(gen), SamplerChain([tokenloom.create("sampler", "cfg", scale=1.0)]), cond,
                        rng=RowRNG(0, [0, 1, 2]))
    assert torch.equal(same, plain)


@pytest.mark.parametrize("name", ["raster", "random", "masked"])
def test_image_i_is_the_same_alone_or_in_a_batch_of_8(name):
    t = tok()
    gen = tokenloom.create("generator", name, tokenizer=t)
    m = tiny(gen, seed=2)
    chain = SamplerChain([tokenloom.create("sampler", "cfg", scale=3.0), tokenloom.create("sampler", "top-k", k=5)])
    cond = torch.arange(8) % 3
    batch = gen.generate(m, chain, cond, rng=RowRNG(7, torch.arange(8)))
    assert torch.equal(batch, gen.generate(m, chain, cond, rng=RowRNG(7, torch.arange(8))))  # same seed
    for i in range(8):
        alone = gen.generate(m, chain, cond[i : i + 1], rng=RowRNG(7, [i]))
        assert torch.equal(alone[0], batch[i]), f"image {i}"
    assert not torch.equal(batch, gen.generate(m, chain, cond, rng=RowRNG(8, torch.arange(8))))  # seed matters
