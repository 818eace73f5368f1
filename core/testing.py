"""The conformance kit: the plugin contract as hypothesis properties.

A third party checks their plugin from their own pytest suite::

    import tokenloom.testing

    def test_my_tokenizer_honours_the_contract():
        tokenloom.testing.check("tokenizer", "mytok", bits=3)

``check(kind, name, **config)`` builds the component through the registry
(exactly as a config file would), runs every property for that kind, and
raises ``AssertionError`` describing the first violation. tokenloom's own
test suite runs it over every registered component, so a plugin is tested the
moment it is registered.

Keyword arguments besides the component's config:

- ``image_shape=(C, H, W)`` for tokenizers (default ``(3, 16, 16)``);
- ``fit_steps=N``: optimiser steps to fit a trainable tokenizer before the
  properties run (default 2: the contract must hold for any weights);
- ``max_examples=N``: hypothesis examples per property (default 20);
- ``context=MetricContext(...)`` for metrics (default: :func:`metric_context`,
  small synthetic images, codes and run statistics).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .contract.errors import TokenloomError
from .contract.interfaces import AcceptanceRule, SamplerContext, StepInfo

CHECKS: dict[str, Callable[..., None]] = {}


def _settings(max_examples: int):
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


def _expect_error(what: str, fn: Callable[[], Any]) -> None:
    try:
        fn()
    except TokenloomError:
        return
    except Exception as exc:
        raise AssertionError(
            f"{what}: raised {type(exc).__name__}: {exc} — expected a clear tokenloom.InputError"
        ) from exc
    raise AssertionError(f"{what}: accepted silently — expected a clear tokenloom.InputError")


def random_images(n: int, image_shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    """Smooth-ish random images in [-1, 1] (low-resolution noise upsampled,
    plus flat patches at the extremes), deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = image_shape
    low = torch.randn(n, c, max(1, h // 4), max(1, w // 4), generator=g)
    x = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    x = torch.tanh(x + 0.3 * torch.randn(n, c, h, w, generator=g))
    if n and h >= 2 and w >= 2:
        x[0, :, : h // 2, : w // 2] = 1.0
        x[-1, :, h // 2 :, w // 2 :] = -1.0
    return x.float()


# ---------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------


def check_tokenizer(name: str, *, registry: Any = None, image_shape=(3, 16, 16), fit_steps: int = 2,
                    max_examples: int = 20, **config: Any) -> None:
    from .contract.checkpoint import load_component, save_tokenizer
    from .contract.registry import build_component, get_registry

    registry = registry or get_registry()
    image_shape = tuple(image_shape)
    tok = build_component(registry, "tokenizer", name, {**config, "image_shape": image_shape}, path="tokenizer")
    layout, V = tok.layout, tok.vocab_size
    assert isinstance(V, int) and V >= 1, f"{name}: vocab_size must be a positive int, got {V!r}"
    L = layout.length
    train = random_images(32, image_shape, seed=1234)
    stats = tok.fit(train, steps=fit_steps, progress=False)
    assert isinstance(stats, dict), f"{name}: fit() must return a dict, got {type(stats).__name__}"
    tok.eval()
    c, h, w = image_shape

    emb = tok.code_embeddings()
    assert isinstance(emb, torch.Tensor) and emb.dim() == 2 and emb.shape[0] == V, (
        f"{name}: code_embeddings() must be [V={V}, D], got {tuple(getattr(emb, 'shape', ()))}"
    )
    assert emb.dtype.is_floating_point and torch.isfinite(emb).all(), f"{name}: code_embeddings() not finite floats"

    @_settings(max_examples)
    @given(n=st.integers(1, 4), seed=st.integers(0, 2**16))
    def encode_decode(n: int, seed: int) -> None:
        x = random_images(n, image_shape, seed)
        with torch.no_grad():
            codes = tok.encode(x)
            assert codes.dtype == torch.long, f"{name}: encode must return int64 codes, got {codes.dtype}"
            assert tuple(codes.shape) == (n, L), f"{name}: encode shape {tuple(codes.shape)} != {(n, L)} from the layout"
            assert codes.min() >= 0 and codes.max() < V, f"{name}: codes outside [0, {V})"
            again = tok.encode(x)
            assert torch.equal(codes, again), f"{name}: encode is not deterministic in eval mode"
            singles = torch.cat([tok.encode(x[i : i + 1]) for i in range(n)])
            assert torch.equal(codes, singles), f"{name}: a batch encodes differently from its images one by one"
            y = tok.decode(codes)
            assert y.dtype == torch.float32 and tuple(y.shape) == (n, c, h, w), (
                f"{name}: decode must return float32 {(n, c, h, w)}, got {y.dtype} {tuple(y.shape)}"
            )
            assert torch.isfinite(y).all() and y.min() >= -1 - 1e-5 and y.max() <= 1 + 1e-5, (
                f"{name}: decoded images outside [-1, 1]"
            )

    @_settings(max_examples)
    @given(n=st.integers(1, 3), seed=st.integers(0, 2**16))
    def decode_any_codes(n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        codes = torch.randint(0, V, (n, L), generator=g)
        with torch.no_grad():
            y = tok.decode(codes)
            assert tuple(y.shape) == (n, c, h, w) and torch.isfinite(y).all(), f"{name}: decode of valid codes failed"
            assert y.min() >= -1 - 1e-5 and y.max() <= 1 + 1e-5, f"{name}: decoded images outside [-1, 1]"
            assert torch.equal(tok.decode(codes[:1]), y[:1]), f"{name}: decode of a batch differs from one by one"

    encode_decode()
    decode_any_codes()

    # save -> load gives identical codes
    x = random_images(3, image_shape, seed=7)
    with torch.no_grad():
        codes = tok.encode(x)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "tok.safetensors"
        save_tokenizer(path, tok, name=name, options=dict(config))
        loaded = load_component(path)
        loaded.eval()
        with torch.no_grad():
            assert torch.equal(loaded.encode(x), codes), f"{name}: save -> load changes the codes"
            assert torch.allclose(loaded.decode(codes), tok.decode(codes)), f"{name}: save -> load changes decode"

    # bad inputs get a clear error
    good = random_images(2, image_shape, seed=3)
    _expect_error(f"{name}.encode(wrong channels)", lambda: tok.encode(random_images(2, (c + 1, h, w), 3)))
    _expect_error(f"{name}.encode(wrong size)", lambda: tok.encode(random_images(2, (c, h + 1, w + 1), 3)))
    nan = good.clone()
    nan[0, 0, 0, 0] = float("nan")
    _expect_error(f"{name}.encode(NaN)", lambda: tok.encode(nan))
    _expect_error(f"{name}.encode(uint8)", lambda: tok.encode(((good + 1) * 127.5).to(torch.uint8)))
    _expect_error(f"{name}.encode(float64)", lambda: tok.encode(good.double()))
    _expect_error(f"{name}.encode(values in [0, 255])", lambda: tok.encode((good + 1) * 127.5))
    _expect_error(f"{name}.encode(a 3-D tensor)", lambda: tok.encode(good[0]))
    _expect_error(f"{name}.encode(a numpy array)", lambda: tok.encode(good.numpy()))
    _expect_error(f"{name}.decode(code = vocab_size)", lambda: tok.decode(torch.full((1, L), V)))
    _expect_error(f"{name}.decode(code = -1)", lambda: tok.decode(torch.full((1, L), -1)))
    _expect_error(f"{name}.decode(wrong length)", lambda: tok.decode(torch.zeros(1, L + 1, dtype=torch.long)))
    _expect_error(f"{name}.decode(float codes)", lambda: tok.decode(torch.zeros(1, L)))


CHECKS["tokenizer"] = check_tokenizer


# ---------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------


@st.composite
def logits_strategy(draw, max_batch: int = 4, max_vocab: int = 64) -> torch.Tensor:
    """Random ``[B, V]`` logits: several scales, integer-valued rows with ties,
    ``-inf`` entries (at least one finite entry per row)."""
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


def check_sampler(name: str, *, registry: Any = None, max_examples: int = 60, **config: Any) -> None:
    from .contract.registry import build_component, get_registry

    registry = registry or get_registry()
    proc = build_component(registry, "sampler", name, dict(config), path="sampler")

    @_settings(max_examples)
    @given(logits=logits_strategy(), step=st.integers(0, 15))
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

    # bad rows are a clear error naming the step
    dead = torch.zeros(2, 5)
    dead[1] = float("-inf")
    info = StepInfo(step=3, n_steps=8, uncond_logits=torch.zeros(2, 5) if proc.needs_uncond else None)
    _expect_error(f"{name}(an all -inf row)", lambda: proc(dead, info))
    nan = torch.zeros(2, 5)
    nan[0, 2] = float("nan")
    _expect_error(f"{name}(a NaN entry)", lambda: proc(nan, info))


CHECKS["sampler"] = check_sampler


# ---------------------------------------------------------------------------
# Generators
# ---------------------------------------------------------------------------


def _tiny_model(spec: Any, *, pos: str = "learned", n_classes: int = 3, seed: int = 0) -> Any:
    from .backbone.model import InstrumentedModel, build_model
    from .contract.config import ModelConfig

    return InstrumentedModel(build_model(spec, ModelConfig(n_layer=2, d_model=16, n_head=2, pos=pos),
                                         n_classes=n_classes, seed=seed).eval())


def _attach_tiny_auxiliary(gen: Any, spec: Any, *, pos: str, seed: int) -> None:
    """Untrained auxiliary models (e.g. a speculative draft) for a generator
    that asks for them, sized from the tiny target's config."""
    from .backbone.model import InstrumentedModel, build_model
    from .contract.config import ModelConfig

    wanted = gen.auxiliary_models(ModelConfig(n_layer=2, d_model=16, n_head=2, pos=pos))
    if wanted:
        gen.attach_models({name: InstrumentedModel(build_model(spec, cfg, n_classes=3, seed=seed + 1 + i).eval())
                           for i, (name, cfg) in enumerate(wanted.items())})


def _logits_of(model: Any, batch: Any) -> torch.Tensor:
    out = model(batch.inputs, batch.cond, positions=batch.positions, attn_mask=batch.attn_mask,
                target_positions=batch.extra.get("target_positions"))
    out = out if isinstance(out, tuple) else (out,)
    return torch.stack([o.float() for o in out], -2)  # (B, T, n_heads, V) when the heads agree in V


def _seeded_batch(gen: Any, codes: torch.Tensor, cond: torch.Tensor, seed: int) -> Any:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return gen.training_batch(codes, cond)


def check_generator(name: str, *, registry: Any = None, tokenizer: tuple[str, dict] | None = None,
                    max_examples: int = 8, **config: Any) -> None:
    """Generator properties, over random token layouts (grids of 1–4 × 1–4
    pixel tokens, with and without residual depth) unless ``tokenizer=(name,
    options)`` (with ``image_shape`` among the options) fixes one:

    - the spec and teacher-forcing batch are well formed;
    - no leak: changing a code leaves the logits that predict it unchanged
      (untrained model, fp32, 1e-5);
    - ``generate`` returns ``[B, L]`` codes in range; NFE equals
      ``expected_nfe()``, with and without classifier-free guidance (one
      batched pass for both rows);
    - same seed → identical codes, and image i is the same alone or in a batch;
    - with ``supports_known``, every known token is kept;
    - with ``exact_likelihood``, ``log_likelihood`` is a log-probability and
      sums to 1 over every sequence of a small layout.
    """
    from .blocks.rng import RowRNG
    from .blocks.sampling import SamplerChain
    from .contract.interfaces import Known
    from .contract.registry import build_component, get_registry

    registry = registry or get_registry()

    def make(tok_name: str, tok_opts: dict) -> tuple[Any, Any]:
        tok = build_component(registry, "tokenizer", tok_name, dict(tok_opts), path="tokenizer")
        gen = build_component(registry, "generator", name, {**config, "tokenizer": tok}, path="generator")
        return tok, gen

    def pixel_layout(gh: int, gw: int, depth3: bool) -> tuple[str, dict]:
        return ("pixel", {"bits": 1, "pool": 2, "per_channel": depth3, "image_shape": (3, 2 * gh, 2 * gw)})

    def chain(kind: int) -> SamplerChain:
        build = lambda n, **kw: build_component(registry, "sampler", n, kw, path="sampler")
        return SamplerChain([[], [build("top-k", k=3)], [build("cfg", scale=2.0), build("temperature", t=0.9)]][kind])

    @_settings(max_examples)
    @given(gh=st.integers(1, 4), gw=st.integers(1, 4), depth3=st.booleans(), seed=st.integers(0, 2**16),
           pos=st.sampled_from(["learned", "rope2d"]), kind=st.integers(0, 2))
    def properties(gh: int, gw: int, depth3: bool, seed: int, pos: str, kind: int) -> None:
        tok, gen = make(*(tokenizer or pixel_layout(gh, gw, depth3)))
        L, V = tok.layout.length, tok.vocab_size
        spec = gen.model_spec()
        assert spec.seq_len >= 1 and spec.vocab_size >= V and spec.heads, f"{name}: malformed model_spec {spec}"
        g = torch.Generator().manual_seed(seed)
        B = 4
        codes = torch.randint(0, V, (B, L), generator=g)
        cond = torch.randint(0, 3, (B,), generator=g)
        model = _tiny_model(spec, pos=pos, seed=seed)
        _attach_tiny_auxiliary(gen, spec, pos=pos, seed=seed)

        # the teacher-forcing batch
        batch = _seeded_batch(gen, codes, cond, seed)
        T = batch.inputs.shape[1]
        assert T <= spec.seq_len, f"{name}: training sequence {T} longer than spec.seq_len {spec.seq_len}"
        assert batch.targets.shape[:2] == (B, T) and batch.loss_mask.shape[:2] == (B, T), (
            f"{name}: targets/loss_mask must be [B, T] like inputs {tuple(batch.inputs.shape)}")
        assert batch.loss_mask.dtype == torch.bool and batch.loss_mask.any(), f"{name}: empty or non-bool loss_mask"
        tm = batch.targets[batch.loss_mask]
        assert tm.min() >= 0 and tm.max() < max(spec.heads), f"{name}: targets outside the head vocabulary"
        if spec.input_kind == "tokens":
            assert batch.inputs.min() >= 0 and batch.inputs.max() < spec.vocab_size, f"{name}: input ids out of range"

        # no leak: the logits that predict code j do not see code j
        j = int(torch.randint(0, L, (1,), generator=g))
        other = codes.clone()
        other[:, j] = (codes[:, j] + 1 + torch.randint(0, max(V - 1, 1), (B,), generator=g)) % V
        batch2 = _seeded_batch(gen, other, cond, seed)
        assert torch.equal(batch.loss_mask, batch2.loss_mask), f"{name}: loss_mask depends on the code values"
        changed = (batch.targets != batch2.targets) & batch.loss_mask
        if changed.dim() == 2:
            changed = changed[..., None]  # (B, T, 1): the one head
        if changed.any():  # per head: a head may see code j when another head at the same index predicts it
            a, b = _logits_of(model, batch), _logits_of(model, batch2)  # (B, T, n_heads, V)
            diff = (a - b).abs()[changed].max().item()
            assert diff <= 1e-5, (
                f"{name}: the training mask leaks: changing code {j} changes the logits that predict it by {diff:.3g}")

        # generation: shapes, NFE, determinism, batch independence
        sampler = chain(kind)
        sampler.bind(SamplerContext(vocab_size=V, code_embeddings=tok.code_embeddings(),
                                    token_embeddings=model.token_embeddings()))
        model.reset()
        out = gen.generate(model, sampler, cond, rng=RowRNG(seed, torch.arange(B)))
        assert isinstance(out, torch.Tensor) and out.dtype == torch.long and tuple(out.shape) == (B, L), (
            f"{name}: generate must return LongTensor[{B}, {L}], got {getattr(out, 'dtype', None)} "
            f"{tuple(getattr(out, 'shape', ()))}")
        assert out.min() >= 0 and out.max() < V, f"{name}: generated codes outside [0, {V})"
        expected = gen.expected_nfe()
        if expected is not None:
            assert model.nfe == expected, f"{name}: {model.nfe} forward passes, expected_nfe() says {expected}"
        again = gen.generate(model, sampler, cond, rng=RowRNG(seed, torch.arange(B)))
        assert torch.equal(out, again), f"{name}: the same seed gave different codes"
        i = int(torch.randint(0, B, (1,), generator=g))
        alone = gen.generate(model, sampler, cond[i : i + 1], rng=RowRNG(seed, [i]))
        assert torch.equal(alone[0], out[i]), f"{name}: image {i} differs when generated alone vs in a batch"

        if getattr(gen, "supports_known", False):
            mask = torch.rand(B, L, generator=g) < 0.5
            got = gen.generate(model, sampler, cond, rng=RowRNG(seed, torch.arange(B)), known=Known(codes, mask))
            assert torch.equal(got[mask], codes[mask]), f"{name}: inpainting changed a known token"

        if getattr(gen, "exact_likelihood", False):
            ll = gen.log_likelihood(model, codes, cond)
            assert tuple(ll.shape) == (B,) and torch.isfinite(ll).all() and (ll <= 1e-4).all(), (
                f"{name}: log_likelihood must be finite log-probabilities [B], got {ll}")

    properties()

    if getattr(registry.get("generator", name).cls, "exact_likelihood", False) and tokenizer is None:
        # an exact likelihood sums to one over every sequence (V = 2, L = 6: 64 sequences)
        tok, gen = make("pixel", {"bits": 1, "image_shape": (1, 2, 3)})
        L, V = tok.layout.length, tok.vocab_size
        model = _tiny_model(gen.model_spec(), pos="rope2d", seed=1)
        every = torch.cartesian_prod(*[torch.arange(V)] * L).reshape(-1, L)
        for c in (0, 3):
            total = torch.logsumexp(gen.log_likelihood(model, every, torch.full((every.shape[0],), c)).double(), 0)
            assert abs(total.item()) < 1e-4, f"{name}: exp(log_likelihood) sums to {total.exp().item():.6f} over all codes"


CHECKS["generator"] = check_generator


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------

METRIC_REQUIRES = frozenset({"real", "generated", "codes", "reconstructed", "stats", "tokenizer", "model",
                             "generator", "data"})


def metric_context(image_shape=(3, 16, 16), n: int = 24, seed: int = 0) -> Any:
    """A small synthetic :class:`~tokenloom.MetricContext`: ``n`` real and
    generated images, a reconstruction, labels, random codes of a stand-in
    tokenizer (16 codes, 4×4 grid) and every run statistic core records."""
    from .contract.interfaces import MetricContext, TokenLayout

    class _StandInTokenizer:
        vocab_size = 16
        layout = TokenLayout(scales=((4, 4),))

        def __init__(self, shape):
            self.image_shape = tuple(shape)

    g = torch.Generator().manual_seed(seed)
    real = random_images(n, image_shape, seed)
    generated = random_images(n, image_shape, seed + 1)
    noise = 0.1 * torch.randn(real.shape, generator=g)
    stats = {"nfe": 16.0, "seconds_per_image": 0.01, "tokens_per_second": 1600.0, "peak_memory_bytes": 1e6,
             "kv_cache_bytes": 4096.0, "train_tokens": 1e5, "train_flops": 1e9}
    return MetricContext(
        real=real, generated=generated, real_labels=torch.arange(n) % 3, generated_labels=torch.arange(n) % 3,
        codes=torch.randint(0, 16, (n, 16), generator=g), reconstructed=(real + noise).clamp(-1, 1),
        stats=stats, tokenizer=_StandInTokenizer(image_shape), seed=seed,
    )


def check_metric(name: str, *, registry: Any = None, context: Any = None, image_shape=(3, 16, 16),
                 **config: Any) -> None:
    """A metric declares what it reads in ``requires``; ``compute`` returns
    ``{str: finite float or None}``, is deterministic and leaves the context
    unchanged; ``eval_card()`` is plain JSON (before and after compute) and
    deterministic; NaN or out-of-range images it requires are a clear
    :class:`~tokenloom.errors.InputError`. ``context``: a
    :class:`~tokenloom.MetricContext` to use instead of :func:`metric_context`."""
    import copy
    import json
    import math

    from .contract.registry import build_component, get_registry

    registry = registry or get_registry()
    metric = build_component(registry, "metric", name, dict(config), path=f"metrics.{name}")
    requires = getattr(metric, "requires", None)
    assert isinstance(requires, frozenset) and requires <= METRIC_REQUIRES, (
        f"{name}: requires must be a frozenset of {sorted(METRIC_REQUIRES)}, got {requires!r}")
    json.dumps(metric.eval_card())
    ctx = context if context is not None else metric_context(image_shape)
    before = copy.deepcopy({k: v for k, v in attrs.asdict(ctx, recurse=False).items()
                            if isinstance(v, (torch.Tensor, dict))})

    def run() -> dict[str, Any]:
        out = metric.compute(ctx)
        assert hasattr(out, "items"), f"{name}: compute must return a mapping, got {type(out).__name__}"
        out = dict(out)
        for k, v in out.items():
            assert isinstance(k, str), f"{name}: key {k!r} is not a string"
            assert v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)), (
                f"{name}: {k} = {v!r} — values must be finite floats or None (not applicable)")
        return out

    first = run()
    assert first, f"{name}: compute returned no keys"
    card = metric.eval_card()
    try:
        text = json.dumps(card, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise AssertionError(f"{name}: eval_card() is not JSON-serialisable: {exc}") from None
    second = run()
    assert first == second, f"{name}: compute is not deterministic: {first} != {second}"
    assert json.dumps(metric.eval_card(), sort_keys=True) == text, f"{name}: eval_card() changed between runs"
    for k, v in before.items():
        now = getattr(ctx, k)
        same = torch.equal(now, v) if isinstance(v, torch.Tensor) else now == v
        assert same, f"{name}: compute modified ctx.{k}"

    for field in ("generated", "real", "reconstructed"):
        if field in requires and isinstance(getattr(ctx, field), torch.Tensor):
            bad = getattr(ctx, field).clone()
            bad[0, 0, 0, 0] = float("nan")
            _expect_error(f"{name}.compute(NaN in ctx.{field})",
                          lambda field=field, bad=bad: metric.compute(attrs.evolve(ctx, **{field: bad})))
            _expect_error(f"{name}.compute(ctx.{field} in [0, 255])",
                          lambda field=field: metric.compute(
                              attrs.evolve(ctx, **{field: (getattr(ctx, field) + 1) * 127.5})))


CHECKS["metric"] = check_metric


def check(kind: str, name: str, **config: Any) -> None:
    """Run the conformance properties of ``kind`` on the component ``name``
    built with ``config``; raises ``AssertionError`` on the first violation."""
    from .contract.registry import Registry

    kind = Registry.check_kind(kind)
    if kind not in CHECKS:
        raise NotImplementedError(f"no conformance properties for kind {kind!r} yet")
    CHECKS[kind](name, **config)
