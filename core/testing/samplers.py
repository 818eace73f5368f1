"""Sampler properties: the shape contract, the declared ``transform``, and the
exactness of acceptance rules on small enumerable cases."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch

from ..contract.interfaces import AcceptanceRule, SamplerContext, StepInfo
from .common import _expect_error, _given, _hypothesis, _settings


def logits_strategy(max_batch: int = 4, max_vocab: int = 64) -> Any:
    """A hypothesis strategy of random ``[B, V]`` logits: several scales,
    integer-valued rows with ties, ``-inf`` entries (at least one finite entry
    per row)."""
    _, st = _hypothesis()

    @st.composite
    def draw_logits(draw) -> torch.Tensor:
        b = draw(st.integers(1, max_batch))
        v = draw(st.integers(1, max_vocab))
        seed = draw(st.integers(0, 2**16))
        scale = draw(st.sampled_from([1e-3, 0.1, 1.0, 10.0, 100.0]))
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(b, v, generator=g) * scale
        if draw(st.booleans()):  # ties
            x = torch.round(x)
        if draw(st.booleans()) and v > 1:  # -inf entries
            dead = torch.rand(b, v, generator=g) < 0.4
            dead[torch.arange(b), torch.randint(0, v, (b,), generator=g)] = False
            x = x.masked_fill(dead, float("-inf"))
        return x

    return draw_logits()


TRANSFORMS = ("truncate", "select", "rescale", "guide", "identity", "other")


def _check_transform(name: str, proc: Any, logits: torch.Tensor, out: torch.Tensor, info: StepInfo) -> None:
    """What ``proc.transform`` declares holds for ``out = proc(logits, info)``."""
    kind = getattr(proc, "transform", "truncate")
    assert kind in TRANSFORMS, f"{name}: transform must be one of {TRANSFORMS}, got {kind!r}"
    finite, kept = torch.isfinite(logits), torch.isfinite(out)
    if kind in ("truncate", "select", "identity"):
        bad = kept & (out != logits)
        assert not bad.any(), (
            f"{name}: transform = {kind!r} keeps logits unchanged, but entry {tuple(bad.nonzero()[0].tolist())} "
            f"went from {logits[bad][0].item():.4g} to {out[bad][0].item():.4g}")
        if kind == "identity":
            assert torch.equal(kept, finite), f"{name}: transform = 'identity' removed entries"
        if kind == "truncate":
            top = logits.amax(-1, keepdim=True)
            lost = ~(kept & (logits == top)).any(-1)
            assert not lost.any(), (
                f"{name}: transform = 'truncate' keeps the largest logit, but row {int(lost.nonzero()[0])} lost it")
            lowest_kept = out.masked_fill(~kept, float("inf")).amin(-1, keepdim=True)
            skipped = finite & ~kept & (logits > lowest_kept)
            assert not skipped.any(), (
                f"{name}: transform = 'truncate' keeps every entry larger than a kept one, but removed entry "
                f"{tuple(skipped.nonzero()[0].tolist())}")
    elif kind == "rescale":
        assert torch.equal(kept, finite), f"{name}: transform = 'rescale' must keep exactly the finite entries"
        x, y = logits.masked_fill(~finite, 0).double(), out.masked_fill(~finite, 0).double()
        ref = x.abs().argmax(-1, keepdim=True)
        xr, yr = x.gather(-1, ref), y.gather(-1, ref)
        factor = torch.where(xr != 0, yr / xr.where(xr != 0, torch.ones_like(xr)), torch.ones_like(xr))
        assert (factor > 0).all(), f"{name}: transform = 'rescale' multiplies by a positive number, got {factor.min():.4g}"
        scale = y.abs().amax(-1, keepdim=True).clamp(min=1e-30)
        assert ((y - factor * x).abs() <= 1e-5 * scale + 1e-6).all(), (
            f"{name}: transform = 'rescale', but the output is not one positive multiple of each row")
    elif kind == "guide":
        same = proc(logits, attrs.evolve(info, uncond_logits=logits.clone()))
        assert torch.equal(torch.isfinite(same), finite), (
            f"{name}: transform = 'guide' with identical conditional and unconditional logits changed which are finite")
        x, y = logits.masked_fill(~finite, 0), same.masked_fill(~finite, 0)
        assert torch.allclose(y, x, rtol=1e-5, atol=1e-5), (
            f"{name}: transform = 'guide', but identical conditional and unconditional logits do not come back "
            f"unchanged (max difference {(y - x).abs().max().item():.4g})")


def acceptance_outcome(rule: Any, p: torch.Tensor, q: torch.Tensor, n_u: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For one case (``p``, ``q``: ``[V]``): the output distribution of
    drafting ``x ~ q``, accepting it, else resampling from the residual
    (``[V]``, float64), and the acceptance probability of each draft ``[V]``,
    integrating ``u`` over a midpoint grid of ``n_u`` points."""
    V = p.shape[0]
    u = ((torch.arange(n_u, dtype=torch.float64) + 0.5) / n_u).float().repeat(V)
    drafted = torch.arange(V).repeat_interleave(n_u)
    acc = rule.accept(p.expand(V * n_u, V), q.expand(V * n_u, V), drafted, u)
    assert acc.dtype == torch.bool and tuple(acc.shape) == (V * n_u,), "accept must return BoolTensor[B]"
    a = acc.double().reshape(V, n_u).mean(-1)  # (V,) acceptance probability per draft
    r = rule.residual(p.expand(V, V), q.expand(V, V), torch.arange(V)).double()  # (V, V) one row per draft
    qd = q.double()
    out = qd * a + (qd * (1 - a)) @ r
    return out, a


def acceptance_cases(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Small enumerable (p, q) pairs: random, peaked, with zeros on either side, q = p."""
    g = torch.Generator().manual_seed(seed)
    cases = []
    for V in (2, 3, 5, 6):
        for temp in (0.5, 2.0):
            p = torch.softmax(torch.randn(V, generator=g) * temp * 2, -1)
            q = torch.softmax(torch.randn(V, generator=g) * temp * 2, -1)
            cases.append((p, q))
        zp = torch.rand(V, generator=g)
        zp[0] = 0.0
        zq = torch.rand(V, generator=g)
        zq[-1] = 0.0
        cases.append((zp / zp.sum(), zq / zq.sum()))
        cases.append((cases[-3][0], cases[-3][0].clone()))
    return cases


def bind_rule(rule: Any, V: int, seed: int) -> None:
    """Bind ``rule`` to a vocabulary of ``V`` with random code and token
    embeddings (deterministic in ``seed``), as a run binds it."""
    g = torch.Generator().manual_seed(1000 + seed + V)
    # token embeddings at the scale of a small model's (std 0.2): close enough for GSD's default groups
    rule.bind(SamplerContext(vocab_size=V, code_embeddings=torch.randn(V, 3, generator=g),
                             token_embeddings=0.2 * torch.randn(V, 4, generator=g)))


def check_acceptance(name: str, rule: Any, *, n_u: int = 2000) -> None:
    """The meaning of an acceptance rule on small enumerable cases (see the
    module docstring): exact, or exact at ``exact_settings`` and bounded by its
    ``neighbourhood``."""
    from ..blocks.sampling import speculative_residual

    tol = 2.0 / n_u + 1e-6
    relaxed = getattr(rule, "exact_settings", None)
    if relaxed is None:
        exact = rule
    else:
        assert isinstance(relaxed, Mapping) and relaxed, f"{name}: exact_settings must be a non-empty mapping"
        try:
            exact = type(rule)(attrs.evolve(rule.config, **dict(relaxed)))
        except (TypeError, ValueError) as exc:
            raise AssertionError(f"{name}: exact_settings {dict(relaxed)} do not fit its Config: {exc}") from None
    off = "" if relaxed is None else f" with its exact_settings {dict(relaxed)}"
    for i, (p, q) in enumerate(acceptance_cases()):
        V = p.shape[0]
        bind_rule(exact, V, i)
        out, _ = acceptance_outcome(exact, p, q, n_u)
        gap = (out - p.double()).abs().max().item()
        assert gap <= tol, (
            f"{name}{off}: drafting from q, accepting, else resampling from the residual does not give p "
            f"(V = {V}, case {i}): p = {[round(v, 4) for v in p.tolist()]}, q = {[round(v, 4) for v in q.tolist()]}, "
            f"output = {[round(v, 4) for v in out.tolist()]}")
        if relaxed is None:
            continue
        bind_rule(rule, V, i)
        _, a = acceptance_outcome(rule, p, q, n_u)
        drafts = torch.arange(V)
        hood = rule.neighbourhood(p.expand(V, V), drafts)
        assert hood.dtype == torch.bool and tuple(hood.shape) == (V, V), f"{name}: neighbourhood must be BoolTensor[B, V]"
        assert hood[drafts, drafts].all(), f"{name}: a draft's neighbourhood must contain the draft"
        pd, qd = p.double(), q.double()
        reach = (hood.double() * pd).sum(-1)  # (V,) target mass of each draft's neighbourhood
        over = qd * a > reach + tol
        assert not over.any(), (
            f"{name}: accepts draft {int(over.nonzero()[0])} with probability {float((qd * a)[over][0]):.4f}, more "
            f"than the target mass {float(reach[over][0]):.4f} of its declared neighbourhood (case {i})")
        others = hood & (drafts[None, :] != drafts[:, None])
        alone = (others.double() * (pd + qd)).sum(-1) == 0  # no other token with target or draft mass
        exact_a = torch.where(qd > 0, (pd / qd.clamp(min=1e-300)).clamp(max=1), torch.ones_like(qd))
        wrong = alone & (qd > 0) & ((a - exact_a).abs() > tol)
        assert not wrong.any(), (
            f"{name}: draft {int(wrong.nonzero()[0])} has no other token with mass in its neighbourhood, yet it is "
            f"accepted with probability {float(a[wrong][0]):.4f} instead of min(1, p/q) = "
            f"{float(exact_a[wrong][0]):.4f} (case {i})")
        r = rule.residual(p.expand(V, V), q.expand(V, V), drafts).double()
        plain = speculative_residual(pd[None], qd[None])[0]
        moved = alone[:, None] & ((r - plain[None]).abs() > 1e-6)
        assert not moved.any(), (
            f"{name}: the residual after rejecting draft {int(moved.nonzero()[0][0])}, whose neighbourhood holds "
            f"no other token with mass, is not norm(max(p - q, 0)) (case {i})")


def check_sampler(name: str, *, registry: Any = None, max_examples: int = 60, **config: Any) -> None:
    """Sampler properties: a new tensor of the input's shape, no NaN/+inf, no
    revived ``-inf``, the declared ``depends_on_step()`` and ``transform``; for
    acceptance rules, the accept/residual shapes and :func:`check_acceptance`."""
    from ..contract.registry import build_component, get_registry

    _, st = _hypothesis()
    registry = registry or get_registry()
    proc = build_component(registry, "sampler", name, dict(config), path="sampler")

    @_settings(max_examples)
    @_given(logits=logits_strategy(), step=st.integers(0, 15))
    def contract(logits: torch.Tensor, step: int) -> None:
        V = logits.shape[-1]
        g = torch.Generator().manual_seed(V * 7 + step)
        proc.bind(SamplerContext(vocab_size=V, code_embeddings=torch.randn(V, 4, generator=g),
                                 token_embeddings=torch.randn(V, 8, generator=g)))
        uncond = None
        if proc.needs_uncond:
            uncond = (torch.randn(logits.shape, generator=g) * 3).masked_fill(torch.isneginf(logits), float("-inf"))
        info = StepInfo(step=step, n_steps=16, uncond_logits=uncond)
        before = logits.clone()
        uncond_before = uncond.clone() if uncond is not None else None
        out = proc(logits, info)
        assert torch.equal(logits, before), f"{name}: modified its input logits"
        if uncond is not None:
            assert torch.equal(uncond, uncond_before), f"{name}: modified info.uncond_logits"
        assert isinstance(out, torch.Tensor) and out.shape == logits.shape, f"{name}: output shape {tuple(out.shape)}"
        assert out is not logits, f"{name}: returned its input tensor object (return a new tensor)"
        assert not torch.isnan(out).any(), f"{name}: produced NaN"
        assert not torch.isposinf(out).any(), f"{name}: produced +inf"
        assert torch.isfinite(out).any(-1).all(), f"{name}: left a row with no finite entry"
        assert torch.isneginf(out[torch.isneginf(logits)]).all(), f"{name}: revived a -inf entry"
        _check_transform(name, proc, logits, out, info)
        if not proc.depends_on_step():  # the declaration holds at every step
            for other in (0, 7, 15):
                o2 = proc(logits, StepInfo(step=other, n_steps=16, uncond_logits=uncond))
                assert torch.equal(o2, out), f"{name}: depends_on_step() is False but step {other} changes the output"
        if isinstance(proc, AcceptanceRule):
            p = torch.softmax(out, -1)
            q = torch.softmax(torch.randn(logits.shape, generator=g), -1)
            drafted = q.argmax(-1)
            u = torch.rand(logits.shape[0], generator=g)
            acc = proc.accept(p, q, drafted, u)
            assert acc.dtype == torch.bool and acc.shape == drafted.shape, f"{name}: accept must return BoolTensor[B]"
            assert proc.accept(p, p, p.argmax(-1), u).all(), f"{name}: rejected a draft whose q equals p"
            r = proc.residual(p, q, drafted)
            assert r.shape == p.shape and (r >= 0).all(), f"{name}: residual must be a distribution [B, V]"
            assert torch.allclose(r.sum(-1), torch.ones(r.shape[0], dtype=r.dtype), atol=1e-4), (
                f"{name}: residual rows must sum to 1"
            )

    contract()
    if isinstance(proc, AcceptanceRule):
        check_acceptance(name, proc)

    # bad rows are a clear error naming the step
    dead = torch.zeros(2, 5)
    dead[1] = float("-inf")
    info = StepInfo(step=3, n_steps=8, uncond_logits=torch.zeros(2, 5) if proc.needs_uncond else None)
    _expect_error(f"{name}(an all -inf row)", lambda: proc(dead, info))
    nan = torch.zeros(2, 5)
    nan[0, 2] = float("nan")
    _expect_error(f"{name}(a NaN entry)", lambda: proc(nan, info))
