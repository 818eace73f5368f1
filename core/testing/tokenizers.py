"""Tokenizer properties: shapes, determinism, the reconstruction bound on
blocky images, non-square sizes, cell locality, save -> load, clear errors —
for discrete tokenizers (codes ``LongTensor[B, L]`` in ``[0, V)``) and for
continuous ones (``continuous = True``: latents ``FloatTensor[B, L, D]``, the
posterior mean, deterministic even in training mode; bad latents — NaN, inf,
the wrong width or length, integer codes — are an ``InputError``)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from ..contract.errors import TokenloomError
from .common import _expect_error, _given, _hypothesis, _settings, random_images


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


def _continuous_contract(tok: Any, name: str, image_shape: tuple[int, int, int], max_examples: int) -> None:
    """A continuous tokenizer: float32 latents ``[n, L, D]``, finite; encode deterministic (in eval
    and in training mode: the posterior mean, never a draw) and batch independent; decode of its
    latents and of arbitrary finite latents gives float32 images in [-1, 1], batch independent."""
    _, st = _hypothesis()
    L, D = tok.layout.length, tok.token_dim
    c, h, w = image_shape
    where = f"{name} at {c}×{h}×{w}"

    @_settings(max_examples)
    @_given(n=st.integers(1, 4), seed=st.integers(0, 2**16))
    def encode_decode(n: int, seed: int) -> None:
        x = random_images(n, image_shape, seed)
        with torch.no_grad():
            z = tok.encode(x)
            assert isinstance(z, torch.Tensor) and z.dtype == torch.float32, (
                f"{where}: a continuous tokenizer's encode must return float32 latents, got "
                f"{getattr(z, 'dtype', type(z).__name__)}")
            assert tuple(z.shape) == (n, L, D), (
                f"{where}: encode shape {tuple(z.shape)} != {(n, L, D)} from the layout and token_dim")
            assert torch.isfinite(z).all(), f"{where}: encode returned NaN or infinite latents"
            assert torch.equal(z, tok.encode(x)), f"{where}: encode is not deterministic in eval mode"
            singles = torch.cat([tok.encode(x[i : i + 1]) for i in range(n)])
            assert torch.equal(z, singles), f"{where}: a batch encodes differently from its images one by one"
            y = tok.decode(z)
            assert y.dtype == torch.float32 and tuple(y.shape) == (n, c, h, w), (
                f"{where}: decode must return float32 {(n, c, h, w)}, got {y.dtype} {tuple(y.shape)}")
            assert torch.isfinite(y).all() and y.min() >= -1 - 1e-5 and y.max() <= 1 + 1e-5, (
                f"{where}: decoded images outside [-1, 1]")

    @_settings(max_examples)
    @_given(n=st.integers(1, 3), seed=st.integers(0, 2**16), spread=st.sampled_from([0.1, 1.0, 10.0]))
    def decode_any_latents(n: int, seed: int, spread: float) -> None:
        g = torch.Generator().manual_seed(seed)
        z = torch.randn((n, L, D), generator=g) * spread  # what a head may sample, far outside the data too
        with torch.no_grad():
            y = tok.decode(z)
            assert tuple(y.shape) == (n, c, h, w) and torch.isfinite(y).all(), (
                f"{where}: decode of finite latents (spread {spread}) failed")
            assert y.min() >= -1 - 1e-5 and y.max() <= 1 + 1e-5, f"{where}: decoded images outside [-1, 1]"
            assert torch.equal(tok.decode(z[:1]), y[:1]), f"{where}: decode of a batch differs from one by one"

    encode_decode()
    decode_any_latents()
    # the tokens are the posterior's mean, not a draw: training mode (where a VAE samples) encodes the same
    x = random_images(2, image_shape, seed=11)
    was = tok.training
    try:
        tok.train()
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(1)
            a = tok.encode(x)
            torch.manual_seed(2)
            b = tok.encode(x)
    finally:
        tok.train(was)
    assert torch.equal(a, b), (
        f"{where}: encode in training mode depends on the random state — a continuous tokenizer's tokens "
        "must be deterministic (the posterior mean), the draw belongs to its training loss")


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
        differs = other != codes
        if differs.dim() == 3:  # continuous tokens [B, L, width]: a token changed when any value did
            differs = differs.any(-1)
        changed = differs.reshape(2, gh, gw, D).any(-1).any(0)
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
    tokenizers, ``code_embeddings()``, save -> load, and clear errors.
    A continuous tokenizer (``continuous = True``) is held to the same with
    latents ``[B, L, token_dim]`` (see :func:`_continuous_contract`):
    ``vocab_size`` 0, ``code_embeddings()`` raising, and bad latents (NaN,
    inf, the wrong width or length, integer codes) an ``InputError``."""
    from ..contract.checkpoint import load_component, save_tokenizer
    from ..contract.errors import ConfigError
    from ..contract.registry import build_component, get_registry

    registry = registry or get_registry()
    image_shape = tuple(image_shape)

    def build(shape: tuple[int, int, int]) -> Any:
        return build_component(registry, "tokenizer", name, {**config, "image_shape": shape}, path="tokenizer")

    tok = build(image_shape)
    layout, V = tok.layout, tok.vocab_size
    continuous = bool(getattr(tok, "continuous", False))
    if continuous:
        D = tok.token_dim
        assert isinstance(D, int) and D >= 1, f"{name}: a continuous tokenizer sets token_dim >= 1, got {D!r}"
        assert V == 0, f"{name}: a continuous tokenizer has vocab_size 0 (no vocabulary), got {V!r}"
    else:
        assert isinstance(V, int) and V >= 1, f"{name}: vocab_size must be a positive int, got {V!r}"
    L = layout.length
    _fit_quietly(tok, random_images(32, image_shape, seed=1234), fit_steps, name)
    c, h, w = image_shape
    cell_local = bool(getattr(tok, "cell_local", False))
    contract = _continuous_contract if continuous else _shape_contract

    if continuous:  # no codebook: code_embeddings() must say so, not return something made up
        try:
            emb = tok.code_embeddings()
        except (TokenloomError, NotImplementedError):
            pass
        else:
            raise AssertionError(f"{name}: a continuous tokenizer has no codebook, but code_embeddings() returned "
                                 f"{type(emb).__name__} {tuple(getattr(emb, 'shape', ()))} — it must raise "
                                 "(ConfigError or NotImplementedError)")
    else:
        emb = tok.code_embeddings()
        assert isinstance(emb, torch.Tensor) and emb.dim() == 2 and emb.shape[0] == V, (
            f"{name}: code_embeddings() must be [V={V}, D], got {tuple(getattr(emb, 'shape', ()))}"
        )
        assert emb.dtype.is_floating_point and torch.isfinite(emb).all(), (
            f"{name}: code_embeddings() not finite floats")

    contract(tok, name, image_shape, max_examples)
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
        contract(other, name, shape, max(2, max_examples // 4))
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
    if continuous:
        D = tok.token_dim
        with torch.no_grad():
            z = tok.encode(good)
        for bad, what in ((float("nan"), "NaN"), (float("inf"), "inf"), (float("-inf"), "-inf")):
            zb = z.clone()
            zb[-1, L // 2, D - 1] = bad
            _expect_error(f"{name}.decode(latents with {what})", lambda zb=zb: tok.decode(zb))
        _expect_error(f"{name}.decode(wrong latent width D + 1)",
                      lambda: tok.decode(torch.zeros(1, L, D + 1)))
        if D > 1:
            _expect_error(f"{name}.decode(wrong latent width D - 1)", lambda: tok.decode(torch.zeros(1, L, D - 1)))
        _expect_error(f"{name}.decode(wrong length)", lambda: tok.decode(torch.zeros(1, L + 1, D)))
        _expect_error(f"{name}.decode(integer codes)", lambda: tok.decode(torch.zeros(1, L, dtype=torch.long)))
        _expect_error(f"{name}.decode(integer latents [1, L, D])",
                      lambda: tok.decode(torch.zeros(1, L, D, dtype=torch.long)))
        _expect_error(f"{name}.decode(flat latents [1, L·D])", lambda: tok.decode(torch.zeros(1, L * D)))
        _expect_error(f"{name}.decode(a numpy array)", lambda: tok.decode(z.numpy()))
        return
    _expect_error(f"{name}.decode(code = vocab_size)", lambda: tok.decode(torch.full((1, L), V)))
    _expect_error(f"{name}.decode(code = -1)", lambda: tok.decode(torch.full((1, L), -1)))
    _expect_error(f"{name}.decode(wrong length)", lambda: tok.decode(torch.zeros(1, L + 1, dtype=torch.long)))
    _expect_error(f"{name}.decode(float codes)", lambda: tok.decode(torch.zeros(1, L)))
