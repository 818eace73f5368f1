"""Metric properties: values and eval cards, clear errors, an applicable
context gives a number, ``requires`` is enforced, distortion moves the score."""

from __future__ import annotations

import math
from typing import Any

import attrs
import torch

from ..contract.errors import TokenloomError
from .common import _expect_error, _kit_registry, random_images

#: Mixing weights of the metric distortion property: ``(1 - t) * real + t * noise``.
DISTORTIONS = (0.0, 0.2, 0.5, 1.0)

METRIC_REQUIRES = frozenset({"real", "generated", "codes", "reconstructed", "stats", "tokenizer", "model",
                             "generator", "data"})


def metric_context(image_shape=(3, 16, 16), n: int = 24, seed: int = 0) -> Any:
    """A small synthetic :class:`~tokenloom.MetricContext` that provides every
    field a metric may require: ``n`` real and generated images (held-out and
    training images of the ``shapes`` data set, with ``data`` set, for RGB
    square images of at least 16 px; smooth random images otherwise), a
    reconstruction, labels, random codes of a stand-in tokenizer (16 codes,
    4×4 grid), a tiny untrained ``raster`` model and generator over it, and
    every run statistic core records (speculative decoding's included)."""
    from ..backbone.model import InstrumentedModel, build_model
    from ..contract.config import ModelConfig
    from ..contract.interfaces import MetricContext, TokenLayout
    from ..contract.registry import build_component

    class _StandInTokenizer:
        vocab_size = 16
        layout = TokenLayout(scales=((4, 4),))

        def __init__(self, shape):
            self.image_shape = tuple(shape)

    g = torch.Generator().manual_seed(seed)
    c, h, w = image_shape
    data = None
    if c == 3 and h == w and h >= 16:
        from ..blocks.data import load_dataset
        from ..contract.config import DataConfig

        data = load_dataset(DataConfig(name="shapes", size=h, n=n, n_holdout=n), split="holdout", seed=seed)
        real, real_labels = data.images[:n].contiguous(), data.labels[:n]
        train = load_dataset(DataConfig(name="shapes", size=h, n=n, n_holdout=n), split="train", seed=seed)
        generated, generated_labels = train.images[:n].contiguous(), train.labels[:n]
    else:
        real, real_labels = random_images(n, image_shape, seed), torch.arange(n) % 3
        generated, generated_labels = random_images(n, image_shape, seed + 1), torch.arange(n) % 3
    noise = 0.1 * torch.randn(real.shape, generator=g)
    stats = {"nfe": 16.0, "seconds_per_image": 0.01, "tokens_per_second": 1600.0, "peak_memory_bytes": 1e6,
             "kv_cache_bytes": 4096.0, "train_tokens": 1e5, "train_flops": 1e9, "acceptance_rate": 0.6,
             "mean_accepted_length": 1.8, "speedup_nfe": 1.5, "speedup_wallclock": 1.2}
    tok = _StandInTokenizer(image_shape)
    generator = build_component(_kit_registry(), "generator", "raster", {"tokenizer": tok}, path="generator")
    model = InstrumentedModel(build_model(generator.model_spec(), ModelConfig(n_layer=1, d_model=16, n_head=2),
                                          n_classes=3, seed=seed).eval())
    return MetricContext(
        real=real, generated=generated, real_labels=real_labels, generated_labels=generated_labels,
        codes=torch.randint(0, 16, (n, 16), generator=g), reconstructed=(real + noise).clamp(-1, 1),
        stats=stats, tokenizer=tok, model=model, generator=generator, data=data, seed=seed,
    )


def check_metric(name: str, *, registry: Any = None, context: Any = None, image_shape=(3, 16, 16),
                 **config: Any) -> None:
    """A metric declares what it reads in ``requires``; ``compute`` returns a
    :class:`~tokenloom.MetricResult` (a metric of the first contract — a plain
    mapping and ``eval_card()`` — is read through :func:`tokenloom.evalcard.evaluate`,
    as a run reads it) whose values are ``{str: finite float or None}``, is
    deterministic and leaves the context unchanged; its eval card is plain JSON
    and deterministic; NaN or out-of-range images it requires are a clear
    :class:`~tokenloom.errors.InputError`. Meaning: on the kit's context
    (which provides every field) some value is a number; a context without a
    required field is an InputError or a result, never a crash; for every key
    with a direction (:func:`tokenloom.reports.direction`) computed from
    ``real`` against ``generated`` or ``reconstructed``, identical images score
    best and mixing them towards noise (:data:`DISTORTIONS`) never improves
    the score, and moves at least one. ``context``: a
    :class:`~tokenloom.MetricContext` to use instead of :func:`metric_context`
    (then the "gives a number" property is not checked)."""
    import copy
    import json

    from ..contract.errors import PluginError
    from ..contract.registry import build_component, get_registry
    from ..evaluation.evalcard import evaluate

    registry = registry or get_registry()
    metric = build_component(registry, "metric", name, dict(config), path=f"metrics.{name}")
    requires = getattr(metric, "requires", None)
    assert isinstance(requires, frozenset) and requires <= METRIC_REQUIRES, (
        f"{name}: requires must be a frozenset of {sorted(METRIC_REQUIRES)}, got {requires!r}")
    ctx = context if context is not None else metric_context(image_shape)
    before = copy.deepcopy({k: v for k, v in attrs.asdict(ctx, recurse=False).items()
                            if isinstance(v, (torch.Tensor, dict))})

    def run() -> tuple[dict[str, Any], str]:
        try:
            result = evaluate(metric, ctx)
        except PluginError as exc:
            raise AssertionError(f"{name}: {exc}") from None
        out = dict(result.values)
        for k, v in out.items():
            assert isinstance(k, str), f"{name}: key {k!r} is not a string"
            assert v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)), (
                f"{name}: {k} = {v!r} — values must be finite floats or None (not applicable)")
        try:
            card = json.dumps(result.card, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise AssertionError(f"{name}: the eval card is not JSON-serialisable: {exc}") from None
        return out, card

    first, text = run()
    assert first, f"{name}: compute returned no keys"
    second, text_again = run()
    assert first == second, f"{name}: compute is not deterministic: {first} != {second}"
    assert text_again == text, f"{name}: the eval card changed between runs"
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

    # -- meaning -------------------------------------------------------------
    def values(c: Any) -> dict[str, Any]:
        try:
            return dict(evaluate(metric, c).values)
        except PluginError as exc:
            raise AssertionError(f"{name}: {exc}") from None

    # an applicable context gives a number
    if context is None:
        assert any(v is not None for v in first.values()), (
            f"{name}: every value is None on the kit's context, which provides every field the metric requires "
            f"({sorted(requires)}) — a metric reports a number when it applies")

    # `requires` is enforced: a context without a required field is a clear InputError, or a result
    # (e.g. every value None: not applicable) — never a crash
    for field in sorted(requires):
        missing = attrs.evolve(ctx, **{field: {} if field == "stats" else None})
        try:
            values(missing)
        except TokenloomError:
            continue
        except Exception as exc:
            raise AssertionError(
                f"{name}: a context without ctx.{field} (which it requires) raised {type(exc).__name__}: {exc} — "
                "expected a clear tokenloom.InputError") from exc

    # identical sets score best; a growing distortion moves the score monotonically the wrong way
    pairs = [(f, "real") for f in ("generated", "reconstructed") if {f, "real"} <= requires]
    real = ctx.real
    for field, _ in pairs:
        if not isinstance(real, torch.Tensor) or not len(real):
            break
        from ..running.reports import direction

        g = torch.Generator().manual_seed(4321)
        noise = torch.rand(real.shape, generator=g) * 2 - 1
        extra = {"generated_labels": ctx.real_labels} if field == "generated" else {}
        scores = []
        for t in DISTORTIONS:
            distorted = ((1 - t) * real + t * noise).clamp(-1, 1).contiguous()
            scores.append(values(attrs.evolve(ctx, **{field: distorted}, **extra)))
        moved: list[str] = []
        still: dict[str, list] = {}
        for key, best in scores[0].items():
            way = direction(key)
            if way is None or best is None or any(s.get(key) is None for s in scores):
                continue
            sign = 1.0 if way == "lower" else -1.0  # badness = sign * score
            bad = [sign * float(s[key]) for s in scores]
            slack = 1e-6 * max(1.0, max(abs(b) for b in bad))
            steps = [(DISTORTIONS[i], DISTORTIONS[i + 1]) for i in range(len(bad) - 1) if bad[i + 1] < bad[i] - slack]
            assert not steps, (
                f"{name}: {key} ({way} is better) gets better as ctx.{field} moves from ctx.real towards noise "
                f"(mixing weights {steps[0]}): {[s[key] for s in scores]}")
            if bad[-1] > bad[0] + slack:
                moved.append(key)
            else:
                still[key] = [s[key] for s in scores]
        assert moved or not still, (
            f"{name}: no score moves when ctx.{field} goes from a copy of ctx.real to noise "
            f"(mixing weights {DISTORTIONS}): {still}")
