"""Counter-based randomness: image i depends only on (seed, i)."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from tokenloom.rng import RowRNG


def test_rows_do_not_depend_on_their_batch():
    big = RowRNG(7, [0, 1, 2, 3, 4])
    for i in range(5):
        alone = RowRNG(7, [i])
        assert torch.equal(big.uniform(3, 6, 5)[i], alone.uniform(3, 6, 5)[0])
        assert torch.equal(big.gumbel(0, 11, stream=2)[i], alone.gumbel(0, 11, stream=2)[0])
    assert torch.equal(big.subset(slice(2, 4)).uniform(1, 9), big.uniform(1, 9)[2:4])


def test_seeds_steps_and_streams_differ():
    r = RowRNG(1, [0])
    a = r.uniform(0, 64)
    assert not torch.equal(a, r.uniform(1, 64))
    assert not torch.equal(a, r.uniform(0, 64, stream=1))
    assert not torch.equal(a, RowRNG(2, [0]).uniform(0, 64))
    assert not torch.equal(a, RowRNG(1, [1]).uniform(0, 64))
    assert torch.equal(a, RowRNG(1, [0]).uniform(0, 64))


def test_uniforms_are_uniform_and_uncorrelated():
    u = RowRNG(0, torch.arange(200)).uniform(5, 100).flatten().double().numpy()
    assert 0 < u.min() and u.max() < 1
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    v = RowRNG(0, torch.arange(200)).uniform(6, 100).flatten().double().numpy()
    assert abs(np.corrcoef(u, v)[0, 1]) < 0.02


def test_categorical_draws_follow_the_distribution():
    probs = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625, 0.0])
    logits = probs.log().expand(4000, -1)
    draws = torch.cat([RowRNG(11, torch.arange(4000)).categorical(logits, step) for step in range(5)])
    counts = torch.bincount(draws, minlength=6).double().numpy()
    assert counts[5] == 0  # -inf never drawn
    expected = probs[:5].double().numpy() * len(draws)
    assert stats.chisquare(counts[:5], expected).pvalue > 1e-3


# -- the bits against a pure-Python reference, and the draws derived ahead ----

def _h(x: int) -> int:  # lowbias32 (Chris Wellons), written out on Python ints
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def _mix(h: int, v: int) -> int:
    return _h(h ^ _h(v + 0x9E3779B9))


def _reference_uniform(seed: int, index: int, step: int, stream: int, counter: int) -> float:
    row = _mix(_h((seed & 0xFFFFFFFF) ^ (seed >> 32)), index)
    key = _mix(_mix(row, step), stream)
    bits = _h(_h(key ^ counter) + key)
    return float(np.float32(((bits >> 8) + 0.5) / 2**24))


def test_uniform_bits_match_a_pure_python_reference():
    rng = RowRNG(2**33 + 5, [0, 7, 123456])
    for step in (0, 1, 63, 64, 200):  # across the blocks of derived keys
        u = rng.uniform(step, 3, stream=4)
        want = [[_reference_uniform(2**33 + 5, i, step, 4, c) for c in range(3)] for i in (0, 7, 123456)]
        assert u.tolist() == want


@given(steps=st.lists(st.integers(0, 150), min_size=1, max_size=40), numel=st.sampled_from([1, 5, 64]),
       batch=st.integers(1, 4))
@settings(max_examples=40, deadline=None)
def test_draws_do_not_depend_on_the_order_steps_are_asked_in(steps, numel, batch):
    """Consecutive steps are served from draws derived ahead; any order of
    asking (sequential, repeated, jumping back) gives the same numbers as a
    fresh generator asked for that one step."""
    rng = RowRNG(3, torch.arange(batch))
    for s in sorted(steps) + steps:
        fresh = RowRNG(3, torch.arange(batch))
        assert torch.equal(rng.uniform(s, numel, stream=1), fresh.uniform(s, numel, stream=1))
        assert torch.equal(rng.gumbel(s, numel), fresh.gumbel(s, numel))
        logits = torch.linspace(-1, 1, numel).expand(batch, numel)
        assert torch.equal(rng.categorical(logits, s, stream=2), fresh.categorical(logits, s, stream=2))


def test_a_caller_changing_its_draws_in_place_changes_nothing_else():
    rng, fresh = RowRNG(0, [0, 1]), RowRNG(0, [0, 1])
    for step in range(4):
        rng.uniform(step, 8).zero_()  # served from a block derived ahead after step 0
        rng.gumbel(step, 8).fill_(float("nan"))
    assert torch.equal(rng.uniform(3, 8), fresh.uniform(3, 8))
    assert torch.equal(rng.gumbel(3, 8), fresh.gumbel(3, 8))
