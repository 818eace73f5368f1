"""The conformance kit: the plugin contract as properties of shape *and* meaning.

A third party checks their plugin from their own pytest suite::

    import tokenloom.testing

    def test_my_tokenizer_honours_the_contract():
        tokenloom.testing.check("tokenizer", "mytok", bits=3)

``check(kind, name, **config)`` builds the component through the registry
(exactly as a config file would), runs every property for that kind, and
raises ``AssertionError`` describing the first violation. tokenloom's own
test suite runs it over every registered component, so a plugin is tested the
moment it is registered. The kit needs ``hypothesis`` (a development
dependency, ``pip install 'tokenloom[dev]'``); it is imported when a check
runs, not with this module.

What is checked besides shapes, types, determinism and clear errors:

- tokenizers: after a brief fit on the kit's blocky images
  (:func:`blocky_images`), decode(encode(x)) is far closer to x than the best
  constant image (``recon_bound`` × its error); non-square images (H×W/2 and
  H/2×W, where the config allows them) pass the same properties; a
  ``cell_local`` tokenizer lays its grid out along H and W and changing one
  patch changes only the codes of its cell (and those codes decode only to
  that patch);
- samplers: what ``Sampler.transform`` declares — a truncation keeps the
  largest logit and leaves the kept ones unchanged, a rescale multiplies a
  row by a positive number, guidance of identical conditional and
  unconditional logits is the identity; acceptance rules: drafting from q,
  accepting, else resampling from the residual gives exactly p on small
  enumerable cases; a relaxed rule is exact at its ``exact_settings`` and
  never accepts a draft with more probability than the target mass of its
  declared ``neighbourhood``;
- generators with an exact likelihood: the log-probabilities of the drawn
  codes under the logits handed to the sampler chain during decoding equal
  ``log_likelihood`` of the generated codes (one teacher-forced pass), and
  samples of a tiny, peaked model over a tiny layout agree with
  ``exp(log_likelihood)`` by a chi-square test;
- metrics: a context providing what ``requires`` names gives a number; a
  context missing a required field is an :class:`~tokenloom.errors.InputError`;
  for keys with a direction (better lower or higher) computed from real
  images against generated or reconstructed ones, identical sets score best
  and a growing distortion moves the score monotonically the wrong way.

Keyword arguments besides the component's config:

- ``image_shape=(C, H, W)`` for tokenizers (default ``(3, 16, 16)``);
- ``fit_steps=N``: optimiser steps to fit a trainable tokenizer before the
  shape properties run (default 2: the contract must hold for any weights);
- ``recon_steps=N`` (default 100) and ``recon_bound=r`` (default 0.6): the
  brief fit of the reconstruction property and the bound on the ratio of its
  error to the best constant image's;
- ``max_examples=N``: hypothesis examples per property (default 20);
- ``context=MetricContext(...)`` for metrics (default: :func:`metric_context`,
  small synthetic images, codes and run statistics);
- ``registry=``: the :class:`~tokenloom.registry.Registry` to build the
  component from (default: the process-wide one). The helper components the
  kit builds itself (the ``pixel`` tokenizer of the generator properties,
  the samplers of its chains) always come from tokenloom's own plugins, so
  installed third-party plugins cannot change a check's outcome.
"""

from __future__ import annotations

import functools
import importlib
import math
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import torch

from .contract.errors import TokenloomError
from .contract.interfaces import AcceptanceRule, SamplerContext, StepInfo

CHECKS: dict[str, Callable[..., None]] = {}


def _hypothesis() -> tuple[Any, Any]:
    """``(hypothesis, hypothesis.strategies)``, or an ImportError that names
    the missing development dependency."""
    try:
        import hypothesis
        from hypothesis import strategies
    except ImportError as exc:
        raise ImportError(
            "tokenloom.testing needs 'hypothesis', a development dependency of tokenloom: "
            "pip install 'tokenloom[dev]' (or pip install 'hypothesis>=6.90')"
        ) from exc
    return hypothesis, strategies


def _settings(max_examples: int):
    hypothesis, _ = _hypothesis()
    return hypothesis.settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(hypothesis.HealthCheck),
    )


def _given(**strategies: Any):
    return _hypothesis()[0].given(**strategies)


#: The built-in plugin modules the kit builds its helper components from.
_KIT_PLUGINS = {
    "pixel": "tokenloom.plugins.tokenizers.pixel",
    "top-k": "tokenloom.plugins.samplers.top_k",
    "cfg": "tokenloom.plugins.samplers.cfg",
    "temperature": "tokenloom.plugins.samplers.temperature",
    "raster": "tokenloom.plugins.generators.raster",
}


@functools.cache
def _kit_registry() -> Any:
    """A registry of the few built-in components the kit itself uses, built
    from tokenloom's own plugin modules (never from what happens to be installed)."""
    from .contract.registry import Registry

    return Registry.from_plugins([(n, importlib.import_module(m)) for n, m in _KIT_PLUGINS.items()],
                                 dist="tokenloom", strict=True)


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


def blocky_images(n: int, image_shape: tuple[int, int, int], seed: int,
                  block: tuple[int, int] = (4, 4)) -> torch.Tensor:
    """Piecewise-constant images in [-1, 1]: blocks of ``block`` = ``(bh, bw)``
    pixels (capped to the image), each painted one of four grey levels
    (-1, -1/3, 1/3, 1 in every channel: even a one-bit or luminance-only
    tokenizer can tell them apart), deterministic in ``seed``. With the blocks
    of a tokenizer's token cells, every tokenizer should reconstruct them far
    better than a constant image after a brief fit."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = image_shape
    bh, bw = max(1, min(block[0], h)), max(1, min(block[1], w))
    levels = torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0])
    idx = torch.randint(0, 4, (n, 1, -(-h // bh), -(-w // bw)), generator=g)
    x = levels[idx].expand(n, c, -1, -1).repeat_interleave(bh, 2).repeat_interleave(bw, 3)
    return x[:, :, :h, :w].contiguous()


def _cell(tok: Any, image_shape: tuple[int, int, int]) -> tuple[int, int]:
    """The pixels of one token cell of the finest grid (4×4 when the grid does not tile the image)."""
    _, h, w = image_shape
    gh, gw = tok.layout.grid
    return (h // gh, w // gw) if h % gh == 0 and w % gw == 0 and gh > 1 and gw > 1 else (4, 4)


def _fit_quietly(tok: Any, images: torch.Tensor, steps: int, name: str) -> dict:
    stats = tok.fit(images, steps=steps, progress=False)
    assert isinstance(stats, dict), f"{name}: fit() must return a dict, got {type(stats).__name__}"
    tok.eval()
    return stats


def _shape_contract(tok: Any, name: str, image_shape: tuple[int, int, int], max_examples: int) -> None:
    """encode/decode shapes, ranges, determinism and batch independence."""
    _, st = _hypothesis()
    layout, V = tok.layout, tok.vocab_size
    L = layout.length
    c, h, w = image_shape
    where = f"{name} at {c}×{h}×{w}"

    @_settings(max_examples)
    @_given(n=st.integers(1, 4), seed=st.integers(0, 2**16))
    def encode_decode(n: int, seed: int) -> None:
        x = random_images(n, image_shape, seed)
        with torch.no_grad():
            codes = tok.encode(x)
            assert codes.dtype == torch.long, f"{where}: encode must return int64 codes, got {codes.dtype}"
            assert tuple(codes.shape) == (n, L), (
                f"{where}: encode shape {tuple(codes.shape)} != {(n, L)} from the layout")
            assert codes.min() >= 0 and codes.max() < V, f"{where}: codes outside [0, {V})"
            again = tok.encode(x)
            assert torch.equal(codes, again), f"{where}: encode is not deterministic in eval mode"
            singles = torch.cat([tok.encode(x[i : i + 1]) for i in range(n)])
            assert torch.equal(codes, singles), f"{where}: a batch encodes differently from its images one by one"
            y = tok.decode(codes)
            assert y.dtype == torch.float32 and tuple(y.shape) == (n, c, h, w), (
                f"{where}: decode must return float32 {(n, c, h, w)}, got {y.dtype} {tuple(y.shape)}"
            )
            assert torch.isfinite(y).all() and y.min() >= -1 - 1e-5 and y.max() <= 1 + 1e-5, (
                f"{where}: decoded images outside [-1, 1]"
            )

    @_settings(max_examples)
    @_given(n=st.integers(1, 3), seed=st.integers(0, 2**16))
    def decode_any_codes(n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        codes = torch.randint(0, V, (n, L), generator=g)
        with torch.no_grad():
            y = tok.decode(codes)
            assert tuple(y.shape) == (n, c, h, w) and torch.isfinite(y).all(), f"{where}: decode of valid codes failed"
            assert y.min() >= -1 - 1e-5 and y.max() <= 1 + 1e-5, f"{where}: decoded images outside [-1, 1]"
            assert torch.equal(tok.decode(codes[:1]), y[:1]), f"{where}: decode of a batch differs from one by one"

    encode_decode()
    decode_any_codes()


def _reconstruction(tok: Any, name: str, image_shape: tuple[int, int, int], steps: int, bound: float) -> float:
    """Fit briefly on blocky images, then the error of decode(encode(x)) on
    other blocky images must be at most ``bound`` times that of the best
    constant image (each image's per-channel mean). Returns the ratio."""
    c, h, w = image_shape
    block = _cell(tok, image_shape)
    if steps > 0:
        _fit_quietly(tok, blocky_images(64, image_shape, seed=101, block=block), steps, name)
    tok.eval()
    x = blocky_images(16, image_shape, seed=202, block=block)
    with torch.no_grad():
        y = tok.decode(tok.encode(x))
    err = float(((y - x) ** 2).mean())
    constant = float(((x - x.mean((2, 3), keepdim=True)) ** 2).mean())
    ratio = err / constant
    assert ratio <= bound, (
        f"{name} at {c}×{h}×{w}: after a brief fit on blocky images ({steps} steps here), decode(encode(x)) has mean squared "
        f"error {err:.4g}, {ratio:.2f}× that of the best constant image ({constant:.4g}); the kit's bound is "
        f"{bound}× — encode/decode do not carry the image (a layout mix-up, a constant decoder?)")
    return ratio


def _locality(tok: Any, name: str, image_shape: tuple[int, int, int]) -> None:
    """A ``cell_local`` tokenizer: one grid laid out along H and W; changing
    one patch changes only the codes of its cell, and changing a cell's codes
    changes only its patch of the decoded image."""
    c, h, w = image_shape
    where = f"{name} at {c}×{h}×{w} (cell_local)"
    layout = tok.layout
    assert layout.n_scales == 1, f"{where}: a cell-local tokenizer has one grid, got scales {layout.scales}"
    gh, gw = layout.grid
    assert h * gw == w * gh and h % gh == 0 and w % gw == 0, (
        f"{where}: the grid {gh}×{gw} does not follow the image's H×W = {h}×{w} (rows and columns swapped?)")
    ph, pw, D = h // gh, w // gw, layout.depth
    x = blocky_images(2, image_shape, seed=303, block=(ph, pw))
    with torch.no_grad():
        codes = tok.encode(x)
        base = tok.decode(codes)
    cells = {(0, gw - 1), (gh - 1, 0), (gh // 2, (gw - 1) // 3), (gh - 1, gw - 1)}
    for r, col in sorted(cells):
        y = x.clone()
        y[:, :, r * ph : (r + 1) * ph, col * pw : (col + 1) * pw] *= -1  # every value changes sign
        with torch.no_grad():
            other = tok.encode(y)
        changed = (other != codes).reshape(2, gh, gw, D).any(-1).any(0)
        outside = changed.clone()
        outside[r, col] = False
        assert not outside.any(), (
            f"{where}: changing the patch of cell ({r}, {col}) changed the codes of cells "
            f"{[tuple(i) for i in outside.nonzero().tolist()][:4]} (code i must belong to cell (i // w, i % w))")
        assert changed[r, col], f"{where}: changing the patch of cell ({r}, {col}) did not change its codes"
        with torch.no_grad():
            diff = (tok.decode(other) - base).abs().sum((0, 1))  # (H, W)
        diff[r * ph : (r + 1) * ph, col * pw : (col + 1) * pw] = 0
        assert not diff.any(), (
            f"{where}: the codes of cell ({r}, {col}) decode outside its patch, e.g. at pixel "
            f"{tuple(diff.nonzero()[0].tolist())}")


def _non_square_shapes(image_shape: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    c, h, w = image_shape
    return [s for s in ((c, h, w // 2), (c, h // 2, w)) if s[1] >= 1 and s[2] >= 1 and s[1] != s[2]]


def check_tokenizer(name: str, *, registry: Any = None, image_shape=(3, 16, 16), fit_steps: int = 2,
                    recon_steps: int = 100, recon_bound: float = 0.6, max_examples: int = 20,
                    **config: Any) -> None:
    """Tokenizer properties at ``image_shape`` and at the non-square shapes
    H×W/2 and H/2×W (skipped for a shape the config rejects with a
    ConfigError): shapes and ranges of encode/decode, determinism, batch
    independence, the reconstruction bound, locality for ``cell_local``
    tokenizers, ``code_embeddings()``, save -> load, and clear errors."""
    from .contract.checkpoint import load_component, save_tokenizer
    from .contract.errors import ConfigError
    from .contract.registry import build_component, get_registry

    registry = registry or get_registry()
    image_shape = tuple(image_shape)

    def build(shape: tuple[int, int, int]) -> Any:
        return build_component(registry, "tokenizer", name, {**config, "image_shape": shape}, path="tokenizer")

    tok = build(image_shape)
    layout, V = tok.layout, tok.vocab_size
    assert isinstance(V, int) and V >= 1, f"{name}: vocab_size must be a positive int, got {V!r}"
    L = layout.length
    _fit_quietly(tok, random_images(32, image_shape, seed=1234), fit_steps, name)
    c, h, w = image_shape
    cell_local = bool(getattr(tok, "cell_local", False))

    emb = tok.code_embeddings()
    assert isinstance(emb, torch.Tensor) and emb.dim() == 2 and emb.shape[0] == V, (
        f"{name}: code_embeddings() must be [V={V}, D], got {tuple(getattr(emb, 'shape', ()))}"
    )
    assert emb.dtype.is_floating_point and torch.isfinite(emb).all(), f"{name}: code_embeddings() not finite floats"

    _shape_contract(tok, name, image_shape, max_examples)
    if cell_local:
        _locality(tok, name, image_shape)

    # meaning: a fresh tokenizer, fitted briefly, reconstructs the kit's blocky images
    fitted = build(image_shape)
    _reconstruction(fitted, name, image_shape, recon_steps, recon_bound)
    # the same at non-square shapes: the layout must follow H and W
    gh, gw = layout.grid
    cell = (h // gh, w // gw) if gh > 1 and gw > 1 and h % gh == 0 and w % gw == 0 and h // gh == w // gw else None
    for shape in _non_square_shapes(image_shape):
        try:
            other = build(shape)
        except ConfigError:
            continue  # the config does not allow this shape (e.g. a square token grid)
        if cell and other.layout.n_scales == layout.n_scales:  # square cells of p×p pixels at H×W: here too
            expect = (shape[1] // cell[0], shape[2] // cell[1])
            assert tuple(other.layout.grid) == expect, (
                f"{name}: at {c}×{h}×{w} its grid {layout.grid} has cells of {cell[0]}×{cell[1]} pixels, but at "
                f"{shape[0]}×{shape[1]}×{shape[2]} its grid is {other.layout.grid}, not {expect} — the layout "
                "does not follow H and W")
        _fit_quietly(other, random_images(32, shape, seed=1234), fit_steps, name)
        _shape_contract(other, name, shape, max(2, max_examples // 4))
        if cell_local:
            _locality(other, name, shape)
        again = build(shape)
        try:  # a convolutional tokenizer's weights fit any image size: reuse the square fit
            again.load_state_dict(fitted.state_dict())
            steps = 0
        except (RuntimeError, ValueError, KeyError):
            steps = recon_steps
        _reconstruction(again, name, shape, steps, recon_bound)

    # save -> load gives identical codes
    x = random_images(3, image_shape, seed=7)
    with torch.no_grad():
        codes = tok.encode(x)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "tok.safetensors"
        save_tokenizer(path, tok, name=name, options=dict(config))
        loaded = load_component(path, registry=registry)
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


def _exact_outcome(rule: Any, p: torch.Tensor, q: torch.Tensor, n_u: int) -> tuple[torch.Tensor, torch.Tensor]:
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


def _acceptance_cases(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
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


def _bind_rule(rule: Any, V: int, seed: int) -> None:
    g = torch.Generator().manual_seed(1000 + seed + V)
    # token embeddings at the scale of a small model's (std 0.2): close enough for GSD's default groups
    rule.bind(SamplerContext(vocab_size=V, code_embeddings=torch.randn(V, 3, generator=g),
                             token_embeddings=0.2 * torch.randn(V, 4, generator=g)))


def check_acceptance(name: str, rule: Any, *, n_u: int = 2000) -> None:
    """The meaning of an acceptance rule on small enumerable cases (see the
    module docstring): exact, or exact at ``exact_settings`` and bounded by its
    ``neighbourhood``."""
    from .blocks.sampling import speculative_residual

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
    for i, (p, q) in enumerate(_acceptance_cases()):
        V = p.shape[0]
        _bind_rule(exact, V, i)
        out, _ = _exact_outcome(exact, p, q, n_u)
        gap = (out - p.double()).abs().max().item()
        assert gap <= tol, (
            f"{name}{off}: drafting from q, accepting, else resampling from the residual does not give p "
            f"(V = {V}, case {i}): p = {[round(v, 4) for v in p.tolist()]}, q = {[round(v, 4) for v in q.tolist()]}, "
            f"output = {[round(v, 4) for v in out.tolist()]}")
        if relaxed is None:
            continue
        _bind_rule(rule, V, i)
        _, a = _exact_outcome(rule, p, q, n_u)
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
    from .contract.registry import build_component, get_registry

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


CHECKS["sampler"] = check_sampler


# ---------------------------------------------------------------------------
# Generators
# ---------------------------------------------------------------------------


def _tiny_model(spec: Any, *, pos: str = "learned", n_classes: int = 3, seed: int = 0) -> Any:
    from .backbone.instrumented import InstrumentedModel
    from .backbone.model import build_model
    from .contract.config import ModelConfig

    return InstrumentedModel(build_model(spec, ModelConfig(n_layer=2, d_model=16, n_head=2, pos=pos),
                                         n_classes=n_classes, seed=seed).eval())


def _attach_tiny_auxiliary(gen: Any, spec: Any, *, pos: str, seed: int) -> None:
    """Untrained auxiliary models (e.g. a speculative draft) for a generator
    that asks for them, sized from the tiny target's config."""
    from .backbone.instrumented import InstrumentedModel
    from .backbone.model import build_model
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


def _recording_chain(samplers: list) -> Any:
    from .blocks.sampling import SamplerChain

    class RecordingChain(SamplerChain):
        def __init__(self, procs: list) -> None:
            super().__init__(procs)
            self.pending: list[torch.Tensor] = []
            self.logp: list[torch.Tensor] = []  # per draw: log p of the drawn codes, (B,) or (B, k)
            self.calls = 0
            self.inside = False

        def _recorded(self, call: Callable, logits: torch.Tensor, info: StepInfo | None) -> torch.Tensor:
            if self.inside:  # process() and __call__ may be implemented through each other
                return call(logits, info)
            self.inside = True
            try:
                self.calls += 1
                self.pending.append(logits.detach().double().clone())
                return call(logits, info)
            finally:
                self.inside = False

        def __call__(self, logits: torch.Tensor, info: StepInfo | None = None) -> torch.Tensor:
            return self._recorded(super().__call__, logits, info)

        def process(self, logits: torch.Tensor, info: StepInfo | None = None) -> torch.Tensor:
            return self._recorded(getattr(super(), "process", super().__call__), logits, info)

        def draw(self, processed: torch.Tensor, rng: Any, step: int, *, stream: int = 0) -> torch.Tensor:
            tokens = super().draw(processed, rng, step, stream=stream)
            if self.pending:
                raw = self.pending.pop()
                if raw.shape[:-1] == tokens.shape:
                    self.logp.append(torch.log_softmax(raw, -1).gather(-1, tokens[..., None].to(raw.device))[..., 0])
            return tokens

        def decode_log_likelihood(self, B: int, L: int) -> torch.Tensor | None:
            """Sum of the recorded log-probabilities per row, or None when the
            loop did not draw each of the ``L`` codes exactly once through
            ``chain(logits)`` then ``chain.draw`` (speculative loops)."""
            if self.pending or len(self.logp) == 0 or self.calls != len(self.logp):
                return None
            per_row = [lp.reshape(B, -1) for lp in self.logp if lp.numel() % B == 0]
            if len(per_row) != len(self.logp) or sum(x.shape[1] for x in per_row) != L:
                return None
            return torch.cat(per_row, 1).sum(1)

    return RecordingChain(samplers)


def _peaked(model: Any, scale: float = 20.0) -> Any:
    """Scale the output heads of a tiny untrained model so that its
    conditionals are far from uniform (the chi-square test then has teeth)."""
    inner = getattr(model, "model", model)
    with torch.no_grad():
        for p in inner.heads.parameters():
            p.mul_(scale)
    return model


def chi_square_pvalue(samples: torch.Tensor, every: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square p-value of ``samples`` (``[N, L]`` codes) against
    the distribution ``probs`` over the sequences ``every`` (``[S, L]``);
    sequences with an expected count under 5 are pooled into one cell."""
    V = int(max(every.max(), samples.max())) + 1
    place = V ** torch.arange(every.shape[1] - 1, -1, -1, dtype=torch.float64)
    index = {int(k): i for i, k in enumerate((every.double() @ place).long().tolist())}
    counts = torch.zeros(every.shape[0], dtype=torch.float64)
    for k, n in zip(*torch.unique((samples.double() @ place).long(), return_counts=True), strict=True):
        if int(k) not in index:
            return 0.0  # a sequence outside the support
        counts[index[int(k)]] = float(n)
    expected = probs.double() / probs.double().sum() * samples.shape[0]
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]]) if small.any() else counts
    exp = torch.cat([expected[~small], expected[small].sum()[None]]) if small.any() else expected
    keep = exp > 0
    if (obs[~keep] > 0).any():
        return 0.0
    obs, exp = obs[keep], exp[keep]
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = max(int(obs.numel()) - 1, 1)
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def _likelihood_properties(name: str, gen: Any, tok: Any, *, seed: int, n_samples: int) -> None:
    """Decode-time log-probabilities equal the teacher-forced ``log_likelihood``;
    when every sequence can be enumerated, ``exp(log_likelihood)`` sums to one
    and samples follow it (chi-square)."""
    from .blocks.rng import RowRNG
    from .blocks.sampling import SamplerChain

    L, V = tok.layout.length, tok.vocab_size
    spec = gen.model_spec()
    # what the decoding loop saw equals one teacher-forced pass over what it generated
    B = 6
    cond = torch.arange(B) % 4  # 3 is the null class of the tiny model (unconditional rows)
    for pos in ("rope2d", "learned"):
        model = _peaked(_tiny_model(spec, pos=pos, seed=seed))
        _attach_tiny_auxiliary(gen, spec, pos=pos, seed=seed)
        recorder = _recording_chain([])
        recorder.bind(SamplerContext(vocab_size=V, code_embeddings=tok.code_embeddings(),
                                     token_embeddings=model.token_embeddings()))
        with torch.no_grad():
            out = gen.generate(model, recorder, cond, rng=RowRNG(seed, torch.arange(B)))
            decoded = recorder.decode_log_likelihood(B, L)
            if decoded is None:
                break  # a loop that does not draw each code once through the chain (speculative decoding)
            forced = gen.log_likelihood(model, out, cond).double()
        gap = (decoded - forced).abs().max().item()
        assert gap <= 1e-5 * (L + forced.abs().max().item()), (
            f"{name}: the logits the decoding loop handed to the sampler chain give the generated codes "
            f"log-probabilities {[round(v, 5) for v in decoded.tolist()]}, but log_likelihood (teacher "
            f"forcing) says {[round(v, 5) for v in forced.tolist()]} ({pos} positions) — decoding and "
            "training disagree")

    if V**L > 256:
        return
    every = torch.cartesian_prod(*[torch.arange(V)] * L).reshape(-1, L) if L > 1 else torch.arange(V)[:, None]
    with torch.no_grad():
        for c in (0, 3):
            ll = gen.log_likelihood(model, every, torch.full((every.shape[0],), c)).double()
            total = torch.logsumexp(ll, 0)
            assert abs(total.item()) < 1e-4, (
                f"{name}: exp(log_likelihood) sums to {total.exp().item():.6f} over all codes (class {c})")
        cond = torch.full((n_samples,), 1)
        probs = gen.log_likelihood(model, every, torch.full((every.shape[0],), 1)).double().exp()
        samples = gen.generate(model, SamplerChain([]), cond, rng=RowRNG(seed + 7, torch.arange(n_samples)))
    pvalue = chi_square_pvalue(samples, every, probs)
    assert pvalue > 1e-4, (
        f"{name}: {n_samples} samples of a tiny model do not follow exp(log_likelihood) over the {every.shape[0]} "
        f"sequences (chi-square p = {pvalue:.2g}) — decoding samples another distribution than the one "
        "log_likelihood reports")


def check_generator(name: str, *, registry: Any = None, tokenizer: tuple[str, dict] | None = None,
                    max_examples: int = 8, n_samples: int = 3000, **config: Any) -> None:
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
      sums to 1 over every sequence of a small layout; the log-probabilities
      of the drawn codes under the logits the decoding loop handed to the
      chain equal ``log_likelihood`` of the generated codes (loops that draw
      each code once: not the speculative ones); and ``n_samples`` samples of
      a tiny peaked model follow ``exp(log_likelihood)`` (chi-square, p >
      1e-4) — unless the class sets ``samples_follow_likelihood = False``
      (an order whose likelihood is that of another order, e.g. ``random``'s
      raster-order likelihood: they agree only for a trained model).

    The generator is always handed a :class:`~tokenloom.sampling.SamplerChain`.
    """
    from .blocks.rng import RowRNG
    from .blocks.sampling import SamplerChain
    from .contract.interfaces import Known
    from .contract.registry import build_component, get_registry

    _, st = _hypothesis()
    registry = registry or get_registry()
    kit = _kit_registry()

    def make(tok_name: str, tok_opts: dict) -> tuple[Any, Any]:
        # the kit's own pixel layouts come from the built-in plugin; a caller's tokenizer from `registry`
        source = registry if tokenizer is not None else kit
        tok = build_component(source, "tokenizer", tok_name, dict(tok_opts), path="tokenizer")
        gen = build_component(registry, "generator", name, {**config, "tokenizer": tok}, path="generator")
        return tok, gen

    def pixel_layout(gh: int, gw: int, depth3: bool) -> tuple[str, dict]:
        return ("pixel", {"bits": 1, "pool": 2, "per_channel": depth3, "image_shape": (3, 2 * gh, 2 * gw)})

    def chain(kind: int) -> SamplerChain:
        build = lambda n, **kw: build_component(kit, "sampler", n, kw, path="sampler")
        return SamplerChain([[], [build("top-k", k=3)], [build("cfg", scale=2.0), build("temperature", t=0.9)]][kind])

    @_settings(max_examples)
    @_given(gh=st.integers(1, 4), gw=st.integers(1, 4), depth3=st.booleans(), seed=st.integers(0, 2**16),
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

    cls = registry.get("generator", name).cls
    if getattr(cls, "exact_likelihood", False) and getattr(cls, "samples_follow_likelihood", True):
        # a tiny enumerable layout (V = 2, L = 4: 16 sequences) unless the caller fixed the tokenizer
        tok, gen = make(*(tokenizer or ("pixel", {"bits": 1, "image_shape": (1, 2, 2)})))
        _likelihood_properties(name, gen, tok, seed=1, n_samples=n_samples)


CHECKS["generator"] = check_generator


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------

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
    from .backbone.model import InstrumentedModel, build_model
    from .contract.config import ModelConfig
    from .contract.interfaces import MetricContext, TokenLayout
    from .contract.registry import build_component

    class _StandInTokenizer:
        vocab_size = 16
        layout = TokenLayout(scales=((4, 4),))

        def __init__(self, shape):
            self.image_shape = tuple(shape)

    g = torch.Generator().manual_seed(seed)
    c, h, w = image_shape
    data = None
    if c == 3 and h == w and h >= 16:
        from .blocks.data import load_dataset
        from .contract.config import DataConfig

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

    from .contract.errors import PluginError
    from .contract.registry import build_component, get_registry
    from .evaluation.evalcard import evaluate

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
        from .running.reports import direction

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


CHECKS["metric"] = check_metric


def check(kind: str, name: str, **config: Any) -> None:
    """Run the conformance properties of ``kind`` on the component ``name``
    built with ``config``; raises ``AssertionError`` on the first violation."""
    from .contract.registry import Registry

    kind = Registry.check_kind(kind)
    if kind not in CHECKS:
        raise NotImplementedError(f"no conformance properties for kind {kind!r} yet")
    CHECKS[kind](name, **config)
