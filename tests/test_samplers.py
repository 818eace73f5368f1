"""Each sampler against an independent, straightforward reference of its
formula; the chain and its final draw."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenloom
import tokenloom.testing
from tokenloom.rng import RowRNG
from tokenloom.sampling import SamplerChain
from tokenloom.testing import logits_strategy

EPS = 1e-9
SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None)


@pytest.mark.parametrize("name", tokenloom.available("sampler"))
def test_every_registered_sampler_passes_the_conformance_kit(name):
    tokenloom.testing.check("sampler", name)


def softmax_np(row: np.ndarray) -> np.ndarray:
    finite = np.isfinite(row)
    out = np.zeros_like(row)
    m = row[finite].max()
    e = np.exp(row[finite] - m)
    out[finite] = e / e.sum()
    return out


def ranked_mass_reference(p: np.ndarray, score: np.ndarray, mass: float, finite: np.ndarray):
    """(must_keep, must_remove) for 'keep j iff the mass ranked strictly before
    j is below `mass`', with a tolerance band where float rounding decides."""
    n = len(p)
    must_keep = np.zeros(n, bool)
    must_remove = ~finite.copy()
    for j in range(n):
        if not finite[j]:
            continue
        lo = sum(p[i] for i in range(n) if finite[i] and score[i] < score[j] - EPS)
        hi = sum(p[i] for i in range(n) if finite[i] and score[i] < score[j] + EPS and score[i] != score[j])
        if hi < mass - EPS:
            must_keep[j] = True
        elif lo >= mass + EPS:
            must_remove[j] = True
    return must_keep, must_remove


def assert_mask(out: torch.Tensor, must_keep: np.ndarray, must_remove: np.ndarray, row: torch.Tensor) -> None:
    kept = torch.isfinite(out).numpy()
    assert kept[must_keep].all(), f"removed an entry the formula keeps: {row.tolist()}"
    assert not kept[must_remove].any(), f"kept an entry the formula removes: {row.tolist()}"
    assert torch.equal(out[torch.isfinite(out)], row[torch.isfinite(out)]), "kept entries must be unchanged"


@SETTINGS
@given(logits=logits_strategy(), p=st.floats(1e-3, 1.0))
def test_top_p_matches_reference(logits, p):
    out = tokenloom.create("sampler", "top-p", p=p)(logits)
    for b in range(logits.shape[0]):
        row = logits[b].double().numpy()
        probs = softmax_np(row)
        keep, remove = ranked_mass_reference(probs, -probs, p, np.isfinite(row))
        assert_mask(out[b], keep, remove, logits[b])
        assert probs[torch.isfinite(out[b]).numpy()].sum() >= p - 1e-6  # kept mass >= p


@SETTINGS
@given(logits=logits_strategy(), mass=st.floats(1e-3, 1.0))
def test_typical_matches_reference(logits, mass):
    out = tokenloom.create("sampler", "typical", mass=mass)(logits)
    for b in range(logits.shape[0]):
        row = logits[b].double().numpy()
        finite = np.isfinite(row)
        probs = softmax_np(row)
        logp = np.full_like(row, -np.inf)
        logp[finite] = np.log(probs[finite])
        entropy = -sum(probs[i] * logp[i] for i in range(len(row)) if finite[i] and probs[i] > 0)
        score = np.where(finite, np.abs(-logp - entropy), np.inf)
        keep, remove = ranked_mass_reference(probs, score, mass, finite)
        assert_mask(out[b], keep, remove, logits[b])


@SETTINGS
@given(logits=logits_strategy(), k=st.integers(1, 80))
def test_top_k_matches_reference(logits, k):
    out = tokenloom.create("sampler", "top-k", k=k)(logits)
    for b in range(logits.shape[0]):
        row = logits[b].tolist()
        kth = sorted(row, reverse=True)[min(k, len(row)) - 1]
        expected = [x >= kth and math.isfinite(x) for x in row]
        assert torch.isfinite(out[b]).tolist() == expected
        n_finite = sum(math.isfinite(x) for x in row)
        assert sum(expected) >= min(k, n_finite)  # at least k kept; more only on ties
        if len(set(row)) == len(row):
            assert sum(expected) == min(k, n_finite)


@SETTINGS
@given(logits=logits_strategy(), min_p=st.floats(0.0, 1.0))
def test_min_p_matches_reference(logits, min_p):
    out = tokenloom.create("sampler", "min-p", min_p=min_p)(logits)
    for b in range(logits.shape[0]):
        probs = softmax_np(logits[b].double().numpy())
        threshold = min_p * probs.max()
        must_keep = (probs >= threshold * (1 + 1e-9)) & (probs > 0)
        must_remove = (probs < threshold * (1 - 1e-9)) | ~np.isfinite(logits[b].numpy())
        assert_mask(out[b], must_keep, must_remove, logits[b])


@SETTINGS
@given(logits=logits_strategy(), t=st.floats(0.05, 20.0))
def test_temperature_divides_logits(logits, t):
    out = tokenloom.create("sampler", "temperature", t=t)(logits)
    expected = torch.tensor(logits.double().numpy() / t, dtype=torch.float32)
    finite = torch.isfinite(logits)
    assert torch.allclose(out[finite], expected[finite], rtol=1e-6, atol=0)
    assert torch.isneginf(out[~finite]).all()


def test_temperature_one_is_identity_and_schedule_is_linear():
    x = torch.randn(3, 7)
    assert torch.equal(tokenloom.create("sampler", "temperature", t=1.0)(x), x)
    sched = tokenloom.create("sampler", "temperature", t=2.0, end=0.5)
    first = sched(x, tokenloom.StepInfo(step=0, n_steps=4))
    mid = sched(x, tokenloom.StepInfo(step=2, n_steps=5))
    last = sched(x, tokenloom.StepInfo(step=3, n_steps=4))
    assert torch.allclose(first, x / 2.0) and torch.allclose(mid, x / 1.25) and torch.allclose(last, x / 0.5)


@SETTINGS
@given(logits=logits_strategy())
def test_greedy_keeps_only_the_first_argmax(logits):
    out = tokenloom.create("sampler", "greedy")(logits)
    for b in range(logits.shape[0]):
        row = logits[b].tolist()
        first = row.index(max(row))
        assert torch.isfinite(out[b]).nonzero().flatten().tolist() == [first]


def test_greedy_equals_the_low_temperature_limit():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=g) * 3
    rng = RowRNG(seed=5, index=torch.arange(64))
    greedy = SamplerChain([tokenloom.create("sampler", "greedy")])
    cold = SamplerChain([tokenloom.create("sampler", "temperature", t=1e-4)])
    info = tokenloom.StepInfo()
    assert greedy.greedy and not cold.greedy
    assert torch.equal(greedy.sample(logits, info, rng), logits.argmax(-1))
    assert torch.equal(cold.sample(logits, info, rng), logits.argmax(-1))


def test_chain_applies_processors_in_order_and_at_most_one_acceptance_rule():
    x = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    chain = SamplerChain([tokenloom.create("sampler", "top-k", k=3), tokenloom.create("sampler", "temperature", t=2.0)])
    out = chain(x)
    assert torch.allclose(out[0, :3], x[0, :3] / 2) and torch.isneginf(out[0, 3])
    probs = chain.probs(x)
    assert torch.allclose(probs.sum(-1), torch.ones(1)) and probs[0, 3] == 0

    import attrs

    class Rule(tokenloom.AcceptanceRule):
        @attrs.frozen
        class Config:
            pass

    with pytest.raises(tokenloom.ConfigError, match="at most one acceptance rule"):
        SamplerChain([Rule(Rule.Config()), Rule(Rule.Config())])
    chain = SamplerChain([Rule(Rule.Config()), tokenloom.create("sampler", "top-k", k=1)])
    assert chain.acceptance is not None and len(chain.processors) == 1


def test_chain_rejects_dead_rows_naming_the_step():
    x = torch.zeros(2, 4)
    x[1] = float("-inf")
    chain = SamplerChain([tokenloom.create("sampler", "top-k", k=2)])
    with pytest.raises(tokenloom.InputError, match="at step 7.*rows \\[1\\]"):
        chain(x, tokenloom.StepInfo(step=7, n_steps=9))
