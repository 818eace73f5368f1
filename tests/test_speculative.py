"""The speculative decoding family: ``speculative`` (draft model) and ``sjd``
(speculative Jacobi decoding) with the acceptance rules ``exact``,
``lantern`` and ``gsd`` — exactness against the raster distribution,
greedy equivalence, relaxed rules at their exact settings, per-row KV
rollback, and the pipeline's draft model and statistics."""

from __future__ import annotations

import attrs
import pytest
import torch
from scipy.stats import chi2

import tokenloom
import tokenloom.testing
from tokenloom.backbone.instrumented import InstrumentedModel
from tokenloom.config import ModelConfig, parse_config
from tokenloom.model import build_model
from tokenloom.rng import RowRNG
from tokenloom.sampling import SamplerChain, speculative_residual
from tokenloom.speculative import process_window

N_EXACT = 3000  # images per exactness test


def pixel(image_shape=(1, 2, 3), bits: int = 1, pool: int = 1):
    return tokenloom.create("tokenizer", "pixel", bits=bits, pool=pool, image_shape=image_shape)


def peaked_model(spec, *, seed: int = 1, head_scale: float = 6.0, n_layer: int = 2, d_model: int = 32,
                 double: bool = False) -> InstrumentedModel:
    """An untrained model whose head is scaled up, so its conditionals are
    far from uniform and depend on the context."""
    m = build_model(spec, ModelConfig(n_layer=n_layer, d_model=d_model, n_head=2), n_classes=3, seed=seed).eval()
    with torch.no_grad():
        for p in m.heads.parameters():
            p.mul_(head_scale)
    return InstrumentedModel(m.double() if double else m)


def sampler(name: str, **kw):
    return tokenloom.create("sampler", name, **kw)


def speculative_with(tok, draft, **kw):
    gen = tokenloom.create("generator", "speculative", tokenizer=tok, **kw)
    gen.attach_models({"draft": draft})
    return gen


class WrongResidual(tokenloom.AcceptanceRule):
    """Exact acceptance test, but resampling from p instead of
    norm(max(p − q, 0)) after a rejection: biased towards the drafts."""

    @attrs.frozen
    class Config:
        pass

    def accept(self, p, q, drafted, u):
        return u.double() * q.gather(-1, drafted[:, None])[:, 0].double() < p.gather(-1, drafted[:, None])[:, 0]

    def residual(self, p, q, drafted=None):
        return p


class AlwaysAccept(WrongResidual):
    """Keeps every draft: the output follows the drafts, not the target."""

    def accept(self, p, q, drafted, u):
        return torch.ones_like(drafted, dtype=torch.bool)


# -- exact sequence probabilities and a chi-square test --------------------------


def sequence_probs(model, tok, chain: SamplerChain, label: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every code sequence of ``tok`` and its probability under next-token
    sampling with ``chain`` (teacher forcing, the chain applied position by
    position as raster decoding applies it)."""
    L, V = tok.layout.length, tok.vocab_size
    every = torch.cartesian_prod(*[torch.arange(V)] * L).reshape(-1, L)
    M = every.shape[0]
    inputs = torch.cat([torch.zeros_like(every[:, :1]), every[:, :-1]], 1)
    cond = torch.full((M,), label)
    logits = model(inputs, cond, positions=torch.arange(-1, L - 1)).double()  # (M, L, V)
    uncond = None
    if chain.needs_uncond:
        uncond = model(inputs, torch.full((M,), model.null_class), positions=torch.arange(-1, L - 1)).double()
    processed = process_window(chain, logits, torch.arange(L).expand(M, L), L, uncond)
    logp = torch.log_softmax(processed, -1).gather(-1, every[..., None])[..., 0].sum(-1)
    return every, logp.exp()


def chi_square_pvalue(codes: torch.Tensor, every: torch.Tensor, probs: torch.Tensor) -> float:
    """Goodness of fit of sampled sequences to ``probs`` (cells with an
    expected count below 5 pooled)."""
    V = int(every.max()) + 1
    L = every.shape[1]
    weights = V ** torch.arange(L - 1, -1, -1)
    obs = torch.bincount((codes * weights).sum(-1), minlength=V**L).double()
    order = (every * weights).sum(-1)
    exp = torch.zeros(V**L, dtype=torch.float64)
    exp[order] = probs / probs.sum() * codes.shape[0]
    big = exp >= 5
    o = torch.cat([obs[big], obs[~big].sum()[None]])
    e = torch.cat([exp[big], exp[~big].sum()[None]])
    stat = ((o - e) ** 2 / e.clamp(min=1e-12)).sum().item()
    return float(chi2.sf(stat, len(o) - 1))


@pytest.fixture(scope="module")
def exact_setup():
    tok = pixel((1, 2, 3))  # L = 6 binary codes: 64 sequences
    spec = tokenloom.create("generator", "raster", tokenizer=tok).model_spec()
    target = peaked_model(spec, seed=1)
    draft = peaked_model(spec, seed=7, n_layer=1, d_model=16, head_scale=3.0)
    return tok, target, draft


def _generators(tok, draft):
    return {
        "sjd": tokenloom.create("generator", "sjd", tokenizer=tok, window=4),
        "sjd-random-init": tokenloom.create("generator", "sjd", tokenizer=tok, window=3, init="random"),
        "speculative": speculative_with(tok, draft, gamma=3),
    }


CHAINS = {"plain": [], "temperature": [("temperature", {"t": 0.6})],
          "scheduled": [("temperature", {"t": 0.5, "end": 1.5})]}  # a schedule: each position its own step


@pytest.mark.parametrize("chain_kind", list(CHAINS))
def test_sjd_and_speculative_sample_exactly_the_raster_distribution(exact_setup, chain_kind):
    tok, target, draft = exact_setup
    procs = [sampler(name, **kw) for name, kw in CHAINS[chain_kind]]
    assert SamplerChain(procs).depends_on_step == (chain_kind == "scheduled")
    every, probs = sequence_probs(target, tok, SamplerChain(procs), label=1)
    cond = torch.full((N_EXACT,), 1)
    rng = RowRNG(0, torch.arange(N_EXACT))
    results = {}
    for name, gen in _generators(tok, draft).items():
        codes = gen.generate(target, SamplerChain(procs), cond, rng=rng)
        results[name] = chi_square_pvalue(codes, every, probs)
        assert gen.stats()["acceptance_rate"] < 1.0  # drafts do get rejected: the test has teeth
    # the same test on raster sampling itself, as a calibration
    raster = tokenloom.create("generator", "raster", tokenizer=tok)
    results["raster"] = chi_square_pvalue(raster.generate(target, SamplerChain(procs), cond, rng=rng), every, probs)
    assert all(p > 1e-3 for p in results.values()), results


@pytest.mark.parametrize("rule", [WrongResidual, AlwaysAccept])
def test_a_wrong_acceptance_rule_fails_the_exactness_test(exact_setup, rule):
    tok, target, draft = exact_setup
    every, probs = sequence_probs(target, tok, SamplerChain([]), label=1)
    cond = torch.full((N_EXACT,), 1)
    for name, gen in _generators(tok, draft).items():
        codes = gen.generate(target, SamplerChain([rule(None)]), cond, rng=RowRNG(0, torch.arange(N_EXACT)))
        assert chi_square_pvalue(codes, every, probs) < 1e-6, name


def test_the_exact_rule_in_the_chain_equals_no_rule(exact_setup):
    tok, target, draft = exact_setup
    cond = torch.arange(64) % 3
    for gen in _generators(tok, draft).values():
        a = gen.generate(target, SamplerChain([]), cond, rng=RowRNG(3, torch.arange(64)))
        b = gen.generate(target, SamplerChain([sampler("exact")]), cond, rng=RowRNG(3, torch.arange(64)))
        assert torch.equal(a, b)


# -- greedy, relaxed rules at their exact settings ------------------------------------


@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("window", [1, 5, 16])
def test_sjd_greedy_reproduces_raster_greedy(guided, window):
    tok = pixel((3, 6, 8), bits=1, pool=2)  # 3×4 grid of 8 codes
    raster = tokenloom.create("generator", "raster", tokenizer=tok)
    model = peaked_model(raster.model_spec(), seed=2, head_scale=4.0)
    chain = SamplerChain(([sampler("cfg", scale=2.0)] if guided else []) + [sampler("greedy")])
    cond = torch.arange(12) % 3
    want = raster.generate(model, chain, cond, rng=RowRNG(0, torch.arange(12)))
    sjd = tokenloom.create("generator", "sjd", tokenizer=tok, window=window)
    model.reset()
    got = sjd.generate(model, chain, cond, rng=RowRNG(0, torch.arange(12)))
    assert torch.equal(got, want)
    assert model.nfe <= tok.layout.length


def test_speculative_greedy_reproduces_raster_greedy():
    tok = pixel((3, 6, 8), bits=1, pool=2)
    raster = tokenloom.create("generator", "raster", tokenizer=tok)
    model = peaked_model(raster.model_spec(), seed=2, head_scale=4.0)
    draft = peaked_model(raster.model_spec(), seed=9, n_layer=1, d_model=16)
    chain = SamplerChain([sampler("greedy")])
    cond = torch.arange(12) % 3
    want = raster.generate(model, chain, cond, rng=RowRNG(0, torch.arange(12)))
    got = speculative_with(tok, draft, gamma=3).generate(model, chain, cond, rng=RowRNG(0, torch.arange(12)))
    assert torch.equal(got, want)


def test_an_identical_draft_is_always_accepted():
    tok = pixel((3, 6, 8), bits=1, pool=2)
    L = tok.layout.length  # 12
    spec = tokenloom.create("generator", "raster", tokenizer=tok).model_spec()
    target = peaked_model(spec, seed=3, head_scale=2.0, double=True)
    draft = InstrumentedModel(target.model)  # the same weights, counted separately
    gamma = 3
    gen = speculative_with(tok, draft, gamma=gamma)
    cond = torch.arange(32) % 3
    gen.generate(target, SamplerChain([sampler("top-k", k=5)]), cond, rng=RowRNG(0, torch.arange(32)))
    stats = gen.stats()
    assert stats["acceptance_rate"] == 1.0
    assert stats["mean_accepted_length"] == gamma + 1  # 12 = 3 rounds of 4 tokens
    assert target.nfe == L // (gamma + 1) and stats["nfe_per_image"] == L // (gamma + 1)
    assert draft.nfe == gamma * L // (gamma + 1) and stats["draft_nfe_per_image"] == draft.nfe


def _bound_chain(tok, model, rule) -> SamplerChain:
    chain = SamplerChain([sampler("top-k", k=6)] + ([rule] if rule is not None else []))
    chain.bind(tokenloom.SamplerContext(vocab_size=tok.vocab_size, code_embeddings=tok.code_embeddings(),
                                        token_embeddings=model.token_embeddings()))
    return chain


@pytest.mark.parametrize("rule_name,options", [("lantern", {"delta": 0.0, "k": 5}), ("gsd", {"rank_window": 0})])
def test_relaxed_rules_at_their_exact_settings_equal_exact_acceptance_end_to_end(rule_name, options):
    tok = pixel((3, 6, 8), bits=1, pool=2)
    spec = tokenloom.create("generator", "raster", tokenizer=tok).model_spec()
    model = peaked_model(spec, seed=4, head_scale=3.0)
    draft = peaked_model(spec, seed=5, n_layer=1, d_model=16)
    cond = torch.arange(24) % 3
    for gen in (tokenloom.create("generator", "sjd", tokenizer=tok, window=6), speculative_with(tok, draft, gamma=3)):
        exact = gen.generate(model, _bound_chain(tok, model, None), cond, rng=RowRNG(1, torch.arange(24)))
        gen.reset_stats()
        relaxed = gen.generate(model, _bound_chain(tok, model, sampler(rule_name, **options)), cond,
                               rng=RowRNG(1, torch.arange(24)))
        assert torch.equal(relaxed, exact)
        assert gen.stats()["acceptance_rate"] < 1.0


def test_lantern_with_a_budget_accepts_more_and_changes_the_output():
    tok = pixel((3, 6, 8), bits=1, pool=2)
    spec = tokenloom.create("generator", "raster", tokenizer=tok).model_spec()
    model = peaked_model(spec, seed=4, head_scale=3.0)
    cond = torch.arange(48) % 3
    gen = tokenloom.create("generator", "sjd", tokenizer=tok, window=6)
    exact = gen.generate(model, _bound_chain(tok, model, None), cond, rng=RowRNG(1, torch.arange(48)))
    rate_exact = gen.stats()["acceptance_rate"]
    gen.reset_stats()
    relaxed = gen.generate(model, _bound_chain(tok, model, sampler("lantern", k=3, delta=0.4)), cond,
                           rng=RowRNG(1, torch.arange(48)))
    assert gen.stats()["acceptance_rate"] > rate_exact
    assert not torch.equal(relaxed, exact)


# -- per-image advance, statistics, initialisation -------------------------------------


def test_each_image_advances_by_its_own_accepted_length():
    tok = pixel((3, 6, 8), bits=1, pool=2)
    spec = tokenloom.create("generator", "raster", tokenizer=tok).model_spec()
    model = peaked_model(spec, seed=4, head_scale=3.0)
    gen = tokenloom.create("generator", "sjd", tokenizer=tok, window=6)
    chain = SamplerChain([sampler("top-k", k=6)])
    nfe = []
    for i in range(8):  # each image alone: its own number of iterations
        model.reset()
        alone = gen.generate(model, chain, torch.tensor([i % 3]), rng=RowRNG(5, [i]))
        nfe.append(model.nfe)
        together = gen.generate(model, chain, torch.arange(8) % 3, rng=RowRNG(5, torch.arange(8)))
        assert torch.equal(alone[0], together[i])
    assert len(set(nfe)) > 1  # images took different numbers of iterations
    model.reset()
    gen.reset_stats()
    gen.generate(model, chain, torch.arange(8) % 3, rng=RowRNG(5, torch.arange(8)))
    assert model.nfe == max(nfe)  # a batch runs until its slowest image is done
    assert gen.stats()["nfe_per_image"] == pytest.approx(sum(nfe) / 8)
    assert gen.stats()["mean_accepted_length"] == pytest.approx(tok.layout.length * 8 / sum(nfe))


def test_spatial_initialisation_copies_the_left_or_upper_neighbour():
    tok = pixel((1, 6, 8), bits=2, pool=2)  # 3×4 grid (positions 0-3 / 4-7 / 8-11), V = 4
    committed = torch.tensor([[2, 1, 2, 3, 1, 2, 0, 0, 0, 0, 0, 0]])  # positions 0..5 committed
    n = torch.tensor([6])
    window = torch.tensor([[3, 0, 0, 1, 0, 0]])  # slots 0..5 = positions 6..11
    need = torch.tensor([[False, True, True, False, True, True]])  # 7, 8, 10, 11 enter the window
    u = torch.full((1, 6), 0.99)  # a random code would be 3

    def filled(init, window=window, need=need, n=n, committed=committed):
        gen = tokenloom.create("generator", "sjd", tokenizer=tok, init=init)
        return gen._fill_window(window, need, committed, n, u)[0].tolist()

    # left: 7 ← draft at 6 (3); 8 starts a row → above, position 4 (1); 10 ← kept draft at 9 (1); 11 ← 10 (1)
    assert filled("left") == [3, 3, 1, 1, 1, 1]
    # above: 7 ← 3 (3); 8 ← 4 (1); 10 ← draft at 6 (3); 11 ← 7, itself new, which copied 3
    assert filled("above") == [3, 3, 1, 1, 3, 3]
    assert filled("random") == [3, 3, 3, 1, 3, 3]
    # the very first window: position 0 has no neighbour, the rest chain back to it
    first = filled("left", window=torch.zeros(1, 6, dtype=torch.long), need=torch.ones(1, 6, dtype=torch.bool),
                   n=torch.tensor([0]))
    assert first == [3] * 6
    # a long chain of new slots resolves like a left-to-right fill
    gen = tokenloom.create("generator", "sjd", tokenizer=pixel((1, 2, 32), bits=2, pool=1), init="left")
    w = torch.zeros(1, 16, dtype=torch.long)
    need = torch.ones(1, 16, dtype=torch.bool)
    need[0, 0] = False
    w[0, 0] = 2
    assert gen._fill_window(w, need, torch.zeros(1, 64, dtype=torch.long), torch.tensor([1]),
                            torch.full((1, 16), 0.5))[0].tolist() == [2] * 16


# -- the KV cache rolls back per row --------------------------------------------------


@pytest.mark.parametrize("pos", ["rope2d", "learned"])
def test_per_row_truncate_continues_each_row_from_its_own_prefix(pos):
    spec = tokenloom.ModelSpec(seq_len=12, vocab_size=5, heads=(5,), train_order="raster",
                               layout=tokenloom.TokenLayout(scales=((3, 4),)))
    m = build_model(spec, ModelConfig(n_layer=2, d_model=16, n_head=2, pos=pos), n_classes=3).eval()
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, 5, (3, 12), generator=g)
    cond = torch.tensor([0, 1, 2])
    with torch.no_grad():
        full = m(seq, cond)  # (3, 12, 5) without a cache
        cache = m.new_cache(3, 20)
        m(seq[:, :6], cond, cache=cache)
        for lengths, T in (([2, 4, 6], 4), ([0, 1, 3], 3)):  # the second roll-back reaches the class slot
            cache.truncate(torch.tensor(lengths))
            inp = torch.stack([seq[b, lengths[b] : lengths[b] + T] for b in range(3)])
            out = m(inp, cond, cache=cache)
            ref = torch.stack([full[b, lengths[b] : lengths[b] + T] for b in range(3)])
            assert torch.allclose(out, ref, atol=1e-5)
            assert cache.row_lengths().tolist() == [n + T for n in lengths]
        cache.select_rows(torch.tensor([2, 0]))
        assert cache.batch_size == 2 and cache.row_lengths().tolist() == [6, 3]
    with pytest.raises(tokenloom.InputError):
        cache.truncate(torch.tensor([7, 0]))  # longer than row 0's prefix


# -- conformance, spec sharing, the pipeline ---------------------------------------------


@pytest.mark.parametrize("name,config", [("sjd", {"window": 3}), ("sjd", {"init": "above"}),
                                         ("speculative", {"gamma": 2})], ids=str)
def test_conformance(name, config):
    tokenloom.testing.check("generator", name, max_examples=4, **config)


def test_both_share_the_raster_model():
    t = pixel((3, 6, 8), bits=1, pool=2)
    raster = tokenloom.create("generator", "raster", tokenizer=t)
    codes = torch.randint(0, t.vocab_size, (4, t.layout.length), generator=torch.Generator().manual_seed(0))
    cond = torch.tensor([0, 1, 2, 3])
    want = raster.training_batch(codes, cond)
    for name in ("sjd", "speculative"):
        gen = tokenloom.create("generator", name, tokenizer=t)
        assert gen.model_spec() == raster.model_spec()
        got = gen.training_batch(codes, cond)
        for field in ("inputs", "targets", "loss_mask", "cond"):
            assert torch.equal(getattr(got, field), getattr(want, field))
        assert torch.equal(torch.as_tensor(got.positions).expand_as(want.positions), want.positions)


def test_speculative_without_a_draft_is_a_clear_error():
    t = pixel((1, 2, 3))
    gen = tokenloom.create("generator", "speculative", tokenizer=t)
    model = peaked_model(gen.model_spec())
    with pytest.raises(tokenloom.InputError, match="draft"):
        gen.generate(model, SamplerChain([]), torch.tensor([0]), rng=RowRNG(0, [0]))
    with pytest.raises(tokenloom.ConfigError):
        tokenloom.create("generator", "speculative", tokenizer=t, draft_d_model=30, draft_n_head=4)


def _config(generator: dict, sampler: list | None = None, metrics=("acceptance", "cost")):
    return parse_config({
        "seed": 0,
        "data": {"name": "shapes", "size": 8, "n": 64, "n_holdout": 16},
        "tokenizer": {"name": "pixel", "bits": 1, "pool": 2},
        "generator": generator,
        "model": {"n_layer": 1, "d_model": 16, "n_head": 2},
        "train": {"steps": 4, "batch_size": 8, "warmup": 1},
        "sampler": sampler or [],
        "metrics": {"names": list(metrics), "n_samples": 8},
        "device": "cpu",
    })


def test_the_pipeline_trains_a_draft_and_reports_acceptance(tmp_path):
    from tokenloom.pipeline import run

    rec = run(_config({"name": "speculative", "gamma": 2, "draft_d_model": 8, "draft_steps": 3}), tmp_path,
              progress=False)
    draft = rec["auxiliary_models"]["draft"]
    assert draft["steps"] == 3 and draft["model"]["d_model"] == 8 and draft["key"] != rec["cache"]["model"]
    assert 0.0 <= rec["metrics"]["acceptance_rate"] <= 1.0 and rec["metrics"]["mean_accepted_length"] >= 1.0
    assert rec["stats"]["draft_nfe_per_image"] == 2 * rec["stats"]["nfe_per_image"]
    assert rec["stats"]["auxiliary_train_flops"] > 0
    # sjd and raster reuse the speculative run's target model; raster has no acceptance statistics
    sjd = run(_config({"name": "sjd", "window": 4}), tmp_path, progress=False)
    assert sjd["cache"]["model"] == rec["cache"]["model"] and sjd["cache"]["model_reused"]
    assert sjd["metrics"]["acceptance_rate"] is not None and sjd["metrics"]["nfe"] < 16
    raster = run(_config({"name": "raster"}), tmp_path, progress=False)
    assert raster["cache"]["model"] == rec["cache"]["model"] and raster["metrics"]["acceptance_rate"] is None


def test_speculative_residual_is_the_normalised_positive_part():
    p = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)
    q = torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64)
    assert torch.allclose(speculative_residual(p, q), torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64))
