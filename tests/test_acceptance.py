"""Acceptance rules for speculative decoding: exactness, LANTERN's bound,
GSD's groups."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenloom

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None)
U_GRID = (torch.arange(20000, dtype=torch.float64) + 0.5) / 20000  # deterministic uniforms


def dist(seed: int, B: int, V: int, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(B, V, generator=g, dtype=torch.float64) * scale, -1)


def acceptance_probability(rule, p, q, x: int) -> float:
    """P(accept | drafted = x) over the uniform u, measured through rule.accept."""
    n = len(U_GRID)
    acc = rule.accept(p.expand(n, -1), q.expand(n, -1), torch.full((n,), x), U_GRID)
    return acc.double().mean().item()


def output_distribution(rule, p, q) -> torch.Tensor:
    """Distribution of one speculative step's output: draft x ~ q, keep it if
    accepted, else draw from the rule's residual."""
    V = p.shape[-1]
    out = torch.zeros(V, dtype=torch.float64)
    for x in range(V):
        a = acceptance_probability(rule, p, q, x)
        out[x] += q[0, x] * a
        out += q[0, x] * (1 - a) * rule.residual(p, q, torch.tensor([x]))[0].double()
    return out


def bound(rule, V: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rule.bind(tokenloom.SamplerContext(vocab_size=V, code_embeddings=torch.randn(V, 3, generator=g),
                                       token_embeddings=torch.randn(V, 5, generator=g)))
    return rule


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_rule_reproduces_the_target_distribution(seed):
    p, q = dist(seed, 1, 7), dist(seed + 100, 1, 7)
    out = output_distribution(tokenloom.create("sampler", "exact"), p, q)
    assert torch.allclose(out, p[0], atol=2e-4)


@pytest.mark.parametrize("seed", [0, 1])
def test_relaxed_rules_are_not_exact(seed):
    """A sanity check that the test above can fail: LANTERN with a large δ
    changes the output distribution."""
    p, q = dist(seed, 1, 7), dist(seed + 100, 1, 7)
    rule = bound(tokenloom.create("sampler", "lantern", k=6, delta=0.5), 7)
    assert not torch.allclose(output_distribution(rule, p, q), p[0], atol=2e-3)


@SETTINGS
@given(seed=st.integers(0, 10_000), V=st.integers(2, 40), k=st.integers(1, 50))
def test_lantern_with_zero_delta_is_exact(seed, V, k):
    p, q = dist(seed, 4, V), dist(seed + 1, 4, V)
    drafted = torch.multinomial(q.float(), 1, generator=torch.Generator().manual_seed(seed)).squeeze(-1)
    u = torch.rand(4, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64)
    exact = tokenloom.create("sampler", "exact")
    lantern = bound(tokenloom.create("sampler", "lantern", k=k, delta=0.0), V, seed)
    assert torch.equal(lantern.accept(p, q, drafted, u), exact.accept(p, q, drafted, u))
    assert torch.allclose(lantern.residual(p, q, drafted), exact.residual(p, q, drafted))


@SETTINGS
@given(seed=st.integers(0, 10_000), V=st.integers(2, 40), k=st.integers(1, 50), delta=st.floats(0.0, 1.0))
def test_lantern_accepts_at_least_as_often_and_stays_within_delta(seed, V, k, delta):
    p, q = dist(seed, 4, V), dist(seed + 1, 4, V)
    drafted = torch.multinomial(q.float(), 1, generator=torch.Generator().manual_seed(seed)).squeeze(-1)
    u = torch.rand(4, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64)
    exact = tokenloom.create("sampler", "exact")
    lantern = bound(tokenloom.create("sampler", "lantern", k=k, delta=delta), V, seed)
    assert (lantern.accept(p, q, drafted, u) | ~exact.accept(p, q, drafted, u)).all()
    relaxed = lantern.relaxed(p, drafted)
    assert torch.allclose(relaxed.sum(-1), torch.ones(4, dtype=relaxed.dtype))
    tv = 0.5 * (relaxed - p).abs().sum(-1)
    assert (tv <= delta + 1e-9).all()


def test_lantern_moves_mass_from_the_nearest_codes_only():
    # codes on a line: 0 1 2 3 ... ; neighbours of code 0 by distance are 1, 2, 3, ...
    V = 6
    rule = tokenloom.create("sampler", "lantern", k=3, delta=0.25)
    rule.bind(tokenloom.SamplerContext(vocab_size=V, code_embeddings=torch.arange(V, dtype=torch.float32)[:, None]))
    p = torch.tensor([[0.05, 0.1, 0.1, 0.1, 0.3, 0.35]], dtype=torch.float64)
    relaxed = rule.relaxed(p, torch.tensor([0]))
    # prefix of neighbours (1, 2, 3) with mass <= 0.25 is (1, 2): 0.2 moves onto code 0
    assert torch.allclose(relaxed, torch.tensor([[0.25, 0.0, 0.0, 0.1, 0.3, 0.35]], dtype=torch.float64))


@SETTINGS
@given(seed=st.integers(0, 10_000), V=st.integers(2, 40))
def test_gsd_with_groups_of_one_is_exact(seed, V):
    p, q = dist(seed, 4, V), dist(seed + 1, 4, V)
    drafted = torch.multinomial(q.float(), 1, generator=torch.Generator().manual_seed(seed)).squeeze(-1)
    u = torch.rand(4, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64)
    gsd = bound(tokenloom.create("sampler", "gsd", rank_window=0), V, seed)
    exact = tokenloom.create("sampler", "exact")
    assert torch.equal(gsd.accept(p, q, drafted, u), exact.accept(p, q, drafted, u))
    assert gsd.group(p, drafted).sum(-1).tolist() == [1] * 4


@SETTINGS
@given(seed=st.integers(0, 10_000), V=st.integers(2, 30), window=st.integers(1, 6),
       gap=st.floats(0.0, 0.5), sim=st.floats(-1.0, 1.0))
def test_gsd_group_matches_a_reference_loop(seed, V, window, gap, sim):
    p, q = dist(seed, 2, V), dist(seed + 1, 2, V)
    drafted = torch.multinomial(q.float(), 1, generator=torch.Generator().manual_seed(seed)).squeeze(-1)
    rule = bound(tokenloom.create("sampler", "gsd", rank_window=window, max_gap=gap, distance="cosine",
                                  min_similarity=sim), V, seed)
    group = rule.group(p, drafted)
    emb = rule.unit_embeddings.double()
    for b in range(2):
        order = sorted(range(V), key=lambda i: (-p[b, i].item(), i))
        rank = {tok: r for r, tok in enumerate(order)}
        x = drafted[b].item()
        # the reference's slice [i - window, i + window): `window` below the draft, window - 1 above
        expected = {
            y for y in range(V)
            if y == x or (-(window - 1) <= rank[y] - rank[x] <= window and abs(p[b, y] - p[b, x]) < gap
                          and float(emb[y] @ emb[x]) >= sim - 1e-6)
        }
        got = set(group[b].nonzero().flatten().tolist())
        # cosine similarities within float rounding of the threshold may go either way
        borderline = {y for y in range(V) if abs(float(emb[y] @ emb[x]) - sim) < 1e-5}
        assert got - borderline == expected - borderline
        pg, qg = p[b, list(got)].sum(), q[b, list(got)].sum()
        u = torch.tensor([0.999 * min(1.0, (pg / qg).item())], dtype=torch.float64)
        assert rule.accept(p[b : b + 1], q[b : b + 1], drafted[b : b + 1], u).item()


def test_rules_need_their_geometry():
    with pytest.raises(tokenloom.ConfigError, match="code_embeddings"):
        tokenloom.create("sampler", "lantern").bind(tokenloom.SamplerContext(vocab_size=4))
    with pytest.raises(tokenloom.ConfigError, match="token embeddings"):
        tokenloom.create("sampler", "gsd").bind(tokenloom.SamplerContext(vocab_size=4))
    with pytest.raises(tokenloom.ConfigError):
        tokenloom.create("sampler", "lantern", delta=1.5)
