"""The conformance kit checks meaning, not only shape: for every property it
adds, a deliberately wrong plugin that honours the shapes fails it, and a
generator written from ``tokenloom.interfaces`` alone (``conformance_pkg``)
passes. Each wrong plugin is registered in a registry of its own
(``Registry.from_plugins``), never in the process-wide one."""

from __future__ import annotations

import math
import subprocess
import sys
import types
from pathlib import Path

import attrs
import pytest
import torch
from conformance_pkg import PLUGIN, PlainRaster

import tokenloom
import tokenloom.testing
from tokenloom.plugins.generators.masked import MaskedGenerator
from tokenloom.plugins.generators.raster import RasterGenerator
from tokenloom.registry import Registry
from tokenloom.sampling import speculative_residual
from tokenloom.testing.samplers import acceptance_cases, acceptance_outcome, bind_rule


def registry_with(kind: str, name: str, cls: type) -> Registry:
    """A registry holding one component, ``cls`` as ``name``."""
    hook = {"tokenizer": "register_tokenizers", "generator": "register_generators", "sampler": "register_samplers",
            "metric": "register_metrics"}[kind]
    ns = types.SimpleNamespace()
    setattr(ns, hook, tokenloom.hookimpl(lambda register: register(name, cls)))
    reg = Registry.from_plugins([(f"wrong-{name}", ns)], strict=True)
    assert reg.available(kind) == [name]
    return reg


def fails(kind: str, name: str, cls: type, match: str, **config) -> None:
    with pytest.raises(AssertionError, match=match):
        tokenloom.testing.check(kind, name, registry=registry_with(kind, name, cls), **config)


# ---------------------------------------------------------------------------
# tokenizers
# ---------------------------------------------------------------------------


class Cells(tokenloom.Tokenizer):
    """1 bit per channel per ``pool``×``pool`` cell, packed into one code:
    a correct, cell-local tokenizer (the variants below break it)."""

    cell_local = True

    @attrs.frozen
    class Config:
        pool: int = 2

    def __init__(self, config, *, image_shape):
        super().__init__(config, image_shape=image_shape)
        c, h, w = self.image_shape
        if h % config.pool or w % config.pool:
            raise tokenloom.ConfigError(f"pool {config.pool} does not divide {h}×{w}")
        self.grid = (h // config.pool, w // config.pool)
        self.layout = tokenloom.TokenLayout(scales=(self.grid,))
        self.vocab_size = 2**c
        self.register_buffer("place", 2 ** torch.arange(c), persistent=False)

    def to_grid(self, codes):  # [B, L] -> [B, h, w]
        return codes.reshape(-1, *self.grid)

    def from_grid(self, grid):  # [B, h, w] -> [B, L]
        return grid.reshape(grid.shape[0], -1)

    def encode(self, images):
        images = self.check_images(images)
        bits = (torch.nn.functional.avg_pool2d(images, self.config.pool) > 0).long()  # [B, C, h, w]
        return self.from_grid((bits * self.place.view(1, -1, 1, 1)).sum(1))

    def decode(self, codes):
        codes = self.check_codes(codes)
        bits = (self.to_grid(codes)[:, None] // self.place.view(1, -1, 1, 1)) % 2
        x = bits.float() * 2 - 1
        return x.repeat_interleave(self.config.pool, 2).repeat_interleave(self.config.pool, 3).contiguous()

    def code_embeddings(self):
        return ((torch.arange(self.vocab_size)[:, None] // self.place) % 2).float() * 2 - 1


class Zeros(Cells):
    """Valid shapes, no information: encode and decode return zeros."""

    cell_local = False  # (it would fail locality too: its codes never change)

    def encode(self, images):
        images = self.check_images(images)
        return torch.zeros(images.shape[0], self.layout.length, dtype=torch.long)

    def decode(self, codes):
        codes = self.check_codes(codes)
        return torch.zeros(codes.shape[0], *self.image_shape)


class Swapped(Cells):
    """Lays its codes out column-major while its layout says row-major: a
    perfect round trip, but code i does not belong to cell (i // w, i % w)."""

    def from_grid(self, grid):
        return grid.transpose(1, 2).reshape(grid.shape[0], -1)

    def to_grid(self, codes):
        h, w = self.grid
        return codes.reshape(-1, w, h).transpose(1, 2)


class WrongWay(Cells):
    """Declares its grid as (W, H) while it encodes along (H, W): a perfect
    round trip, the same length, invisible on square images."""

    def __init__(self, config, *, image_shape):
        super().__init__(config, image_shape=image_shape)
        h, w = self.grid
        self.layout = tokenloom.TokenLayout(scales=((w, h),))


class WrongWayNotLocal(WrongWay):
    """The same mix-up in a tokenizer that does not claim cell locality: the
    grid at a non-square size still has to follow H and W."""

    cell_local = False


def test_a_correct_cell_local_tokenizer_passes():
    tokenloom.testing.check("tokenizer", "cells", registry=registry_with("tokenizer", "cells", Cells),
                            image_shape=(3, 8, 8), max_examples=4)


@pytest.mark.parametrize("cls, match", [
    (Zeros, "best constant image"),
    (Swapped, "changed the codes of cells"),
    (WrongWay, "does not follow"),
    (WrongWayNotLocal, "does not follow H and W"),
])
def test_a_wrong_tokenizer_fails(cls, match):
    fails("tokenizer", "wrong", cls, match, image_shape=(3, 8, 8), max_examples=4)


# ---------------------------------------------------------------------------
# samplers and acceptance rules
# ---------------------------------------------------------------------------


class Negate(tokenloom.Sampler):
    """Flips the logits: the least likely token becomes the most likely."""

    @attrs.frozen
    class Config:
        pass

    def process(self, logits, info):
        return torch.where(torch.isfinite(logits), -logits, logits)


class LowestK(tokenloom.Sampler):
    """top-k with the comparison the wrong way round: keeps the k lowest."""

    @attrs.frozen
    class Config:
        k: int = 2

    def process(self, logits, info):
        k = min(self.config.k, logits.shape[-1])
        finite = torch.isfinite(logits)
        kth = torch.topk(logits.masked_fill(~finite, float("inf")), k, dim=-1, largest=False).values[..., -1:]
        return logits.masked_fill(~(finite & (logits <= kth)), float("-inf"))


class NegativeTemperature(tokenloom.Sampler):
    transform = "rescale"

    @attrs.frozen
    class Config:
        pass

    def process(self, logits, info):
        return torch.where(torch.isfinite(logits), logits / -2.0, logits)


class GuidanceAway(tokenloom.Sampler):
    """'Guidance' that ignores the unconditional logits and subtracts a constant per row."""

    transform = "guide"
    needs_uncond = True

    @attrs.frozen
    class Config:
        pass

    def process(self, logits, info):
        return 2 * logits - info.uncond_logits.abs()


@pytest.mark.parametrize("cls, match", [
    (Negate, "keeps logits unchanged"),
    (LowestK, "keeps the largest logit"),
    (NegativeTemperature, "positive"),
    (GuidanceAway, "unchanged"),
])
def test_a_wrong_processor_fails(cls, match):
    fails("sampler", "wrong", cls, match, max_examples=30)


def test_the_declared_transforms_of_the_builtins():
    reg = tokenloom.get_registry()
    declared = {name: reg.get("sampler", name).cls.transform for name in reg.available("sampler")}
    assert {k: declared[k] for k in ("top-k", "top-p", "min-p", "greedy")} == dict.fromkeys(
        ("top-k", "top-p", "min-p", "greedy"), "truncate")
    assert (declared["typical"], declared["temperature"], declared["cfg"]) == ("select", "rescale", "guide")
    assert {declared[k] for k in ("exact", "lantern", "gsd")} == {"identity"}


class AcceptAll(tokenloom.AcceptanceRule):
    """Keeps every draft: the output follows q, not p."""

    @attrs.frozen
    class Config:
        pass

    def accept(self, p, q, drafted, u):
        return torch.ones_like(drafted, dtype=torch.bool)

    def residual(self, p, q, drafted=None):
        return speculative_residual(p, q)


class ResampleFromP(AcceptAll):
    """The exact acceptance test, but resampling from p after a rejection."""

    def accept(self, p, q, drafted, u):
        return u.double() * q.gather(-1, drafted[:, None])[:, 0].double() < p.gather(-1, drafted[:, None])[:, 0]

    def residual(self, p, q, drafted=None):
        return p.clone()


class RelaxedNeverOff(AcceptAll):
    """Claims a relaxation parameter that switches it off, but ignores it."""

    exact_settings = {"slack": 0.0}  # noqa: RUF012

    @attrs.frozen
    class Config:
        slack: float = 0.5


class LanternOutsideItsNeighbourhood(tokenloom.AcceptanceRule):
    """Exact at ``delta = 0``; otherwise accepts with p(x) + delta, as if it
    borrowed mass — but declares that it borrows from no other token."""

    exact_settings = {"delta": 0.0}  # noqa: RUF012

    @attrs.frozen
    class Config:
        delta: float = 0.3

    def accept(self, p, q, drafted, u):
        px = p.gather(-1, drafted[:, None])[:, 0].double() + self.config.delta
        return u.double() * q.gather(-1, drafted[:, None])[:, 0].double() < px

    def residual(self, p, q, drafted=None):
        return speculative_residual(p, q)


@pytest.mark.parametrize("cls, match", [
    (AcceptAll, "does not give p"),
    (ResampleFromP, "does not give p"),
    (RelaxedNeverOff, "exact_settings .* does not give p"),
    (LanternOutsideItsNeighbourhood, "declared neighbourhood"),
])
def test_a_wrong_acceptance_rule_fails(cls, match):
    fails("sampler", "wrong", cls, match, max_examples=5)


def test_a_relaxed_rule_passes_and_is_exact_at_its_exact_settings():
    for name, options in (("lantern", {"k": 2, "delta": 0.4}), ("gsd", {}),
                          ("gsd", {"rank_window": 3, "rank_window_above": 2, "max_gap": 0.5})):
        tokenloom.testing.check("sampler", name, max_examples=5, **options)
    # the exactness property has teeth on the real rules: relaxed, they are not exact on the kit's cases
    for name, options in (("lantern", {"k": 2, "delta": 0.4}), ("gsd", {"max_gap": 1.0})):
        rule, gaps = tokenloom.create("sampler", name, **options), []
        for i, (p, q) in enumerate(acceptance_cases()):
            bind_rule(rule, p.shape[0], i)
            out, _ = acceptance_outcome(rule, p, q, 2000)
            gaps.append(float((out - p.double()).abs().max()))
        assert max(gaps) > 0.02, (name, gaps)


# ---------------------------------------------------------------------------
# generators
# ---------------------------------------------------------------------------


def test_a_generator_written_from_the_interfaces_alone_passes():
    reg = Registry.from_plugins([("plain", PLUGIN)], strict=True)
    assert reg.available("generator") == ["plain-raster"]
    tokenloom.testing.check("generator", "plain-raster", registry=reg, max_examples=4)


def test_the_test_package_imports_only_public_tokenloom_names():
    root = Path(__file__).resolve().parent
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import conformance_pkg.raster; "
            "print(sorted(m for m in sys.modules if m.startswith('tokenloom.plugins')))")
    out = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"  # no built-in plugin was needed to write it
    source = (root / "conformance_pkg" / "raster.py").read_text()
    assert "from tokenloom" not in source and "import tokenloom\n" in source


class ZeroLogits(PlainRaster):
    """Samples from zero logits: uniform codes whatever the model says."""

    def next_logits(self, model, token, rows, cache, t):
        return torch.zeros_like(super().next_logits(model, token, rows, cache, t))


class UniformLikelihood(PlainRaster):
    """Reports the uniform baseline as its likelihood (it still sums to one)."""

    def log_likelihood(self, model, codes, cond):
        return torch.full((codes.shape[0],), -self.L * torch.log(torch.tensor(float(self.V))).item())


class OffByOnePosition(PlainRaster):
    """Decodes with every input one position to the right of where training put it."""

    def next_logits(self, model, token, rows, cache, t):
        pos = torch.tensor([t], device=model.device).clamp(max=self.L - 1)
        return model(token, rows, cache=cache, positions=pos)[:, -1]


@pytest.mark.parametrize("cls, match", [
    (ZeroLogits, "decoding and training disagree"),
    (UniformLikelihood, "decoding and training disagree"),
    (OffByOnePosition, "decoding and training disagree"),
])
def test_a_wrong_generator_fails(cls, match):
    fails("generator", "wrong", cls, match, max_examples=2)


class OwnDraws(PlainRaster):
    """Runs the model and the chain, then returns codes of its own, drawn from
    uniform logits — and looks at the chain once more, so the kit cannot
    follow its draws: only the chi-square test can see what it samples."""

    def generate(self, model, chain, cond, *, rng, known=None):
        super().generate(model, chain, cond, rng=rng, known=known)
        zeros = torch.zeros(cond.shape[0], self.V)
        chain.process(zeros, tokenloom.StepInfo(uncond_logits=zeros))
        return rng.categorical(torch.zeros(cond.shape[0], self.L, self.V), 0, stream=5)


def test_the_chi_square_test_catches_samples_the_kit_cannot_follow():
    fails("generator", "wrong", OwnDraws, "chi-square", max_examples=2)


def test_chi_square_pvalue_is_calibrated_on_exact_samples():
    every = torch.cartesian_prod(torch.arange(2), torch.arange(3))
    probs = torch.tensor([0.3, 0.1, 0.05, 0.25, 0.2, 0.1])
    g = torch.Generator().manual_seed(0)
    samples = every[torch.multinomial(probs, 4000, replacement=True, generator=g)]
    assert tokenloom.testing.chi_square_pvalue(samples, every, probs) > 1e-3
    assert tokenloom.testing.chi_square_pvalue(samples, every, torch.full((6,), 1 / 6)) < 1e-9


# ---------------------------------------------------------------------------
# generators on continuous tokens
# ---------------------------------------------------------------------------
# Each variant keeps the discrete path of the built-in order (which passes) and breaks only its
# continuous one, so the properties that catch it are the kit's continuous ones.


class BatchNoise(RasterGenerator):
    """Adds noise drawn for the whole batch from one seeded generator: deterministic per seed, but
    image i gets the noise of its row, so it changes with its batch."""

    def generate(self, model, chain, cond, *, rng, known=None):
        out = super().generate(model, chain, cond, rng=rng, known=known)
        if self.D:
            out = out + 0.05 * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
        return out


class LyingNFE(RasterGenerator):
    """Claims one backbone pass fewer than it takes on continuous tokens."""

    def expected_nfe(self):
        return self.L - 1 if self.D else self.L


class WideTargets(RasterGenerator):
    """Float targets one channel wider than the tokens (a stray flag channel)."""

    def training_batch(self, codes, cond):
        batch = super().training_batch(codes, cond)
        if self.D:
            batch.targets = torch.cat([batch.targets, torch.zeros_like(batch.targets[..., :1])], -1)
        return batch


class DrawsTwice(RasterGenerator):
    """Decodes every continuous token twice (a second pass over the whole image) and says so in its
    NFE — but the head draws each token twice."""

    def expected_nfe(self):
        return 2 * self.L if self.D else self.L

    def generate(self, model, chain, cond, *, rng, known=None):
        if self.D:
            super().generate(model, chain, cond, rng=rng, known=known)
        return super().generate(model, chain, cond, rng=rng, known=known)


class MadeUpLikelihood(RasterGenerator):
    """Reports a likelihood of continuous tokens although its head has none."""

    def log_likelihood(self, model, codes, cond):
        if self.D:
            return torch.zeros(codes.shape[0])
        return super().log_likelihood(model, codes, cond)


class NaNTolerant(RasterGenerator):
    """Replaces NaN latents by zeros instead of refusing them."""

    def training_batch(self, codes, cond):
        if self.D and codes.dtype.is_floating_point:
            codes = torch.nan_to_num(codes)
        return super().training_batch(codes, cond)


class ForgetsKnown(MaskedGenerator):
    """MAR that ignores the known latents (the discrete path keeps them)."""

    def generate(self, model, chain, cond, *, rng, known=None):
        return super().generate(model, chain, cond, rng=rng, known=None if self.continuous else known)


class PeeksAtLatents(RasterGenerator):
    """Feeds each latent at its own index instead of the next one: the hidden state that predicts
    x_t sees x_t (decoding, unchanged, cannot tell)."""

    def training_batch(self, codes, cond):
        batch = super().training_batch(codes, cond)
        if self.D:
            batch.inputs = torch.cat([batch.inputs[:, :1], batch.targets[:, 1:]], 1)
        return batch


@pytest.mark.parametrize("cls, match", [
    (BatchNoise, "differs when generated alone vs in a batch"),
    (LyingNFE, "forward passes, expected_nfe"),
    (WideTargets, "continuous targets must be float"),
    (DrawsTwice, "each token must be drawn once"),
    (MadeUpLikelihood, "never made up"),
    (NaNTolerant, "NaN latents to training_batch: accepted silently"),
    (ForgetsKnown, "changed a known latent"),
    (PeeksAtLatents, "training mask leaks"),
])
def test_a_wrong_continuous_generator_fails(cls, match):
    fails("generator", "wrong", cls, match, max_examples=4, token_kinds=("continuous",))


def test_the_default_check_covers_continuous_tokens():
    # LyingNFE is a correct raster order on codes: only the continuous properties can catch it
    tokenloom.testing.check("generator", "lying", registry=registry_with("generator", "lying", LyingNFE),
                            max_examples=2, token_kinds=("discrete",))
    fails("generator", "wrong", LyingNFE, "expected_nfe", max_examples=2, n_samples=300)


# ---------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------


class AlwaysZero(tokenloom.Metric):
    """An "FID" that is always 0."""

    requires = frozenset({"real", "generated"})

    @attrs.frozen
    class Config:
        pass

    def compute(self, ctx):
        for field in ("real", "generated"):
            x = getattr(ctx, field)
            if x is None:
                raise tokenloom.InputError(f"always-zero: no ctx.{field}")
            tokenloom.check_images(x, tuple(x.shape[1:]), where=f"ctx.{field}")
        return tokenloom.MetricResult({"fid": 0.0}, self.card())


class BackwardsMSE(AlwaysZero):
    """An MSE that falls as the reconstruction gets worse."""

    requires = frozenset({"real", "reconstructed"})

    def compute(self, ctx):
        if ctx.reconstructed is None or ctx.real is None:
            raise tokenloom.InputError("backwards: needs real and reconstructed")
        tokenloom.check_images(ctx.reconstructed, tuple(ctx.real.shape[1:]), where="ctx.reconstructed")
        tokenloom.check_images(ctx.real, tuple(ctx.real.shape[1:]), where="ctx.real")
        return tokenloom.MetricResult({"mse": float(1 / (1 + ((ctx.real - ctx.reconstructed) ** 2).mean()))},
                                      self.card())


class NeverApplies(AlwaysZero):
    """Says "not applicable" even when given everything it asks for."""

    def compute(self, ctx):
        super().compute(ctx)
        return tokenloom.MetricResult({"fid": None}, self.card())


class CrashesWithoutInput(AlwaysZero):
    """Reads ctx.generated without checking that it is there."""

    def compute(self, ctx):
        spread = float(ctx.generated.std()) + float(ctx.real.std())
        if not (ctx.generated.abs().max() <= 1 and ctx.real.abs().max() <= 1) or math.isnan(spread):
            raise tokenloom.InputError("crashes: images outside [-1, 1] or NaN")
        return tokenloom.MetricResult({"fid": float(((ctx.generated.mean(0) - ctx.real.mean(0)) ** 2).sum())},
                                      self.card())


@pytest.mark.parametrize("cls, match", [
    (AlwaysZero, "no score moves"),
    (BackwardsMSE, "gets better as ctx.reconstructed moves"),
    (NeverApplies, "every value is None"),
    (CrashesWithoutInput, "without ctx.generated .* raised AttributeError"),
])
def test_a_wrong_metric_fails(cls, match):
    fails("metric", "wrong", cls, match)


# ---------------------------------------------------------------------------
# the kit without its development dependency
# ---------------------------------------------------------------------------


def test_the_kit_imports_without_hypothesis_and_names_it_when_a_check_runs():
    code = """
import sys
sys.modules["hypothesis"] = None  # as if not installed
import tokenloom.testing
try:
    tokenloom.testing.check("sampler", "top-k")
except ImportError as exc:
    print("ImportError:", exc)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "ImportError:" in out.stdout and "hypothesis" in out.stdout and "tokenloom[dev]" in out.stdout
