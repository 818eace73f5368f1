"""Counter-based randomness: image i depends only on (seed, i)."""

from __future__ import annotations

import numpy as np
import torch
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
