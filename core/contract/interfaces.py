"""The public plugin contract of tokenloom (v1).

Reading this file is enough to write a plugin. There are five kinds of
component; each is a class deriving from one of the bases below and carrying
its configuration as a nested, frozen attrs class named ``Config``:

================  ==========================================================
kind              what it is
================  ==========================================================
``tokenizer``     images  <->  discrete codes (:class:`Tokenizer`)
``generator``     a generation order, its training batches and decoding loop
                  (:class:`Generator`)
``sampler``       a logits processor in a chain (:class:`Sampler`), or an
                  acceptance rule for speculative decoding
                  (:class:`AcceptanceRule`)
``metric``        a number computed from images, codes or run statistics
                  (:class:`Metric`)
``conditioner``   conditions (class labels, captions) -> the prefix the
                  backbone reads before the codes (:class:`Conditioner`)
``head``          the backbone's hidden state -> a token: today's linear
                  layer + sampler chain (``categorical``), or a small
                  network for continuous tokens (``diffusion``, ``flow``)
                  (:class:`Head`)
================  ==========================================================

A generator decodes with what core hands it: a :class:`Backbone` (the
trained transformer), a :class:`Chain` (the run's samplers and the final
draw) and an :class:`RNG` (per-image randomness); the protocols below are
everything it may use of them.

A plugin registers its classes through a pluggy hook (see
:mod:`tokenloom.hookspecs`)::

    import attrs, tokenloom

    class MyTokenizer(tokenloom.Tokenizer):
        @attrs.frozen
        class Config:
            bits: int = attrs.field(default=3, validator=attrs.validators.ge(1))
        ...

    @tokenloom.hookimpl
    def register_tokenizers(register):
        register("mytok", MyTokenizer)

and declares the module as an entry point in the group ``tokenloom``. The
registry structures a TOML table such as ``{name = "mytok", bits = 3}`` into
``MyTokenizer.Config`` (unknown keys and wrong types are reported with their
path) and calls ``MyTokenizer(config, image_shape=...)``.

Shapes: ``B`` batch, ``L`` tokens per image, ``V`` vocabulary, ``C×H×W`` an
image. Images are always float32 in [-1, 1].
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol, runtime_checkable

import attrs
import torch
from torch import nn

from .errors import InputError

KINDS: tuple[str, ...] = ("tokenizer", "generator", "sampler", "metric", "conditioner", "head")

#: Position id of a token without a grid position (the class token, a position instruction's
#: "nowhere"): ``TrainBatch.positions`` and the backbone's ``positions=`` use it; see :class:`ModelSpec`.
NO_POSITION = -1

_REQUIRED: Any = object()  # a required argument that was not passed (Tokenizer.__init__)


# ---------------------------------------------------------------------------
# Value types
# ---------------------------------------------------------------------------


def _scales_converter(value: Any) -> tuple[tuple[int, int], ...]:
    return tuple((int(h), int(w)) for h, w in value)


@attrs.frozen
class TokenLayout:
    """How the flat code sequence of one image is laid out.

    ``scales``: the token grids, coarse to fine; a plain grid is one scale,
    a 1-D tokenizer one scale of height 1. ``depth``: residual depth (RQ),
    1 if none. ``residual``: whether scales add up (VAR) or replace each other
    (FlexVAR). The flat order is scale-major, then row-major, then depth-minor,
    so ``L = depth * sum(h * w for h, w in scales)``.
    """

    scales: tuple[tuple[int, int], ...] = attrs.field(converter=_scales_converter)
    depth: int = 1
    residual: bool = True

    def __attrs_post_init__(self) -> None:
        if not self.scales or any(h < 1 or w < 1 for h, w in self.scales):
            raise ValueError(f"TokenLayout.scales must be non-empty positive grids, got {self.scales}")
        if self.depth < 1:
            raise ValueError(f"TokenLayout.depth must be >= 1, got {self.depth}")

    @property
    def length(self) -> int:
        """``L``: codes per image."""
        return self.depth * sum(h * w for h, w in self.scales)

    @property
    def grid(self) -> tuple[int, int]:
        """The finest (last) scale's ``(h, w)``."""
        return self.scales[-1]

    @property
    def n_scales(self) -> int:
        return len(self.scales)

    def scale_slices(self) -> tuple[slice, ...]:
        """For each scale, its slice of the flat code sequence."""
        out, start = [], 0
        for h, w in self.scales:
            n = h * w * self.depth
            out.append(slice(start, start + n))
            start += n
        return tuple(out)


@attrs.frozen
class ModelSpec:
    """What the backbone must provide for a generation order.

    The spec is part of the trained model's cache key: generators whose
    ``train_order`` and spec agree share one trained model (e.g. ``sjd``,
    ``speculative`` and ``zipar`` reuse the ``raster`` model).

    - ``seq_len``: length of the training sequence (including any class or
      instruction tokens the generator adds);
    - ``vocab_size``: input vocabulary = tokenizer vocabulary + ``n_extra_tokens``
      (MASK, position-instruction tokens, ...); extras take ids
      ``[tokenizer.vocab_size, vocab_size)``;
    - ``input_kind``: ``"tokens"`` (ids) or ``"embeddings"`` (float vectors of
      width ``input_dim`` supplied by the generator, e.g. VAR's f̂ inputs);
    - ``attention``: ``"causal"``, ``"block-causal"``, ``"bidirectional"`` or
      ``"custom"`` (the generator supplies ``TrainBatch.attn_mask``);
    - ``heads``: output vocabulary size of each output head (one entry for a
      plain categorical head; several for NAR's per-direction heads);
    - ``cache_ops``: cache operations the decoding loop uses
      (``"append"``, ``"truncate"``);
    - ``train_order``: name of the training recipe;
    - ``extra``: anything else the backbone needs, as sorted key/value pairs
      (the backbone reads ``("target_aware", True)``: RAR's additive
      embedding of the position to be predicted, ``("block_sizes", (n, ...))``
      for ``"block-causal"`` attention, ``("depth_head", n)`` (RQ-Transformer),
      ``("head_blocks", (n_0, ...))`` / ``("head_branch", (k_0, ...))``: output
      heads with transformer blocks of their own (NAR, HMAR;
      :mod:`tokenloom.backbone.head_blocks`), and ``("rotate_ids", (id, ...))``:
      input embeddings rotated by their position's RoPE (RandAR's position
      instruction; :mod:`tokenloom.backbone.positions`));
    - ``layout``: the tokenizer's :class:`TokenLayout`; position ids in
      ``TrainBatch.positions`` are flat code positions ``[0, layout.length)``
      of it (the backbone derives 2-D rotary coordinates from them), and
      ``-1`` marks a token with no grid position (the class token);
    - ``token_dim``: 0 for discrete codes; ``D`` for a model of continuous
      tokens (a continuous tokenizer's ``token_dim``): the backbone then
      outputs hidden states for the run's :class:`Head` (``heads`` is
      ``()``), targets are ``FloatTensor[B, T, D]`` and inputs are
      embeddings (``input_kind = "embeddings"``). Left out of :meth:`key`
      when 0, so discrete models keep their cache keys.

    Sequence convention: index 0 of every sequence is the class token — its
    input value is ignored and the backbone puts the class embedding of
    ``cond`` there (the null class ``n_classes`` for unconditional rows).
    """

    seq_len: int
    vocab_size: int
    heads: tuple[int, ...]
    train_order: str
    n_extra_tokens: int = 0
    input_kind: str = "tokens"
    input_dim: int = 0
    attention: str = "causal"
    cache_ops: frozenset[str] = frozenset({"append"})
    extra: tuple[tuple[str, Any], ...] = ()
    layout: TokenLayout | None = None
    token_dim: int = 0

    @property
    def continuous(self) -> bool:
        """Whether the model predicts continuous tokens (``token_dim > 0``)."""
        return self.token_dim > 0

    def key(self) -> dict[str, Any]:
        """A JSON-able description used in cache keys."""
        d = attrs.asdict(self, recurse=False)
        if not self.token_dim:  # discrete models: the key as before continuous tokens
            del d["token_dim"]
        d["cache_ops"] = sorted(self.cache_ops)
        d["heads"] = list(self.heads)
        d["extra"] = [[k, list(v) if isinstance(v, tuple) else v] for k, v in self.extra]
        if self.layout is None:
            del d["layout"]
        else:
            d["layout"] = {"scales": [list(s) for s in self.layout.scales], "depth": self.layout.depth,
                           "residual": self.layout.residual}
        return d

    def option(self, name: str, default: Any = None) -> Any:
        """The value of ``name`` in ``extra`` (``default`` if absent)."""
        return dict(self.extra).get(name, default)


@attrs.define
class TrainBatch:
    """One teacher-forcing batch produced by ``Generator.training_batch``.

    - ``inputs``: ``LongTensor[B, T]`` of ids, or ``FloatTensor[B, T, D]`` of
      embeddings when the spec's ``input_kind`` is ``"embeddings"``;
    - ``targets``: ``LongTensor[B, T]`` (or ``[B, T, n_heads]`` for several
      heads); for a continuous spec (``token_dim = D``) ``FloatTensor[B, T,
      D]``: the token each position must produce, scored by the run's
      :class:`Head` (``Head.loss``); entries where ``loss_mask`` is False
      are ignored;
    - ``positions``: ``LongTensor[B, T]`` or ``[T]`` — the 2-D grid position
      index each input sits at (for rotary/learned position embeddings): a
      flat code position of ``ModelSpec.layout``, ``-1`` for none (the class
      token); None for the default ``[-1, 0, 1, ..., T - 2]``;
    - ``attn_mask``: ``BoolTensor[T, T]`` or ``[B, T, T]``, True where a query
      may attend to a key; None means the spec's ``attention`` pattern;
    - ``loss_mask``: ``BoolTensor[B, T]`` (or ``[B, T, n_heads]``), True where
      the loss is taken;
    - ``cond``: ``LongTensor[B]`` class labels (the null class is
      ``n_classes``);
    - ``extra``: order-specific tensors the backbone is told about in the spec.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    loss_mask: torch.Tensor
    cond: torch.Tensor
    positions: torch.Tensor | None = None
    attn_mask: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = attrs.Factory(dict)


@attrs.define
class StepInfo:
    """What a sampler is told about the decoding step it processes.

    - ``step`` / ``n_steps``: index of this decoding step and how many the
      loop will take (best known value for adaptive loops);
    - ``positions``: ``LongTensor[B]`` (or ``[B, k]``) flat code positions
      whose logits are being processed, or None;
    - ``scale`` / ``n_scales``: the scale index for multi-scale orders;
    - ``uncond_logits``: ``FloatTensor[B, V]`` logits of the unconditional
      rows, filled only when a processor in the chain sets
      ``needs_uncond = True`` (classifier-free guidance);
    - ``fraction``: the decoding progress when the order measures it
      otherwise than by steps (``random``/``random-parallel``: the fraction
      of tokens decoded, as RandAR ramps its guidance), or None.
    """

    step: int = 0
    n_steps: int = 1
    positions: torch.Tensor | None = None
    scale: int | None = None
    n_scales: int | None = None
    uncond_logits: torch.Tensor | None = None
    fraction: float | None = None

    @property
    def progress(self) -> float:
        """``fraction`` when given, else ``step / (n_steps - 1)``; in [0, 1]
        (0 for one-step loops)."""
        if self.fraction is not None:
            return min(1.0, max(0.0, float(self.fraction)))
        return 0.0 if self.n_steps <= 1 else min(1.0, self.step / (self.n_steps - 1))


@attrs.define
class SamplerContext:
    """Handed once to ``Sampler.bind`` before a run decodes.

    ``code_embeddings``: ``FloatTensor[V, D]`` from the tokenizer (may be None
    when sampling outside a pipeline); ``token_embeddings``: the AR model's
    input embedding table ``[V', D']`` (None outside a pipeline);
    ``vocab_size``: the tokenizer vocabulary ``V``. With a continuous
    tokenizer ``vocab_size`` is 0 and ``code_embeddings`` None (no codebook).
    """

    vocab_size: int
    code_embeddings: torch.Tensor | None = None
    token_embeddings: torch.Tensor | None = None


@attrs.define
class Known:
    """Codes fixed in advance for zero-shot inpainting/outpainting:
    ``codes`` ``LongTensor[B, L]`` and ``mask`` ``BoolTensor[B, L]`` (True where
    the code is given and must be kept)."""

    codes: torch.Tensor
    mask: torch.Tensor


@attrs.define
class MetricContext:
    """Everything a metric may ask for; fields a metric did not declare in
    ``requires`` may be None.

    - ``real``: ``FloatTensor[N, C, H, W]`` reference images in [-1, 1];
    - ``generated``: ``FloatTensor[M, C, H, W]`` generated images;
    - ``real_labels`` / ``generated_labels``: class labels ``LongTensor``
      (``generated_labels``: the class each image was asked for, None when
      the prompts name none);
    - ``generated_conditions``: the :class:`Condition` each generated image
      was asked for (its prompt, its class), or None;
    - ``codes``: ``LongTensor[N, L]`` codes of real images (``FloatTensor[N,
      L, D]`` latents for a continuous tokenizer); ``reconstructed``:
      decode(encode(real));
    - ``stats``: run statistics (``nfe``, ``seconds_per_image``, ...);
    - ``tokenizer``, ``model``, ``generator``: the run's components;
      ``data``: the :class:`tokenloom.data.ImageSet` the real images come
      from (its ``class_names`` and per-image ``attributes``);
    - ``seed``: the run seed; ``device``: where to compute;
    - ``cache_dir``: where metrics may cache expensive artifacts (feature
      extractor weights, reference-set features); None: ``$TOKENLOOM_CACHE_DIR``
      or ``~/.cache/tokenloom``.
    """

    real: torch.Tensor | None = None
    generated: torch.Tensor | None = None
    real_labels: torch.Tensor | None = None
    generated_labels: torch.Tensor | None = None
    codes: torch.Tensor | None = None
    reconstructed: torch.Tensor | None = None
    stats: dict[str, float] = attrs.Factory(dict)
    tokenizer: Any = None
    model: Any = None
    generator: Any = None
    data: Any = None
    seed: int = 0
    device: str = "cpu"
    cache_dir: str | None = None
    generated_conditions: list[Any] | None = None


# ---------------------------------------------------------------------------
# Input checks shared by all components
# ---------------------------------------------------------------------------


def check_images(images: Any, image_shape: tuple[int, int, int], *, where: str = "images") -> torch.Tensor:
    """Validate a batch of images: a float32 tensor ``[B, C, H, W]`` matching
    ``image_shape`` with finite values in [-1, 1]. Raises :class:`InputError`
    naming the problem."""
    if not isinstance(images, torch.Tensor):
        raise InputError(f"{where}: expected a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.float32:
        raise InputError(
            f"{where}: expected dtype float32 in [-1, 1], got {images.dtype} "
            "(convert with images.float() / 127.5 - 1 for uint8 data)"
        )
    if images.dim() != 4:
        raise InputError(f"{where}: expected shape [B, C, H, W], got {tuple(images.shape)}")
    if tuple(images.shape[1:]) != tuple(image_shape):
        raise InputError(
            f"{where}: expected images of shape C×H×W = {tuple(image_shape)}, got {tuple(images.shape[1:])}"
        )
    if images.numel() and not torch.isfinite(images).all():
        raise InputError(f"{where}: contains NaN or infinite values")
    if images.numel() and (images.min() < -1.0 - 1e-5 or images.max() > 1.0 + 1e-5):
        raise InputError(
            f"{where}: values must lie in [-1, 1], got range [{images.min().item():.3g}, {images.max().item():.3g}]"
        )
    return images


def check_codes(codes: Any, length: int, vocab_size: int, *, where: str = "codes") -> torch.Tensor:
    """Validate codes: an integer tensor ``[B, L]`` with values in
    ``[0, vocab_size)``. Raises :class:`InputError` naming the problem."""
    if not isinstance(codes, torch.Tensor):
        raise InputError(f"{where}: expected a torch.Tensor, got {type(codes).__name__}")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool or codes.dtype.is_complex:
        raise InputError(f"{where}: expected an integer tensor, got {codes.dtype}")
    if codes.dim() != 2 or codes.shape[1] != length:
        raise InputError(f"{where}: expected shape [B, {length}], got {tuple(codes.shape)}")
    if codes.numel() and (codes.min() < 0 or codes.max() >= vocab_size):
        raise InputError(
            f"{where}: values must lie in [0, {vocab_size}), got range "
            f"[{codes.min().item()}, {codes.max().item()}]"
        )
    return codes.long()


def check_latents(latents: Any, length: int, dim: int, *, where: str = "latents") -> torch.Tensor:
    """Validate continuous tokens: a floating tensor ``[B, L, D]`` with
    ``L = length``, ``D = dim`` and finite values. Returns it as float32.
    Raises :class:`InputError` naming the problem (an integer tensor here is
    discrete codes handed to a continuous component)."""
    if not isinstance(latents, torch.Tensor):
        raise InputError(f"{where}: expected a torch.Tensor, got {type(latents).__name__}")
    if not latents.dtype.is_floating_point:
        raise InputError(f"{where}: expected continuous tokens (a float tensor [B, {length}, {dim}]), "
                         f"got {latents.dtype} — discrete codes given to a continuous tokenizer or head?")
    if latents.dim() != 3 or latents.shape[1] != length or latents.shape[2] != dim:
        raise InputError(f"{where}: expected shape [B, {length}, {dim}] (L tokens of width D), "
                         f"got {tuple(latents.shape)}")
    if latents.numel() and not torch.isfinite(latents).all():
        bad = (~torch.isfinite(latents)).flatten(1).any(-1).nonzero().flatten().tolist()
        raise InputError(f"{where}: NaN or infinite values in rows {bad[:8]}")
    return latents.float()


def check_logits(logits: torch.Tensor, info: StepInfo | None = None, *, where: str = "logits") -> None:
    """Raise :class:`InputError` for rows containing NaN or entirely ``-inf``
    (nothing left to sample), naming the decoding step."""
    step = f" at step {info.step}" if info is not None else ""
    if logits.dim() != 2:
        raise InputError(f"{where}{step}: expected shape [B, V], got {tuple(logits.shape)}")
    if logits.numel() and math.isfinite(float(logits.amax(-1).sum())):
        return  # fast path: a row maximum is NaN, -inf or +inf when the row has a problem below (then the sum is not
        # finite; a sum that overflows only sends finite rows to the checks below, which pass them)
    if torch.isnan(logits).any():
        rows = torch.isnan(logits).any(-1).nonzero().flatten().tolist()
        raise InputError(f"{where}{step}: NaN in rows {rows[:8]}")
    dead = torch.isneginf(logits).all(-1) if logits.shape[-1] else torch.ones(logits.shape[0], dtype=torch.bool)
    if dead.any():
        rows = dead.nonzero().flatten().tolist()
        raise InputError(f"{where}{step}: every entry is -inf in rows {rows[:8]} (nothing left to sample)")
    if torch.isposinf(logits).any():
        raise InputError(f"{where}{step}: +inf logits")


def read_stat(stats: Mapping[str, Any] | None, key: str, *, metric: str, upper: float | None = None) -> float | None:
    """``stats[key]`` as a float for a metric that reports run statistics;
    None when absent (a metric reports "not recorded", never a made-up
    number). A present value that is not a finite non-negative number (at
    most ``upper``) is an :class:`InputError` naming the metric and key."""
    if stats is None or stats.get(key) is None:
        return None
    value = stats[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)) \
            or value < 0 or (upper is not None and value > upper):
        bound = f" in [0, {upper:g}]" if upper is not None else " >= 0"
        raise InputError(f"{metric}: ctx.stats[{key!r}] must be a finite number{bound}, got {value!r}")
    return float(value)


# ---------------------------------------------------------------------------
# Component bases
# ---------------------------------------------------------------------------


class Tokenizer(nn.Module):
    """Images ``[B, C, H, W]`` in [-1, 1]  <->  codes ``LongTensor[B, L]``
    (discrete tokens), or <-> latents ``FloatTensor[B, L, D]`` (continuous
    tokens: ``continuous = True``).

    Subclasses set ``self.layout`` (:class:`TokenLayout`) and
    ``self.vocab_size`` in ``__init__`` and implement :meth:`encode`,
    :meth:`decode` and :meth:`code_embeddings`; trainable tokenizers also
    implement :meth:`fit`. All learnable state lives in parameters/buffers, so
    ``state_dict()`` is the checkpoint (core saves it as safetensors with the
    config beside it). ``encode`` and ``decode`` must validate their inputs with
    :func:`check_images` / :func:`check_codes` (the conformance kit checks that
    bad inputs raise :class:`~tokenloom.errors.InputError`).

    **Continuous tokens** (MAR's KL tokenizer, raw patches): a tokenizer with
    ``continuous = True`` sets ``self.token_dim`` (D) and ``self.vocab_size =
    0``; ``encode`` returns ``FloatTensor[B, L, D]`` (deterministic: a
    posterior's mean, never a draw), ``decode`` takes it; it validates with
    :func:`check_latents` (:meth:`check_tokens` picks the right check);
    ``code_embeddings`` has no meaning and raises. The layout is the same
    :class:`TokenLayout` (one grid, or several scales coarse to fine).
    Generators and heads read :attr:`continuous` to refuse a token kind
    they cannot model (a :class:`~tokenloom.errors.ConfigError` at build time).
    """

    Config: ClassVar[type]
    layout: TokenLayout
    vocab_size: int
    #: Token kind: False for integer codes in ``[0, vocab_size)``, True for
    #: float vectors of width ``token_dim``.
    continuous: ClassVar[bool] = False
    #: Width D of a continuous token (0 for discrete tokenizers).
    token_dim: int = 0
    #: Capability: True when the layout is one grid (one scale) whose cell (i, j) covers the image
    #: patch ``[i*H/h : (i+1)*H/h, j*W/w : (j+1)*W/w]`` and nothing mixes cells — the codes of a cell
    #: are computed from its patch alone and decode to it alone (pixel-like tokenizers; not
    #: convolutional encoders, whose receptive fields overlap). The conformance kit then checks
    #: locality: changing one patch changes only the codes of its cell.
    cell_local: ClassVar[bool] = False

    def __init__(self, config: Any = _REQUIRED, *, image_shape: tuple[int, int, int] | None = None):
        if config is _REQUIRED or image_shape is None:
            # the torch habit, super().__init__() with no arguments: say what the call must be
            missing = " and ".join(n for n, absent in (("config", config is _REQUIRED),
                                                       ("image_shape", image_shape is None)) if absent)
            raise TypeError(
                f"{type(self).__name__}.__init__ must pass its config and image shape on to "
                f"tokenloom.Tokenizer: call super().__init__(config, image_shape=image_shape) "
                f"({missing} missing; a tokenizer is built as "
                f"{type(self).__name__}(config, image_shape=(C, H, W)))")
        super().__init__()
        self.config = config
        self.image_shape = tuple(int(s) for s in image_shape)

    def fit(self, images: torch.Tensor, *, steps: int | None = None, progress: bool = True) -> dict[str, float]:
        """Train on ``images`` (``[N, C, H, W]`` float32 in [-1, 1]) for
        ``steps`` optimiser steps (None: the config's default). Returns
        training statistics. Training-free tokenizers return ``{}`` at once."""
        return {}

    def fit_resumable(self, images: torch.Tensor, *, checkpoint: Any, progress: bool = True) -> dict[str, float]:
        """:meth:`fit` keeping a resumable training state in the file ``checkpoint``, so a fit
        killed midway continues from it (what the pipeline and ``tokenloom fit-tokenizer`` call).
        The default fits from scratch: override it when the tokenizer can resume."""
        return self.fit(images, progress=progress)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` float32 in [-1, 1] -> ``LongTensor[B, L]`` in ``[0, V)``."""
        raise NotImplementedError

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``LongTensor[B, L]`` -> ``FloatTensor[B, C, H, W]`` in [-1, 1]."""
        raise NotImplementedError

    def code_embeddings(self) -> torch.Tensor:
        """``FloatTensor[V, D]``: the geometry of the code space — a learned
        codebook, or the implicit one of FSQ/LFQ/pixel/frequency codes. Relaxed
        acceptance rules (LANTERN) use distances in it."""
        raise NotImplementedError

    # convenience for subclasses
    def check_images(self, images: Any) -> torch.Tensor:
        return check_images(images, self.image_shape, where=f"{type(self).__name__}.encode: images")

    def check_codes(self, codes: Any) -> torch.Tensor:
        return check_codes(codes, self.layout.length, self.vocab_size, where=f"{type(self).__name__}.decode: codes")

    def check_latents(self, latents: Any) -> torch.Tensor:
        return check_latents(latents, self.layout.length, self.token_dim,
                             where=f"{type(self).__name__}.decode: latents")

    def check_tokens(self, tokens: Any, *, where: str | None = None) -> torch.Tensor:
        """Validate what :meth:`decode` takes: latents for a continuous tokenizer, codes otherwise."""
        here = where or f"{type(self).__name__}.decode"
        if self.continuous:
            return check_latents(tokens, self.layout.length, self.token_dim, where=f"{here}: latents")
        return check_codes(tokens, self.layout.length, self.vocab_size, where=f"{here}: codes")


@runtime_checkable
class MultiScaleInputs(Protocol):
    """Optional tokenizer capability (VAR): teacher-forcing inputs for the
    next-scale order.

    ``scale_inputs(codes)`` maps ``LongTensor[B, L]`` to
    ``FloatTensor[B, L - h0*w0, D]``: for every scale after the first, the
    accumulated reconstruction f̂ of all earlier scales (through the
    tokenizer's own upsampling and φ path) downsampled to that scale's grid,
    flattened row-major and concatenated over scales. ``embed_dim`` is ``D``.
    A continuous multi-scale tokenizer (``kl`` with ``scales``, FlowAR) maps
    its latents ``FloatTensor[B, L, D]`` the same way: the input of scale k
    is scale k − 1 upsampled to the latent grid and downsampled to scale k's.
    """

    embed_dim: int

    def scale_inputs(self, codes: torch.Tensor) -> torch.Tensor: ...


# ---------------------------------------------------------------------------
# What a generator receives: the backbone, the sampler chain, the RNG
# ---------------------------------------------------------------------------
#
# Core hands :meth:`Generator.generate` three objects; these protocols are
# everything a generator may use of them (core's classes are
# :class:`tokenloom.model.InstrumentedModel`, :class:`tokenloom.sampling.SamplerChain`
# and :class:`tokenloom.rng.RowRNG`; tests check that they satisfy them).


@runtime_checkable
class Cache(Protocol):
    """A preallocated KV cache from :meth:`Backbone.new_cache`.

    Every forward pass that is given the cache attends to the cached prefix
    plus its own ``T`` inputs and appends them (``length += T``) — the
    ``"append"`` cache operation. :meth:`truncate` rolls back (the
    ``"truncate"`` operation of speculative and Jacobi decoding): to one
    length for every row (an ``int``), or to a length per row
    (``LongTensor[B]``), after which the cache is *ragged* — row ``b``
    continues from ``lengths[b]``, and the backbone masks, positions and
    class-embeds every row by its own prefix. Writing past ``max_len`` is an
    :class:`~tokenloom.errors.InputError`.
    """

    #: Most tokens a row can hold.
    max_len: int
    #: Cached tokens (the longest row's when ragged).
    length: int
    #: ``LongTensor[B]`` per-row lengths once ragged, else None.
    lengths: torch.Tensor | None

    @property
    def batch_size(self) -> int:
        """``B``: rows (one per image, twice that with guidance)."""
        ...

    @property
    def ragged(self) -> bool:
        """Whether rows have their own lengths (after a per-row truncate)."""
        ...

    def row_lengths(self) -> torch.Tensor:
        """``LongTensor[B]``: every row's cached length."""
        ...

    def truncate(self, length: int | torch.Tensor) -> None:
        """Keep the first ``length`` tokens: an ``int`` for all rows, or
        ``LongTensor[B]`` one per row (each at most the row's length)."""
        ...

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only the rows ``rows`` (``LongTensor[B']``, in that order), e.g.
        to drop images that finished decoding."""
        ...

    def reset(self) -> None:
        """Empty the cache (length 0, not ragged)."""
        ...


@runtime_checkable
class Backbone(Protocol):
    """The trained transformer as a generator sees it (core's
    :class:`tokenloom.model.InstrumentedModel`). Calling it runs one forward
    pass without gradients and counts it (``nfe``, ``tokens``, ``seconds``:
    the run's cost metrics come from these counters, never from plugins).

    **Sequences.** The model was built from the generator's
    :meth:`Generator.model_spec`. Sequence index 0 of every row is the
    *conditioning prefix*, the class token: whatever input sits there is
    replaced by the embedding of condition ``cond[b]`` — a row of the run's
    condition table, built by its :class:`Conditioner` (for ``class``, the
    class id itself); a conditioner with a prefix of P > 1 positions puts the
    other P − 1 before index 0, invisibly to the generator (they are in the
    cache after its first call, outside ``cache.length``). Rows with
    ``cond[b] ==`` :attr:`null_class` are unconditional (classifier-free
    guidance runs the conditional rows and as many null-class rows in one
    batch, conditional first). Position ids are flat code positions of ``spec.layout``;
    :data:`NO_POSITION` (-1) is none (the class token).

    **Call.** ``model(inputs, cond, **keywords)`` with

    - ``inputs``: ``LongTensor[B, T]`` token ids in ``[0, spec.vocab_size)``
      (``[B, T, depth]`` stacks for a depth-head model), or
      ``FloatTensor[B, T, spec.input_dim]`` when ``spec.input_kind`` is
      ``"embeddings"``;
    - ``cond``: ``LongTensor[B]`` class ids (None: every row the null class);
    - ``positions=``: ``LongTensor[T]`` or ``[B, T]`` position id of each
      input (None: ``[-1, 0, 1, ...]`` continuing the cache);
    - ``target_positions=``: ``LongTensor[T]`` or ``[B, T]``, the position
      each input predicts — required when the spec has
      ``("target_aware", True)`` (RAR), refused otherwise;
    - ``attn_mask=``: ``BoolTensor[T, S]`` or ``[B, T, S]`` over the
      ``S = cache.length + T`` keys, True where a query may attend (None: the
      spec's ``attention`` pattern; ``"custom"`` attention needs one);
    - ``cache=``: a :class:`Cache` from :meth:`new_cache`; the inputs
      continue its sequence and are appended to it;
    - ``last_only=True``: logits of the last input only (``T`` = 1 below);
    - ``return_hidden=True``: the final hidden states ``FloatTensor[B, T, C]``
      instead of logits (for :meth:`depth_logits`);
    - ``depth_inputs=``: a depth-head model's codes ``< d`` per position
      ``LongTensor[B, T, d]`` (teacher forcing; default: the next stack).

    **Returns** ``FloatTensor[B, T, V]`` logits for a one-head spec, a tuple
    of them (one per entry of ``spec.heads``, each ``[B, T, heads[i]]``) for
    several heads or for the depths of a depth-head model.
    """

    @property
    def spec(self) -> ModelSpec:
        """The spec the model was built (and trained) for."""
        ...

    @property
    def n_classes(self) -> int:
        """Number of real conditions (classes, or rows of the condition table); ids are ``[0, n_classes)``."""
        ...

    @property
    def null_class(self) -> int:
        """The condition id of unconditional rows (``n_classes``, the null condition), for guidance."""
        ...

    @property
    def device(self) -> torch.device:
        """Where the model's weights live: put inputs and caches there."""
        ...

    def new_cache(self, batch_size: int, max_len: int | None = None) -> Cache:
        """An empty :class:`Cache` for ``batch_size`` rows of at most
        ``max_len`` tokens (default ``spec.seq_len``)."""
        ...

    def token_embeddings(self) -> torch.Tensor | None:
        """``FloatTensor[V', D']``: the input embedding table (None for an
        ``"embeddings"`` model)."""
        ...

    def __call__(self, inputs: torch.Tensor, cond: torch.Tensor | None = None, *,
                 positions: torch.Tensor | None = None, target_positions: torch.Tensor | None = None,
                 attn_mask: torch.Tensor | None = None, cache: Cache | None = None,
                 last_only: bool = False, depth_inputs: torch.Tensor | None = None,
                 return_hidden: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """One forward pass (see the class docstring for the keywords and shapes)."""
        ...

    def depth_logits(self, hidden: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A depth-head model's depth transformer (RQ-Transformer): from hidden
        states ``[B, T, C]`` of a ``return_hidden`` pass and the first ``d``
        codes of each stack ``LongTensor[B, T, d]``, the logits ``[B, T, V]``
        of depths ``0 .. d`` (a tuple of ``d + 1``). Counted as a depth step,
        not a forward pass."""
        ...

    @property
    def head(self) -> Head | None:
        """The continuous :class:`Head` the backbone was trained with (a
        ``spec.token_dim > 0`` model), None for a categorical model (its
        linear output layer gives logits for the chain)."""
        ...

    def sample_head(self, hidden: torch.Tensor, *, rng: RNG, step: int, stream: int = 0,
                    temperature: float = 1.0, guidance: float = 1.0,
                    uncond: torch.Tensor | None = None) -> torch.Tensor:
        """Continuous tokens ``[B, D]`` (``[B, k, D]``) drawn by :attr:`head`
        from hidden states ``[B, C]`` (``[B, k, C]``) of a ``return_hidden``
        pass (:meth:`Head.sample`). Counted apart from the forward passes:
        ``head_steps`` (+ ``head.steps`` per call), the tokens and the head's
        FLOPs (null rows included when guided). Generators normally call
        :func:`tokenloom.sampling.draw_continuous` (or
        :func:`tokenloom.orders.draw_tokens`, either token kind), which reads
        the chain's guidance and temperature."""
        ...


@runtime_checkable
class RNG(Protocol):
    """Per-image randomness (core's :class:`tokenloom.rng.RowRNG`): every
    number is a pure function of ``(seed, image index, step, stream,
    counter)``, so image *i* never depends on its batch neighbours, the batch
    size or the device. A generator draws all its randomness here (never
    from torch's global generator), uses a distinct ``stream`` for each
    independent use within one step, and keeps a row's draws to that row.
    Returned tensors are on :attr:`device`; move them where needed.
    """

    #: The run seed.
    seed: int
    #: ``LongTensor[B]``: the image index of each row.
    index: torch.Tensor
    #: Where the numbers are made.
    device: torch.device

    def __len__(self) -> int:
        """``B``: rows (images)."""
        ...

    def subset(self, rows: torch.Tensor | slice) -> RNG:
        """The generator of a subset of the rows, with the same per-image
        numbers (for loops that drop finished images)."""
        ...

    def uniform(self, step: int, *shape: int, stream: int = 0) -> torch.Tensor:
        """``FloatTensor[B, *shape]`` uniforms in (0, 1)."""
        ...

    def gumbel(self, step: int, *shape: int, stream: int = 0) -> torch.Tensor:
        """``FloatTensor[B, *shape]`` standard Gumbel noise."""
        ...

    def normal(self, step: int, *shape: int, stream: int = 0) -> torch.Tensor:
        """``FloatTensor[B, *shape]`` standard normal noise (continuous heads)."""
        ...

    def categorical(self, logits: torch.Tensor, step: int, *, stream: int = 0) -> torch.Tensor:
        """One draw per row from ``softmax(logits)`` (``[B, V]`` -> ``[B]``, or
        ``[B, k, V]`` -> ``[B, k]``); ``-inf`` entries are never drawn."""
        ...


@runtime_checkable
class Chain(Protocol):
    """The run's samplers as one object (core's
    :class:`tokenloom.sampling.SamplerChain`): the processors in configured
    order, at most one acceptance rule, and core's final draw. Generators
    always receive a chain (never a bare sampler or list).

    A decoding step passes the logits it wants a token from through
    :meth:`sample` (or :meth:`process` then :meth:`draw`) with a
    :class:`StepInfo`; when :attr:`needs_uncond` is True the generator must
    also run null-class rows (:attr:`Backbone.null_class`) and hand their
    logits over as ``info.uncond_logits``.
    """

    #: Every sampler of the chain, in configured order.
    samplers: list[Sampler]
    #: The processors (role ``"processor"``), in order.
    processors: list[Sampler]
    #: The acceptance rule of speculative/Jacobi decoding, or None (then the
    #: exact rule applies: :func:`tokenloom.speculative.acceptance_rule`).
    acceptance: AcceptanceRule | None

    @property
    def needs_uncond(self) -> bool:
        """Whether ``info.uncond_logits`` must be supplied (classifier-free
        guidance)."""
        ...

    @property
    def greedy(self) -> bool:
        """Whether the final draw is the argmax (a ``greedy`` processor)."""
        ...

    @property
    def depends_on_step(self) -> bool:
        """Whether a processor reads ``info.step`` / ``n_steps`` (a schedule);
        when False, loops may process many positions in one call."""
        ...

    def bind(self, context: SamplerContext) -> None:
        """Hand every sampler the run's :class:`SamplerContext` (once, before
        decoding; the pipeline does it)."""
        ...

    def process(self, logits: torch.Tensor, info: StepInfo | None = None) -> torch.Tensor:
        """The processed logits: ``[B, V]`` -> ``[B, V]`` (``[B, k, V]`` ->
        ``[B, k, V]``); the input is never modified, removed entries are
        ``-inf``. NaN or all ``-inf`` rows are an
        :class:`~tokenloom.errors.InputError` naming the step."""
        ...

    def __call__(self, logits: torch.Tensor, info: StepInfo | None = None) -> torch.Tensor:
        """The same as :meth:`process`."""
        ...

    def probs(self, logits: torch.Tensor, info: StepInfo | None = None) -> torch.Tensor:
        """The processed distribution ``[B, V]`` (one-hot at the argmax when
        greedy)."""
        ...

    def draw(self, processed: torch.Tensor, rng: RNG, step: int, *, stream: int = 0) -> torch.Tensor:
        """The final draw from processed logits: ``[B, V]`` -> ``LongTensor[B]``
        (``[B, k, V]`` -> ``[B, k]``), argmax when greedy, else a categorical
        draw with ``rng`` at ``(step, stream)``."""
        ...

    def sample(self, logits: torch.Tensor, info: StepInfo, rng: RNG, *, stream: int = 0) -> torch.Tensor:
        """:meth:`process` then :meth:`draw` at ``info.step``: one token per
        row (and position), ``LongTensor[B]`` or ``[B, k]``."""
        ...


class Generator:
    """A generation order: how a model is trained (teacher forcing) and how it
    decodes.

    ``__init__(config, *, tokenizer)`` binds the order to the tokenizer it
    decodes for and must raise :class:`~tokenloom.errors.ConfigError` when the
    tokenizer does not fit (e.g. next-scale with a single-scale layout).

    - :meth:`model_spec` — what the backbone must provide;
    - :meth:`training_batch` — teacher-forcing inputs/targets/masks from codes;
    - :meth:`generate` — decode ``B`` code sequences with ``model`` (a
      :class:`Backbone`: core's instrumented transformer, which counts
      forward passes and time itself) and ``chain`` (a :class:`Chain`: the
      run's samplers and the final draw); all randomness comes from ``rng``
      (an :class:`RNG`, seeded per image), so image *i* never depends on its
      batch neighbours;
    - :meth:`log_likelihood` — exact log p(codes | cond), when the order has one.
    """

    Config: ClassVar[type]
    supports_known: ClassVar[bool] = False
    #: Whether the order decodes continuous tokens too (a tokenizer with ``continuous = True``,
    #: a continuous :class:`Head`). The base ``__init__`` refuses a continuous tokenizer for an
    #: order that does not declare it (a :class:`~tokenloom.errors.ConfigError`).
    continuous_ok: ClassVar[bool] = False
    #: True when :meth:`log_likelihood` is an exact likelihood of the codes
    #: (raster, random, next-scale, depth-stack); masked, block and
    #: neighbour orders report none rather than a misleading number.
    exact_likelihood: ClassVar[bool] = False
    #: With ``exact_likelihood``: whether :meth:`generate` samples from ``exp(log_likelihood)`` for any
    #: model (the conformance kit checks it on a tiny untrained one). False for an order whose
    #: likelihood is that of another order (``random`` reports the raster order's): the two agree
    #: only for a model trained to be consistent across orders.
    samples_follow_likelihood: ClassVar[bool] = True

    def __init__(self, config: Any, *, tokenizer: Tokenizer):
        if getattr(tokenizer, "continuous", False) and not type(self).continuous_ok:
            from .errors import ConfigError

            raise ConfigError([(f"generator: {type(self).__name__} decodes discrete codes only; the tokenizer "
                               f"{type(tokenizer).__name__} gives continuous tokens (an order that declares "
                               "continuous_ok, e.g. 'raster', takes them)")])
        self.config = config
        self.tokenizer = tokenizer

    def model_spec(self) -> ModelSpec:
        raise NotImplementedError

    def training_batch(self, codes: torch.Tensor, cond: torch.Tensor) -> TrainBatch:
        raise NotImplementedError

    def generate(self, model: Backbone, chain: Chain, cond: torch.Tensor, *, rng: RNG,
                 known: Known | None = None) -> torch.Tensor:
        """Decode one code sequence per row of ``cond``: ``LongTensor[B, L]``
        in ``[0, tokenizer.vocab_size)``, ``L = tokenizer.layout.length``.

        ``cond``: ``LongTensor[B]`` class ids (any device; move it to
        ``model.device``). ``model``: the :class:`Backbone` trained on this
        order's :meth:`model_spec` and :meth:`training_batch`. ``chain``: the
        :class:`Chain` every drawn token goes through (run null-class rows
        when ``chain.needs_uncond``). ``rng``: the :class:`RNG` of these ``B``
        images, the only source of randomness. ``known``: codes fixed in
        advance (``supports_known`` orders; others raise
        :class:`~tokenloom.errors.InputError` when it is given). The forward
        passes taken should equal :meth:`expected_nfe` when that is not None."""
        raise NotImplementedError

    def log_likelihood(self, model: Backbone, codes: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``FloatTensor[B]``: log p(codes | cond) in nats under ``model``
        for codes ``LongTensor[B, L]`` and classes ``LongTensor[B]``; only
        meaningful when ``exact_likelihood`` is True."""
        raise NotImplementedError(f"{type(self).__name__} has no exact likelihood")

    def expected_nfe(self) -> int | None:
        """Forward passes :meth:`generate` takes per batch (the order's NFE
        formula, e.g. ``L`` for raster, ``T`` for masked), or None when it
        depends on the data (speculative orders). The conformance kit checks
        it against the instrumented backbone's count."""
        return None

    def on_train_step(self, step: int, n_steps: int) -> None:
        """Called by the trainer before each :meth:`training_batch` — for
        recipes that change over training (RAR's annealed permutation
        probability). :meth:`training_batch` may draw from torch's global
        random generator: the trainer seeds it from ``(seed, step)``."""

    # -- optional: extra models and run statistics (speculative decoding) -----

    def auxiliary_models(self, model: Any) -> dict[str, Any]:
        """Models this order needs besides the target, ``{name: ModelConfig}``
        derived from the run's ``[model]`` config ``model`` (e.g. a small
        draft model). The pipeline trains each on this generator's spec and
        teacher-forcing batches, exactly like the target, caches it by its
        own key and hands it over through :meth:`attach_models`."""
        return {}

    def auxiliary_train_steps(self, name: str, steps: int) -> int:
        """Training steps for auxiliary model ``name`` (default: the run's
        ``[train].steps``)."""
        return steps

    def attach_models(self, models: dict[str, Any]) -> None:
        """Receive the trained auxiliary models (instrumented backbones)."""

    def stats(self) -> dict[str, float]:
        """Run statistics of the :meth:`generate` calls since
        :meth:`reset_stats` (e.g. ``acceptance_rate``,
        ``mean_accepted_length``); the pipeline merges them into the run's
        stats, where metrics read them."""
        return {}

    def reset_stats(self) -> None:
        """Forget the statistics gathered so far."""


class Sampler:
    """A logits processor: ``processor(logits, info) -> new logits``.

    Subclasses implement :meth:`process`; ``__call__`` validates the input
    (NaN or all ``-inf`` rows are an :class:`~tokenloom.errors.InputError`
    naming the step) and calls it. A processor must never modify its input
    tensor — acceptance rules compare the processed distributions, and
    in-place filtering would silently corrupt them. Removed entries are
    ``-inf``; at least one entry per row stays finite.

    Class attributes: ``needs_uncond`` (the generator must supply
    ``info.uncond_logits``: classifier-free guidance), ``greedy`` (the chain's
    final draw is argmax instead of a categorical draw), ``role``
    (``"processor"`` or ``"acceptance"``), and ``transform``, what the
    processor does to the logits (the conformance kit checks it):

    - ``"truncate"`` (default): removes entries (sets them to ``-inf``) and
      leaves the kept ones unchanged; the largest entry is kept, and so is
      every entry larger than a kept one (top-k, top-p, min-p, greedy);
    - ``"select"``: removes entries and leaves the kept ones unchanged, but
      may drop the largest (typical sampling);
    - ``"rescale"``: multiplies each row by a positive number (temperature);
    - ``"guide"``: combines ``logits`` with ``info.uncond_logits`` so that
      identical conditional and unconditional logits come back unchanged
      (classifier-free guidance);
    - ``"other"``: none of these; the kit checks only the shape contract.
    """

    Config: ClassVar[type]
    role: ClassVar[str] = "processor"
    transform: ClassVar[str] = "truncate"
    needs_uncond: ClassVar[bool] = False
    greedy: ClassVar[bool] = False
    #: Whether the sampler means something for a continuous :class:`Head` (diffusion, flow): then
    #: it implements :meth:`continuous_setting`. Only guidance (``cfg``) and ``temperature`` do; a
    #: chain holding any other sampler with a continuous head is a ConfigError at build time.
    continuous_ok: ClassVar[bool] = False

    def __init__(self, config: Any):
        self.config = config

    def continuous_setting(self, info: StepInfo) -> dict[str, float]:
        """What the sampler does to a continuous head at the step ``info``:
        ``{"guidance": s}`` (classifier-free guidance of the head's
        prediction, ``u + s·(c − u)``) and/or ``{"temperature": t}`` (the
        head's noise scale). Only ``continuous_ok`` samplers implement it."""
        raise NotImplementedError(f"{type(self).__name__} does not apply to continuous tokens")

    def bind(self, context: SamplerContext) -> None:
        """Called once per run before decoding."""

    def depends_on_step(self) -> bool:
        """Whether :meth:`process` reads ``info.step`` / ``n_steps`` /
        ``progress`` (a schedule). Loops that process many positions at once
        (speculative and Jacobi decoding) call a chain without step-dependent
        processors once for all of them instead of once per position. The
        default, True, is always safe; the conformance kit checks a False."""
        return True

    def process(self, logits: torch.Tensor, info: StepInfo) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, logits: torch.Tensor, info: StepInfo | None = None) -> torch.Tensor:
        info = info if info is not None else StepInfo()
        check_logits(logits, info, where=f"{type(self).__name__}: logits")
        return self.process(logits, info)


class AcceptanceRule(Sampler):
    """How speculative/Jacobi decoding accepts a drafted token (a sampler of
    role ``"acceptance"``; a chain holds at most one; ``exact`` is the default).

    ``p`` is the target's and ``q`` the draft's *processed* distribution
    (``FloatTensor[B, V]``, after the chain), ``drafted`` the drafted tokens
    ``LongTensor[B]`` and ``u`` uniforms ``FloatTensor[B]``.
    ``accept`` returns ``BoolTensor[B]``; ``residual(p, q, drafted)`` returns
    the distribution ``[B, V]`` to resample from on rejection (exact rule:
    ``norm(max(p - q, 0))``). As a processor it is the identity. Rules that
    need geometry read it in :meth:`bind` (``code_embeddings`` for LANTERN,
    ``token_embeddings`` for GSD).

    Exactness (checked by the conformance kit on small enumerable cases):
    drafting ``x ~ q``, accepting it, else resampling from the residual must
    give exactly ``p``. A *relaxed* rule (LANTERN, GSD) declares
    ``exact_settings``, the config values that switch its relaxation off
    (where it must be exact), and :meth:`neighbourhood`, the tokens whose
    target mass it may move onto a draft: the probability of accepting a
    draft ``x`` (``q(x)`` times the chance of acceptance) never exceeds ``p``
    of its neighbourhood, and a draft whose neighbourhood holds no other
    token with mass under p or q is decided exactly.
    """

    role: ClassVar[str] = "acceptance"
    transform: ClassVar[str] = "identity"
    #: None: the rule is exact. Otherwise the rule relaxes acceptance, and these config values
    #: (e.g. ``{"delta": 0.0}``) switch the relaxation off.
    exact_settings: ClassVar[Mapping[str, Any] | None] = None

    def neighbourhood(self, p: torch.Tensor, drafted: torch.Tensor) -> torch.Tensor:
        """``BoolTensor[B, V]``: the tokens whose target probability the rule
        may move onto each row's drafted token (always including the draft).
        An exact rule moves none: the draft alone."""
        out = torch.zeros_like(p, dtype=torch.bool)
        return out.scatter_(-1, drafted[:, None], True)

    def process(self, logits: torch.Tensor, info: StepInfo) -> torch.Tensor:
        return logits.clone()

    def depends_on_step(self) -> bool:
        return False

    def accept(self, p: torch.Tensor, q: torch.Tensor, drafted: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def residual(self, p: torch.Tensor, q: torch.Tensor, drafted: torch.Tensor | None = None) -> torch.Tensor:
        """Distribution ``[B, V]`` to resample from after rejecting ``drafted``
        (rules whose relaxed target depends on the drafted token use it)."""
        raise NotImplementedError


def _values_mapping(value: Any) -> dict[str, float | None]:
    if not isinstance(value, Mapping):
        raise TypeError("MetricResult.values must be a mapping {key: float or None}, got "
                        f"{type(value).__name__}")
    return dict(value)


def _card_dict(value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"MetricResult.card must be a mapping (the eval card), got {type(value).__name__}")
    return dict(value)


@attrs.frozen
class MetricResult:
    """What :meth:`Metric.compute` returns: ``values`` ``{key: float or None}``
    (None for "not applicable", never a made-up number) and ``card``, the eval
    card — a JSON-able dict of the protocol behind those numbers (backend,
    extractor and weights hash, reference set, sample counts, device, ...), so
    that two numbers are comparable exactly when their cards match."""

    values: dict[str, float | None] = attrs.field(converter=_values_mapping)
    card: dict[str, Any] = attrs.field(converter=_card_dict)


class Metric:
    """A number (or several) computed at the end of a run.

    ``requires`` names what :meth:`compute` reads from the
    :class:`MetricContext`: any of ``"real"``, ``"generated"``, ``"codes"``,
    ``"reconstructed"``, ``"stats"``, ``"tokenizer"``, ``"model"``.
    :meth:`compute` returns a :class:`MetricResult`: the numbers together with
    their eval card, built with :meth:`card` — nothing is kept on the metric
    between two calls::

        def compute(self, ctx):
            n = len(ctx.generated)
            return MetricResult({"mine": ...}, self.card(n_generated=n, device=ctx.device))
    """

    Config: ClassVar[type]
    requires: ClassVar[frozenset[str]] = frozenset()
    #: the ``"metric"`` entry of the eval cards (``None``: the class name)
    card_name: ClassVar[str | None] = None

    def __init__(self, config: Any):
        self.config = config

    def compute(self, ctx: MetricContext) -> MetricResult:
        raise NotImplementedError

    def card(self, **protocol: Any) -> dict[str, Any]:
        """An eval card: ``{"metric": card_name, **protocol}`` — ``protocol``
        holds everything the numbers depend on besides the images (JSON-able
        values). Without ``protocol``, the metric's configuration stands for
        it: ``{"metric": ..., "config": attrs.asdict(config)}``."""
        name = type(self).card_name or type(self).__name__
        if not protocol:
            return {"metric": name, "config": attrs.asdict(self.config)}
        return {"metric": name, **protocol}


# ---------------------------------------------------------------------------
# Conditioners
# ---------------------------------------------------------------------------


@attrs.frozen
class Condition:
    """One image's condition: a class ``label`` (an index into the data set's
    class names), a ``caption`` (free text), or both. ``Condition()`` (neither)
    is the *null* condition: what an unconditional row reads."""

    label: int | None = None
    caption: str | None = None


@attrs.frozen
class Prefix:
    """What the backbone reads for ``N`` conditions: ``P`` prefix positions per row.

    - ``ids``: ``LongTensor[N, P]`` in ``[0, Conditioner.prefix_vocab)`` (a
      conditioner of ``prefix_kind = "tokens"``; the backbone embeds them with
      a table of its own, trained with it), or
    - ``embeddings``: ``FloatTensor[N, P, prefix_dim]`` (``prefix_kind =
      "embeddings"``: e.g. a frozen text encoder's hidden states; the backbone
      projects them to its width with a trained linear map);
    - ``mask``: ``BoolTensor[N, P]``, True where a position is real (False:
      padding, which no query attends to). The *last* position of every row
      must be real: it takes sequence index 0 of the generator's sequence (the
      slot the class token had), the other ``P - 1`` positions precede it.
    """

    mask: torch.Tensor
    ids: torch.Tensor | None = None
    embeddings: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.mask.shape[0])

    @property
    def length(self) -> int:
        """P: the number of prefix positions of a row."""
        return int(self.mask.shape[1])

    def rows(self, index: torch.Tensor | slice) -> Prefix:
        """The rows ``index`` of this prefix."""
        pick = (lambda t: None if t is None else t[index])
        return Prefix(mask=self.mask[index], ids=pick(self.ids), embeddings=pick(self.embeddings))

    @staticmethod
    def cat(parts: list[Prefix]) -> Prefix:
        """The rows of ``parts`` one after another (same kind and P)."""
        ids = None if parts[0].ids is None else torch.cat([p.ids for p in parts])
        emb = None if parts[0].embeddings is None else torch.cat([p.embeddings for p in parts])
        return Prefix(mask=torch.cat([p.mask for p in parts]), ids=ids, embeddings=emb)


class Conditioner(nn.Module):
    """Turns conditions (:class:`Condition`: class labels, captions) into the
    :class:`Prefix` the backbone reads, and gives the *null* condition that
    classifier-free guidance and condition dropout use.

    Generators never see a conditioner: they pass ``cond: LongTensor[B]``,
    an index into the run's *condition table* (the encoded training
    conditions while training, the encoded prompts while generating), and
    ``Backbone.null_class`` (the table's last row, the null condition) for
    unconditional rows. Core builds the table with :meth:`encode` and
    :meth:`null` and hands it to the backbone, so every generation order
    works with every conditioner.

    Built as ``cls(config, *, n_classes=..., class_names=...)`` (the data
    set's classes). Class attributes / properties a subclass sets:

    - ``prefix_kind``: ``"tokens"`` (``Prefix.ids``) or ``"embeddings"``;
    - ``prefix_len`` (P), and ``prefix_vocab`` (tokens) or ``prefix_dim``
      (embeddings) — known after :meth:`fit`;
    - ``needs``: which fields of a :class:`Condition` it reads
      (``{"label"}``, ``{"caption"}``).

    Methods: :meth:`fit` (from the training conditions, e.g. a caption
    vocabulary; default: nothing), :meth:`encode`, :meth:`null`, and
    :meth:`state` / :meth:`load_state` (JSON-able, saved beside the trained
    model so a finished run can be sampled from again). Must be deterministic
    and batch-independent (a row's prefix depends on its condition only); a
    condition it cannot read is an :class:`~tokenloom.errors.InputError`.
    """

    Config: ClassVar[type]
    prefix_kind: ClassVar[str] = "tokens"
    needs: ClassVar[frozenset[str]] = frozenset({"label"})

    def __init__(self, config: Any, *, n_classes: int = 1, class_names: tuple[str, ...] = ()):
        super().__init__()
        self.config = config
        self.n_classes = int(n_classes)
        self.class_names = tuple(class_names)

    @property
    def prefix_len(self) -> int:
        raise NotImplementedError

    @property
    def prefix_vocab(self) -> int:
        """Size of the prefix vocabulary (``prefix_kind = "tokens"``)."""
        raise NotImplementedError

    @property
    def prefix_dim(self) -> int:
        """Width of the prefix embeddings (``prefix_kind = "embeddings"``)."""
        raise NotImplementedError

    def fit(self, conditions: list[Condition]) -> None:
        """Learn what encoding needs from the training conditions (default: nothing)."""

    def encode(self, conditions: list[Condition]) -> Prefix:
        """The prefix of each condition (``N = len(conditions)`` rows)."""
        raise NotImplementedError

    def null(self) -> Prefix:
        """The null condition's prefix (one row), distinct from every real one."""
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """What :meth:`fit` learned, JSON-able (default: nothing)."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state` returned."""

    def describe(self, condition: Condition) -> str:
        """A short human-readable name of ``condition`` (grid labels, reports)."""
        if condition.caption is not None:
            return condition.caption
        if condition.label is None:
            return "(null)"
        names = self.class_names
        return names[condition.label] if 0 <= condition.label < len(names) else str(condition.label)


# ---------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------


class Head(nn.Module):
    """What turns the backbone's hidden state into a token: the head models
    ``p(token | hidden)`` for one position.

    Built as ``cls(config, hidden_dim=C, token_dim=D, vocab_size=V)`` (C the
    backbone width ``[model] d_model``; D the tokenizer's ``token_dim``, 0
    for discrete codes; V its ``vocab_size``, 0 for continuous tokens). The
    backbone owns the head (``Transformer.head``): it is trained jointly
    with it and saved in the same checkpoint. The run's ``[head]`` table
    picks it (default ``categorical``).

    Class attributes:

    - ``continuous``: the token kind it models — True: ``FloatTensor[.., D]``
      (needs a continuous tokenizer), False: codes in ``[0, V)``. A head
      on the other kind of tokenizer is a ConfigError at build time;
    - ``exact_likelihood``: whether :meth:`log_likelihood` is exact (the
      categorical head). Diffusion and flow heads have none: the run then
      reports no held-out NLL (None, never a made-up number).

    Methods (``N`` tokens, any leading shape ``..`` allowed where noted):

    - :meth:`loss` ``(hidden [N, C], targets [N, D] or LongTensor[N]) ->
      FloatTensor[N]``: the per-token training loss (its own noise drawn
      from torch's global generator, which the trainer seeds per step);
    - :meth:`sample` ``(hidden [B, C] or [B, k, C], *, rng, step, stream,
      temperature, guidance, uncond) -> [B, D] / [B, k, D]`` (ids ``[B]`` /
      ``[B, k]`` for a discrete head): the tokens drawn for ``B`` images.
      ALL randomness comes from ``rng`` (an :class:`RNG` of the ``B`` rows,
      at ``(step, stream)``), so image *i* depends only on ``(seed, i)``:
      never on its batch neighbours or the batch size. ``guidance`` s with
      ``uncond`` (the null-condition rows' hidden states, same shape): the
      head's prediction is ``u + s·(c − u)`` at every step of its own loop
      (MAR guides the denoiser's ε). ``temperature``: the head's noise scale;
    - :attr:`steps`: head network evaluations per sampled token (diffusion:
      sampling steps; flow: Euler steps; categorical: 1) — core counts them
      apart from the backbone's passes (NFE);
    - :meth:`eval_flops`: FLOPs of one evaluation of the head's network for
      one token (2 per multiply-add); :meth:`train_flops_per_token` and
      :meth:`sample_flops_per_token` (per token, one row) derive from it.

    Bad inputs (a hidden state of the wrong width, targets of the wrong
    kind/width, NaN) are an :class:`~tokenloom.errors.InputError` naming the
    head and argument (:meth:`check_hidden`, :meth:`check_targets`).
    """

    Config: ClassVar[type]
    continuous: ClassVar[bool] = True
    exact_likelihood: ClassVar[bool] = False

    def __init__(self, config: Any, *, hidden_dim: int, token_dim: int = 0, vocab_size: int = 0):
        super().__init__()
        from .errors import ConfigError

        name = type(self).__name__
        if int(hidden_dim) < 1:
            raise ConfigError([f"head: {name} needs hidden_dim >= 1 (the backbone width), got {hidden_dim}"])
        if self.continuous and int(token_dim) < 1:
            raise ConfigError([(f"head: {name} models continuous tokens and needs a continuous tokenizer "
                               f"(token_dim >= 1); got token_dim {token_dim} (a discrete tokenizer: use "
                               "head = 'categorical')")])
        if not self.continuous and (int(vocab_size) < 1 or int(token_dim) > 0):
            raise ConfigError([(f"head: {name} models discrete codes and needs a discrete tokenizer "
                               f"(vocab_size >= 1, token_dim 0); got vocab_size {vocab_size}, token_dim "
                               f"{token_dim} (continuous tokens: use head = 'diffusion' or 'flow')")])
        self.config = config
        self.hidden_dim = int(hidden_dim)
        self.token_dim = int(token_dim)
        self.vocab_size = int(vocab_size)

    @property
    def steps(self) -> int:
        """Head network evaluations per sampled token."""
        return 1

    #: Head network evaluations per token in one training step (MAR's ``diffusion_batch_mul``).
    train_evals: int = 1

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``FloatTensor[N]``: the training loss of each token."""
        raise NotImplementedError

    def sample(self, hidden: torch.Tensor, *, rng: RNG, step: int, stream: int = 0,
               temperature: float = 1.0, guidance: float = 1.0,
               uncond: torch.Tensor | None = None) -> torch.Tensor:
        """Draw one token per row (and position) of ``hidden``; see the class docstring."""
        raise NotImplementedError

    def log_likelihood(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``FloatTensor[N]``: exact log p(target | hidden) in nats (``exact_likelihood`` heads only)."""
        raise NotImplementedError(f"{type(self).__name__} has no exact likelihood")

    def eval_flops(self) -> int:
        """FLOPs of one evaluation of the head's network for one token (2 per
        multiply-add of its matrices; default: 2 × its parameter count)."""
        return 2 * sum(p.numel() for p in self.parameters())

    def train_flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward = 3 × forward, for
        each of the :attr:`train_evals` evaluations)."""
        return 3 * self.train_evals * self.eval_flops()

    def sample_flops_per_token(self) -> int:
        """Sampling FLOPs per token of one row (:attr:`steps` evaluations;
        guidance runs the null rows too, which core counts as rows)."""
        return self.steps * self.eval_flops()

    # -- input checks ---------------------------------------------------------

    def check_hidden(self, hidden: Any, *, where: str = "hidden") -> torch.Tensor:
        """``hidden``: a float tensor ``[.., C]`` with finite values, else :class:`InputError`."""
        here = f"{type(self).__name__}: {where}"
        if not isinstance(hidden, torch.Tensor) or not hidden.dtype.is_floating_point:
            got = hidden.dtype if isinstance(hidden, torch.Tensor) else type(hidden).__name__
            raise InputError(f"{here}: expected a float tensor [.., {self.hidden_dim}], got {got}")
        if hidden.dim() < 1 or hidden.shape[-1] != self.hidden_dim:
            raise InputError(f"{here}: expected width {self.hidden_dim} (the backbone's d_model), "
                             f"got shape {tuple(hidden.shape)}")
        if hidden.numel() and not torch.isfinite(hidden).all():
            raise InputError(f"{here}: NaN or infinite values")
        return hidden

    def check_targets(self, targets: Any, hidden: torch.Tensor, *, where: str = "targets") -> torch.Tensor:
        """Targets matching ``hidden [.., C]``: ``[.., D]`` finite floats for a
        continuous head, ``LongTensor[..]`` in ``[0, V)`` for a discrete one."""
        here = f"{type(self).__name__}: {where}"
        if not isinstance(targets, torch.Tensor):
            raise InputError(f"{here}: expected a torch.Tensor, got {type(targets).__name__}")
        lead = tuple(hidden.shape[:-1])
        if self.continuous:
            if not targets.dtype.is_floating_point:
                raise InputError(f"{here}: expected continuous tokens (a float tensor [.., {self.token_dim}]), "
                                 f"got {targets.dtype} — discrete codes given to a continuous head?")
            if tuple(targets.shape) != (*lead, self.token_dim):
                raise InputError(f"{here}: expected shape {(*lead, self.token_dim)}, got {tuple(targets.shape)}")
            if targets.numel() and not torch.isfinite(targets).all():
                raise InputError(f"{here}: NaN or infinite values")
            return targets
        if targets.dtype.is_floating_point or targets.dtype == torch.bool:
            raise InputError(f"{here}: expected integer codes, got {targets.dtype}")
        if tuple(targets.shape) != lead:
            raise InputError(f"{here}: expected shape {lead}, got {tuple(targets.shape)}")
        if targets.numel() and (targets.min() < 0 or targets.max() >= self.vocab_size):
            raise InputError(f"{here}: codes must lie in [0, {self.vocab_size})")
        return targets.long()

    def check_uncond(self, uncond: Any, hidden: torch.Tensor, guidance: float) -> torch.Tensor | None:
        """The null rows for guidance: required (same shape as ``hidden``) when ``guidance != 1``."""
        if guidance == 1.0 and uncond is None:
            return None
        if uncond is None:
            raise InputError(f"{type(self).__name__}: guidance {guidance} needs uncond= (the hidden states of "
                             "the null-condition rows)")
        uncond = self.check_hidden(uncond, where="uncond")
        if uncond.shape != hidden.shape:
            raise InputError(f"{type(self).__name__}: uncond {tuple(uncond.shape)} does not match hidden "
                             f"{tuple(hidden.shape)}")
        return uncond


BASES: dict[str, type] = {
    "tokenizer": Tokenizer,
    "generator": Generator,
    "sampler": Sampler,
    "metric": Metric,
    "conditioner": Conditioner,
    "head": Head,
}


__all__ = [
    "BASES",
    "KINDS",
    "NO_POSITION",
    "RNG",
    "AcceptanceRule",
    "Backbone",
    "Cache",
    "Chain",
    "Condition",
    "Conditioner",
    "Generator",
    "Head",
    "Known",
    "Metric",
    "MetricContext",
    "MetricResult",
    "ModelSpec",
    "MultiScaleInputs",
    "Prefix",
    "Sampler",
    "SamplerContext",
    "StepInfo",
    "TokenLayout",
    "Tokenizer",
    "TrainBatch",
    "check_codes",
    "check_images",
    "check_latents",
    "check_logits",
    "read_stat",
]
