"""Building blocks shared by the generation-order plugins.

The orders that decode several tokens per forward pass (``next-block``,
``next-cell``, ``par``, ``neighboring``, ``zipar``, ``random-parallel``,
...) repeat a few pieces that belong in core rather than in any one plugin:

- :func:`grid_of` — the single-scale ``(h, w, depth)`` of a tokenizer's
  layout, or a :class:`~tokenloom.errors.ConfigError` naming the order;
- :func:`guidance_rows` / :func:`sample_codes` — classifier-free guidance
  rows batched with the conditional ones, and the chain's draw for ``k``
  positions of every image at once; :func:`draw_tokens` — the same draw for
  either token kind (codes through the chain, continuous tokens through the
  run's head with the chain's guidance and temperature);
- :func:`check_known` — validation of ``known=`` inputs;
- :class:`GroupOrder` — *next-group prediction*: the flat codes are put in a
  decoding order and cut into equal groups; every token of group g predicts
  the token at the same offset of group g + 1, attention is causal between
  groups and bidirectional inside one (NBP's next-block prediction, and the
  k×k cells of xAR's next-cell prediction — with continuous tokens too);
- :class:`ScaleOrder` — VAR's next-scale prediction over a multi-scale
  layout (block-causal over scales, embeddings of the earlier scales as
  teacher-forcing inputs, one pass per scale), shared by ``next-scale`` and
  ``next-frequency``; with continuous tokens it is FlowAR's order;
- :class:`MaskedCache` — an append-only KV cache whose keys carry a grid
  position and a validity flag, for decoding loops that must hide stale
  entries (a ZipAR stand-in token, a RandAR query re-fed with its token)
  through an explicit attention mask instead of rewriting the cache.

Everything here is deterministic and free of randomness: samples come from
the run's :class:`~tokenloom.rng.RowRNG` through the sampler chain.
"""

from __future__ import annotations

from typing import Any

import torch

from ..contract.errors import ConfigError, InputError
from ..contract.interfaces import (
    NO_POSITION,
    RNG,
    Backbone,
    Chain,
    Known,
    ModelSpec,
    MultiScaleInputs,
    StepInfo,
    TokenLayout,
    TrainBatch,
    check_codes,
    check_latents,
)

# ---------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------


def grid_of(tokenizer: Any, who: str, *, allow_depth: bool = True) -> tuple[int, int, int]:
    """``(h, w, depth)`` of a single-scale layout; a :class:`ConfigError`
    naming ``who`` for multi-scale layouts (and for residual depth when
    ``allow_depth`` is False)."""
    layout = tokenizer.layout
    if layout.n_scales != 1:
        raise ConfigError(
            f"{who} needs a single-scale token grid, but tokenizer {type(tokenizer).__name__} has "
            f"{layout.n_scales} scales {list(layout.scales)} (use next-scale for multi-scale tokenizers)")
    if not allow_depth and layout.depth != 1:
        raise ConfigError(
            f"{who} needs one code per grid position, but tokenizer {type(tokenizer).__name__} has residual "
            f"depth {layout.depth} (use depth-stack for residual stacks)")
    h, w = layout.scales[0]
    return h, w, layout.depth


def scales_of(tokenizer: Any, who: str, *, inputs: bool = False, depth_one: bool = False) -> TokenLayout:
    """The multi-scale layout of ``tokenizer``; a :class:`ConfigError` naming
    ``who`` when it has a single scale, when ``inputs`` is asked for and it
    does not provide VAR's teacher-forcing inputs (the
    :class:`~tokenloom.MultiScaleInputs` protocol), or when ``depth_one`` is
    asked for and it has residual depth."""
    layout = tokenizer.layout
    name = type(tokenizer).__name__
    if layout.n_scales < 2:
        hint = ("tokenizer 'kl' with scales, e.g. scales = [1, 2, 4]" if getattr(tokenizer, "continuous", False)
                else "tokenizer 'multiscale'")
        raise ConfigError(f"{who} needs a multi-scale tokenizer, but {name} has a single scale "
                          f"{list(layout.scales)} (use {hint})")
    if inputs and not isinstance(tokenizer, MultiScaleInputs):
        raise ConfigError(f"{who} needs VAR's teacher-forcing inputs (the MultiScaleInputs protocol: "
                          f"scale_inputs() and embed_dim), which tokenizer {name} does not provide")
    if depth_one and layout.depth != 1:
        raise ConfigError(f"{who} needs depth 1, got residual depth {layout.depth}")
    return layout


def flat_index(h: int, w: int, depth: int) -> torch.Tensor:
    """``LongTensor[h, w, depth]``: the flat code position of (row, col, d)
    (row-major, depth minor — :class:`tokenloom.TokenLayout`'s order)."""
    return torch.arange(h * w * depth).reshape(h, w, depth)


# ---------------------------------------------------------------------------
# Guidance rows and the draw
# ---------------------------------------------------------------------------


def guidance_rows(cond: torch.Tensor, chain: Chain, model: Backbone) -> tuple[torch.Tensor, bool]:
    """The class rows a decoding loop feeds: ``cond`` alone, or ``cond``
    followed by as many null-class rows when the chain needs unconditional
    logits (classifier-free guidance in one batched pass)."""
    guided = bool(chain.needs_uncond)
    rows = torch.cat([cond, torch.full_like(cond, model.null_class)]) if guided else cond
    return rows, guided


def sample_codes(chain: Chain, logits: torch.Tensor, rng: RNG, *, B: int, guided: bool, step: int, n_steps: int,
                 positions: torch.Tensor, scale: int | None = None, n_scales: int | None = None) -> torch.Tensor:
    """Process ``logits`` (``[rows, k, V]``: the conditional rows first, then
    the unconditional ones when ``guided``) through the chain and draw one
    code per row and position: ``LongTensor[B, k]``. ``positions`` is
    ``[B, k]`` (flat code positions, for the samplers' ``StepInfo``)."""
    info = StepInfo(step=step, n_steps=n_steps, positions=positions, scale=scale, n_scales=n_scales,
                    uncond_logits=logits[B:] if guided else None)
    return chain.sample(logits[:B], info, rng)


def draw_tokens(model: Backbone, chain: Chain, out: torch.Tensor, rng: RNG, *, B: int, guided: bool,
                info: StepInfo) -> torch.Tensor:
    """The one draw of a decoding loop for either token kind. ``out`` is what
    the pass returned for the ``k`` positions being decoded, the conditional
    rows first, then (``guided``) as many unconditional ones: logits
    ``[R, k, V]`` for a discrete model — processed by the chain and drawn,
    ``LongTensor[B, k]`` — or hidden states ``[R, k, C]`` for a continuous
    one (``model.spec.token_dim > 0``, from ``return_hidden=True``) — the
    run's head draws ``FloatTensor[B, k, D]`` with the chain's guidance and
    temperature (:func:`tokenloom.sampling.draw_continuous`). ``info``
    describes the step (its ``fraction``, when set, drives the guidance
    schedules, as MAR ramps its guidance over the decoded tokens)."""
    if not model.spec.continuous:
        info.uncond_logits = out[B:] if guided else None
        return chain.sample(out[:B], info, rng)
    return _draw_continuous(model, chain, out[:B], out[B:] if guided else None, rng, info)


def _draw_continuous(model: Backbone, chain: Chain, hidden: torch.Tensor, uncond: torch.Tensor | None, rng: RNG,
                     info: StepInfo) -> torch.Tensor:
    # the heads' draw (guidance, temperature, head steps counted)
    from .sampling import draw_continuous

    return draw_continuous(model, chain, hidden, rng, info=info, uncond_hidden=uncond)


def refuse_known(name: str, known: Known | None, *, instead: str = "'random' or 'masked' to inpaint") -> None:
    """The :class:`~tokenloom.errors.InputError` of an order without
    ``supports_known`` that was given ``known=`` (``instead``: what to use)."""
    if known is not None:
        raise InputError(f"{name} does not support known= (use {instead})")


def check_known(known: Known, B: int, L: int, V: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated ``(codes [B, L], mask [B, L])`` of a :class:`Known`."""
    codes = check_codes(known.codes, L, V, where="known.codes").to(device)
    mask = known.mask
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (B, L):
        raise InputError(f"known.mask: expected a BoolTensor [{B}, {L}], got "
                         f"{getattr(mask, 'dtype', type(mask))} {tuple(getattr(mask, 'shape', ()))}")
    if codes.shape[0] != B:
        raise InputError(f"known.codes: expected {B} rows (one per image), got {codes.shape[0]}")
    return codes, mask.to(device)


def check_known_latents(known: Known, B: int, L: int, D: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated ``(latents [B, L, D], mask [B, L])`` of a :class:`Known`
    holding continuous tokens (``known.codes`` is then a float tensor)."""
    latents = check_latents(known.codes, L, D, where="known.codes").to(device)
    mask = known.mask
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (B, L):
        raise InputError(f"known.mask: expected a BoolTensor [{B}, {L}], got "
                         f"{getattr(mask, 'dtype', type(mask))} {tuple(getattr(mask, 'shape', ()))}")
    if latents.shape[0] != B:
        raise InputError(f"known.codes: expected {B} rows (one per image), got {latents.shape[0]}")
    return latents, mask.to(device)


# ---------------------------------------------------------------------------
# Next-group prediction (NBP blocks, xAR-style cells)
# ---------------------------------------------------------------------------


class GroupOrder:
    """Next-group prediction over a fixed decoding order.

    ``order``: ``LongTensor[L]``, the flat code positions in decoding order;
    ``group``: codes per group (``L % group == 0``). With ``G = L / group``
    groups and ``V`` the tokenizer vocabulary, the teacher-forcing sequence
    (``T = L + 1``) is::

        index 0                      the class token (no position)
        index 1 + o                  START (id V) at the position of group 0, offset o
        index 1 + g·n + o  (g >= 1)  the code of group g - 1, offset o, at its position

    and the target at index ``1 + g·n + o`` is the code of group ``g``,
    offset ``o``: each token predicts the token at the same offset of the
    next group, and the START block (learned, one id, told apart by its
    positions) predicts the first group. Attention is block-causal with
    blocks ``(1, n, n, ..., n)`` — causal between groups, bidirectional
    inside — so decoding takes ``G`` forward passes with a KV cache.

    ``token_dim = D > 0``: continuous tokens (``FloatTensor[B, L, D]``). The
    inputs are then embeddings ``[B, L + 1, D + 1]`` — each token plus a
    START flag channel (the START block is zeros with the flag set) — the
    targets the tokens ``[B, L + 1, D]``, the spec has ``heads = ()`` and
    ``token_dim = D``, and decoding draws each group's tokens with the run's
    head from the pass's hidden states (:func:`draw_tokens`).
    """

    def __init__(self, order: torch.Tensor, group: int, *, vocab_size: int, layout: Any, train_order: str,
                 token_dim: int = 0):
        L = order.numel()
        if group < 1 or L % group:
            raise ConfigError(f"group size {group} does not divide the {L} codes")
        self.order = order.long()
        self.n = group
        self.G = L // group
        self.L = L
        self.V = 0 if token_dim else vocab_size
        self.start_id = vocab_size
        self.layout = layout
        self.train_order = train_order
        self.D = int(token_dim)  # 0: discrete codes; D: continuous tokens of width D

    def block_sizes(self) -> tuple[int, ...]:
        return (1,) + (self.n,) * self.G

    def model_spec(self, **extra: Any) -> ModelSpec:
        if self.D:  # continuous: inputs are the tokens plus a START flag channel, a head reads the output
            return ModelSpec(
                seq_len=self.L + 1,
                vocab_size=0,
                heads=(),
                train_order=self.train_order,
                input_kind="embeddings",
                input_dim=self.D + 1,
                attention="block-causal",
                cache_ops=frozenset({"append"}),
                extra=tuple(sorted({"block_sizes": self.block_sizes(), **extra}.items())),
                layout=self.layout,
                token_dim=self.D,
            )
        return ModelSpec(
            seq_len=self.L + 1,
            vocab_size=self.V + 1,
            n_extra_tokens=1,
            heads=(self.V,),
            train_order=self.train_order,
            attention="block-causal",
            cache_ops=frozenset({"append"}),
            extra=tuple(sorted({"block_sizes": self.block_sizes(), **extra}.items())),
            layout=self.layout,
        )

    def positions(self, device: Any) -> torch.Tensor:
        """``LongTensor[L + 1]``: the grid position of every input."""
        order = self.order.to(device)
        none = torch.full((1,), NO_POSITION, dtype=torch.long, device=device)
        return torch.cat([none, order[: self.n], order[: self.L - self.n]])

    def start_block(self, rows: int, device: Any) -> torch.Tensor:
        """The inputs of the START block, which predicts group 0: ``LongTensor[rows, n]`` of the START
        id, or for continuous tokens ``FloatTensor[rows, n, D + 1]`` — zeros with the START flag (the
        last channel) set, so the input projection learns the START token."""
        if not self.D:
            return torch.full((rows, self.n), self.start_id, dtype=torch.long, device=device)
        start = torch.zeros(rows, self.n, self.D + 1, device=device)
        start[..., self.D] = 1.0
        return start

    def token_inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        """Continuous tokens ``[B, k, D]`` as inputs ``[B, k, D + 1]`` (the START flag clear)."""
        return torch.cat([tokens.float(), torch.zeros_like(tokens[..., :1], dtype=torch.float32)], -1)

    def training_batch(self, codes: torch.Tensor, cond: torch.Tensor, *,
                       context_noise: bool = False) -> TrainBatch:
        """Teacher forcing over the groups (see the class docstring). For continuous tokens
        (``FloatTensor[B, L, D]``) the targets are the tokens and ``context_noise`` is xAR's
        *noisy context learning*: every group fed as context is replaced by ``t·x + (1 − t)·ε``
        with its own ``t ~ U(0, 1)`` per image and group (torch's global generator, seeded by the
        trainer), so the model learns to continue from imperfect context."""
        if self.D:
            return self._continuous_batch(codes, cond, context_noise)
        B = codes.shape[0]
        dev = codes.device
        x = codes.gather(1, self.order.to(dev).expand(B, self.L))  # (B, L) codes in decoding order
        start = torch.full((B, self.n), self.start_id, dtype=torch.long, device=dev)
        inputs = torch.cat([torch.zeros_like(x[:, :1]), start, x[:, : self.L - self.n]], 1)  # (B, L + 1)
        targets = torch.cat([torch.zeros_like(x[:, :1]), x], 1)
        loss_mask = torch.ones_like(targets, dtype=torch.bool)
        loss_mask[:, 0] = False
        return TrainBatch(inputs=inputs, targets=targets, loss_mask=loss_mask, cond=cond.long(),
                          positions=self.positions(dev))

    def _continuous_batch(self, tokens: torch.Tensor, cond: torch.Tensor, context_noise: bool) -> TrainBatch:
        B = tokens.shape[0]
        dev = tokens.device
        idx = self.order.to(dev)
        x = tokens.float()[:, idx]  # (B, L, D) tokens in decoding order
        context = x[:, : self.L - self.n]
        if context_noise and self.G > 1:  # xAR: each context group at its own noise level
            t = torch.rand(B, self.G - 1, 1, 1).to(dev)
            eps = torch.randn(B, self.G - 1, self.n, self.D).to(dev)
            ctx = context.reshape(B, self.G - 1, self.n, self.D)
            context = (t * ctx + (1.0 - t) * eps).reshape(B, self.L - self.n, self.D)
        inputs = torch.cat([torch.zeros(B, 1, self.D + 1, device=dev), self.start_block(B, dev),
                            self.token_inputs(context)], 1)  # (B, L + 1, D + 1)
        targets = torch.cat([torch.zeros_like(x[:, :1]), x], 1)  # (B, L + 1, D)
        loss_mask = torch.ones(B, self.L + 1, dtype=torch.bool, device=dev)
        loss_mask[:, 0] = False
        return TrainBatch(inputs=inputs, targets=targets, loss_mask=loss_mask, cond=cond.long(),
                          positions=self.positions(dev))

    def generate(self, model: Backbone, chain: Chain, cond: torch.Tensor, rng: RNG) -> torch.Tensor:
        """``G`` passes with a KV cache: ``LongTensor[B, L]`` codes, or ``FloatTensor[B, L, D]``
        continuous tokens drawn by the run's head from each group's hidden states."""
        if self.D:
            return self._generate_continuous(model, chain, cond, rng)
        B, dev = cond.shape[0], model.device
        cond = cond.to(dev).long()
        rows, guided = guidance_rows(cond, chain, model)
        R = rows.shape[0]
        order = self.order.to(dev)
        pos = self.positions(dev)
        cache = model.new_cache(R, self.L + 1)
        codes = torch.zeros(B, self.L, dtype=torch.long, device=dev)
        inputs = torch.cat([torch.zeros(R, 1, dtype=torch.long, device=dev),
                            torch.full((R, self.n), self.start_id, dtype=torch.long, device=dev)], 1)
        at = 0  # sequence index of the first input of this pass
        for g in range(self.G):
            T = inputs.shape[1]
            logits = model(inputs, rows, positions=pos[at : at + T], cache=cache)[:, -self.n:]  # (R, n, V)
            where = order[g * self.n : (g + 1) * self.n]  # (n,) flat positions of group g
            new = sample_codes(chain, logits, rng, B=B, guided=guided, step=g, n_steps=self.G,
                               positions=where.expand(B, -1))
            codes[:, where] = new
            at += T
            inputs = new.repeat(2, 1) if guided else new
        return codes

    def _generate_continuous(self, model: Backbone, chain: Chain, cond: torch.Tensor, rng: RNG) -> torch.Tensor:
        B, dev = cond.shape[0], model.device
        cond = cond.to(dev).long()
        rows, guided = guidance_rows(cond, chain, model)
        R = rows.shape[0]
        order = self.order.to(dev)
        pos = self.positions(dev)
        cache = model.new_cache(R, self.L + 1)
        tokens = torch.zeros(B, self.L, self.D, device=dev)
        inputs = torch.cat([torch.zeros(R, 1, self.D + 1, device=dev), self.start_block(R, dev)], 1)
        at = 0
        for g in range(self.G):
            T = inputs.shape[1]
            hidden = model(inputs, rows, positions=pos[at : at + T], cache=cache, return_hidden=True)
            where = order[g * self.n : (g + 1) * self.n]
            info = StepInfo(step=g, n_steps=self.G, positions=where.expand(B, -1))
            new = draw_tokens(model, chain, hidden[:, -self.n:], rng, B=B, guided=guided, info=info)
            tokens[:, where] = new
            at += T
            nxt = self.token_inputs(new)
            inputs = nxt.repeat(2, 1, 1) if guided else nxt
        return tokens


# ---------------------------------------------------------------------------
# Next-scale prediction over a multi-scale layout (VAR, NFIG)
# ---------------------------------------------------------------------------


class ScaleOrder:
    """VAR's next-scale prediction over the scales of a multi-scale layout,
    with teacher-forcing inputs from ``inputs_fn``.

    ``inputs_fn(codes)`` maps ``LongTensor[B, L]`` to ``FloatTensor[B, L −
    n_0, D]``: for every scale after the first, what the model sees at that
    scale's positions — a function of the codes of *earlier* scales only
    (VAR: the accumulated f̂ of earlier scales, downsampled to the scale).
    The sequence (``T = L``, embeddings of width ``D``) is the first scale's
    ``n_0`` start slots (index 0 carries the class embedding, the others a
    zero vector plus their position, as VAR's start tokens) followed by those
    inputs; the input at flat position i predicts the code at i. Attention
    is block-causal over scales, so decoding takes one pass per scale with a
    KV cache, and the likelihood is exact: ``log p(x) = Σ_k Σ_{i ∈ scale k}
    log p(x_i | scales < k)``.

    ``token_dim = D' > 0``: continuous tokens (FlowAR). ``inputs_fn`` then
    maps the tokens ``FloatTensor[B, L, D']`` (e.g. a ``kl`` tokenizer's
    ``scale_inputs``: scale k − 1 upsampled to scale k), the targets are the
    tokens, the spec has ``heads = ()`` and ``token_dim = D'``, decoding
    draws every token of scale k with the run's head from the pass's hidden
    states (:func:`draw_tokens`), and there is no exact likelihood.
    """

    def __init__(self, layout: Any, vocab_size: int, dim: int, inputs_fn: Any, *, train_order: str,
                 who: str, scale_fn: Any = None, token_dim: int = 0):
        if layout.n_scales < 2:
            raise ConfigError(f"{who} needs a multi-scale tokenizer (several scales in its layout), got one "
                              f"scale {list(layout.scales)} (e.g. tokenizer 'multiscale')")
        if layout.depth != 1:
            raise ConfigError(f"{who} needs one code per position of each scale, got residual depth {layout.depth}")
        self.layout = layout
        self.sizes = tuple(h * w for h, w in layout.scales)
        self.offsets = [sum(self.sizes[:k]) for k in range(len(self.sizes))]
        self.K = len(self.sizes)
        self.L = layout.length
        self.V = 0 if token_dim else vocab_size
        self.D = dim
        self.token_dim = int(token_dim)  # 0: codes; D': continuous tokens (FlowAR), drawn by the run's head
        self.inputs_fn = inputs_fn
        self.scale_fn = scale_fn  # optional (codes, k) -> [B, n_k, D]: one scale's inputs alone, for decoding
        self.train_order = train_order

    def model_spec(self, **extra: Any) -> ModelSpec:
        return ModelSpec(
            seq_len=self.L,
            vocab_size=self.V,
            heads=() if self.token_dim else (self.V,),
            train_order=self.train_order,
            input_kind="embeddings",
            input_dim=self.D,
            attention="block-causal",
            cache_ops=frozenset({"append"}),
            extra=tuple(sorted({"block_sizes": self.sizes, **extra}.items())),
            layout=self.layout,
            token_dim=self.token_dim,
        )

    def inputs(self, codes: torch.Tensor) -> torch.Tensor:
        """``FloatTensor[B, L, D]``: the teacher-forcing inputs of ``codes``
        (``LongTensor[B, L]``, or continuous tokens ``FloatTensor[B, L, D']``)."""
        with torch.no_grad():
            later = self.inputs_fn(codes).detach().float()  # (B, L - n0, D)
        if tuple(later.shape) != (codes.shape[0], self.L - self.sizes[0], self.D):
            raise InputError(f"scale inputs: expected [{codes.shape[0]}, {self.L - self.sizes[0]}, {self.D}], "
                             f"got {tuple(later.shape)}")
        start = torch.zeros(codes.shape[0], self.sizes[0], self.D, device=later.device)
        return torch.cat([start, later.to(start.device)], 1)

    def training_batch(self, codes: torch.Tensor, cond: torch.Tensor) -> TrainBatch:
        """Codes or continuous tokens (then float targets ``[B, L, D']`` for the head)."""
        mask = torch.ones(codes.shape[:2], dtype=torch.bool, device=codes.device)
        targets = codes.float() if self.token_dim else codes
        return TrainBatch(inputs=self.inputs(codes), targets=targets, loss_mask=mask,
                          cond=cond.long(), positions=torch.arange(self.L, device=codes.device))

    def log_likelihood(self, model: Backbone, codes: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if self.token_dim:
            raise ConfigError(f"{self.train_order}: continuous tokens have no exact likelihood here")
        dev = model.device
        codes = codes.to(dev)
        logits = model(self.inputs(codes).to(dev), cond.to(dev).long(), positions=torch.arange(self.L, device=dev))
        return torch.log_softmax(logits.float(), -1).gather(-1, codes[..., None])[..., 0].sum(-1)

    def generate(self, model: Backbone, chain: Chain, cond: torch.Tensor, rng: RNG,
                 known: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """One pass per scale; ``known`` = ``(codes, mask)`` teacher-forces the
        given codes of every scale (VAR's zero-shot in/out-painting)."""
        B, dev = cond.shape[0], model.device
        cond = cond.to(dev).long()
        rows, guided = guidance_rows(cond, chain, model)
        R = rows.shape[0]
        cache = model.new_cache(R, self.L)
        if self.token_dim:
            return self._generate_continuous(model, chain, cond, rng, rows, guided, cache, known)
        codes = torch.zeros(B, self.L, dtype=torch.long, device=dev)
        for k in range(self.K):
            a, n = self.offsets[k], self.sizes[k]
            if k == 0:
                x = torch.zeros(R, n, self.D, device=dev)
            else:  # what scale k sees: a function of the scales sampled so far
                if self.scale_fn is not None:
                    with torch.no_grad():
                        x = self.scale_fn(codes, k).detach().float().to(dev)
                else:
                    x = self.inputs(codes)[:, a : a + n].to(dev)
                x = x.repeat(2, 1, 1) if guided else x
            logits = model(x, rows, positions=torch.arange(a, a + n, device=dev), cache=cache)  # (R, n, V)
            where = torch.arange(a, a + n, device=dev)
            new = sample_codes(chain, logits, rng, B=B, guided=guided, step=k, n_steps=self.K,
                               positions=where.expand(B, -1), scale=k, n_scales=self.K)
            if known is not None:
                new = torch.where(known[1][:, a : a + n], known[0][:, a : a + n], new)
            codes[:, a : a + n] = new
        return codes

    def _generate_continuous(self, model: Backbone, chain: Chain, cond: torch.Tensor, rng: RNG,
                             rows: torch.Tensor, guided: bool, cache: Any,
                             known: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """FlowAR: one pass per scale; the head draws every token of scale k
        from its hidden state; the next scale's inputs come from the tokens
        so far through ``inputs_fn`` (the tokenizer's ``scale_inputs``)."""
        B, dev = cond.shape[0], model.device
        tokens = torch.zeros(B, self.L, self.token_dim, device=dev)
        for k in range(self.K):
            a, n = self.offsets[k], self.sizes[k]
            if k == 0:
                x = torch.zeros(rows.shape[0], n, self.D, device=dev)
            else:
                x = self.inputs(tokens)[:, a : a + n].to(dev)
                x = x.repeat(2, 1, 1) if guided else x
            where = torch.arange(a, a + n, device=dev)
            hidden = model(x, rows, positions=where, cache=cache, return_hidden=True)  # (R, n, C)
            info = StepInfo(step=k, n_steps=self.K, positions=where.expand(B, -1), scale=k, n_scales=self.K)
            new = draw_tokens(model, chain, hidden, rng, B=B, guided=guided, info=info)  # (B, n, D')
            if known is not None:
                new = torch.where(known[1][:, a : a + n, None], known[0][:, a : a + n].to(new.dtype), new)
            tokens[:, a : a + n] = new
        return tokens


# ---------------------------------------------------------------------------
# A KV cache with per-key positions and validity
# ---------------------------------------------------------------------------


class MaskedCache:
    """Bookkeeping for an append-only KV cache read through explicit masks.

    Every appended token records its flat grid position (``-1``: none) and
    whether later queries may see it; :meth:`invalidate` hides a key from
    then on (its slot stays, unused). :meth:`mask` builds the ``[T, S]``
    boolean attention mask of the next pass from a rule ``visible(query,
    key)`` evaluated on these records.
    """

    def __init__(self, model: Backbone, rows: int, max_len: int):
        self.cache = model.new_cache(rows, max_len)
        self.pos: list[int] = []
        self.valid: list[bool] = []

    def __len__(self) -> int:
        return len(self.pos)

    def append(self, positions: list[int]) -> list[int]:
        """Record ``positions`` as the next keys; returns their slot indices."""
        start = len(self.pos)
        self.pos.extend(int(p) for p in positions)
        self.valid.extend(True for _ in positions)
        return list(range(start, len(self.pos)))

    def invalidate(self, slot: int) -> None:
        self.valid[slot] = False

    def key_tensors(self, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.tensor(self.pos, dtype=torch.long, device=device),
                torch.tensor(self.valid, dtype=torch.bool, device=device))



def raster_spec(tokenizer: Any) -> ModelSpec:
    """The spec of a plain raster (LlamaGen) model for ``tokenizer``: one
    place, so that ``raster`` (without RAR), ``zipar``, ``sjd`` and
    ``speculative`` share one trained model by construction. A continuous
    tokenizer (``tokenizer.continuous``, width ``D = token_dim``) gives the
    continuous spec: the previous latents are the inputs (``input_kind =
    "embeddings"``, ``input_dim = D``), no vocabulary or logit heads, and
    ``token_dim = D`` — the run's head draws each token from the hidden state
    (:func:`continuous_spec`)."""
    L, V = tokenizer.layout.length, tokenizer.vocab_size
    if getattr(tokenizer, "continuous", False):
        return continuous_spec(tokenizer, seq_len=L, train_order="raster", attention="causal",
                               cache_ops=frozenset({"append"}))
    return ModelSpec(seq_len=L, vocab_size=V, heads=(V,), train_order="raster", attention="causal",
                     cache_ops=frozenset({"append"}), extra=(), layout=tokenizer.layout)


def continuous_spec(tokenizer: Any, *, seq_len: int, train_order: str, extra_input_dim: int = 0,
                    **fields: Any) -> ModelSpec:
    """The :class:`ModelSpec` of an order over a continuous tokenizer's latents
    (width ``D = tokenizer.token_dim``): ``input_kind = "embeddings"`` of width
    ``D + extra_input_dim`` (an order may append flags to each input vector,
    e.g. a mask bit), ``vocab_size = 0``, no logit heads (``heads = ()``),
    ``token_dim = D`` (the backbone returns hidden states for the run's
    :class:`~tokenloom.interfaces.Head`) and ``layout`` the tokenizer's;
    ``fields``: the rest (``attention``, ``cache_ops``, ``extra``, ...)."""
    D = int(tokenizer.token_dim)
    if D < 1:
        raise ConfigError([(f"{train_order}: the tokenizer {type(tokenizer).__name__} has no continuous tokens "
                           f"(token_dim {D})")])
    fields.setdefault("layout", tokenizer.layout)
    return ModelSpec(seq_len=seq_len, vocab_size=0, heads=(), train_order=train_order, input_kind="embeddings",
                     input_dim=D + int(extra_input_dim), token_dim=D, **fields)


def raster_training_batch(codes: torch.Tensor, cond: torch.Tensor, L: int, V: int, *, where: str,
                          order: torch.Tensor | None = None, dim: int = 0) -> TrainBatch:
    """Raster teacher forcing (LlamaGen): inputs ``[cls, x_0, ..., x_{L-2}]``
    at positions ``[-1, 0, ..., L-2]`` (``[B, L]``), targets ``x``, the loss
    everywhere — the one recipe of ``raster``, ``zipar``, ``sjd`` and
    ``speculative``. ``order`` (``LongTensor[B, L]``, a permutation per row;
    RAR) visits the codes in that order instead: inputs ``[cls, x_π0, ...]``
    at positions ``[-1, π0, ...]``, targets ``x_π``. ``codes`` are checked
    against ``L`` and ``V`` (errors name ``where``).

    Continuous tokens (``dim = D > 0``): ``codes`` are latents
    ``FloatTensor[B, L, D]`` (checked with :func:`check_latents`); the inputs
    are the previous latents as embeddings ``[B, L, D]`` (zeros in the class
    slot, whose value the backbone ignores) and the targets the latents
    ``[B, L, D]``, which the run's head scores."""
    if dim:
        x = check_latents(codes, L, dim, where=where)
        if order is not None:
            x = x.gather(1, order[..., None].expand(-1, -1, dim))  # (B, L, D) in decoding order
        else:
            order = torch.arange(L, device=x.device).expand(x.shape[0], L)
        inputs = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1)  # [cls, x_π0, ..., x_π(L-2)]
        positions = torch.cat([torch.full_like(order[:, :1], NO_POSITION), order[:, :-1]], 1)
        return TrainBatch(inputs=inputs, targets=x, loss_mask=torch.ones(x.shape[:2], dtype=torch.bool,
                                                                          device=x.device),
                          cond=cond.long(), positions=positions)
    codes = check_codes(codes, L, V, where=where)
    if order is None:
        order = torch.arange(L, device=codes.device).expand(codes.shape[0], L)  # (B, L) raster
    x = codes.gather(1, order)  # (B, L) tokens in decoding order
    inputs = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1)  # [cls, x_π0, ..., x_π(L-2)]
    positions = torch.cat([torch.full_like(order[:, :1], NO_POSITION), order[:, :-1]], 1)  # where each sits
    return TrainBatch(inputs=inputs, targets=x, loss_mask=torch.ones_like(x, dtype=torch.bool),
                      cond=cond.long(), positions=positions)


def raster_log_likelihood(model: Backbone, codes: torch.Tensor, cond: torch.Tensor, L: int, V: int, *, where: str,
                          target_aware: bool = False) -> torch.Tensor:
    """``FloatTensor[B]``: exact log p(codes | cond) in nats under a raster
    model (one teacher-forced pass); ``target_aware``: the model has RAR's
    target-aware positions (the input at index t predicts position t).
    Continuous latents ``[B, L, D]``: the sum of the head's exact
    ``log_likelihood`` (a head with ``exact_likelihood``; others raise)."""
    D = int(getattr(model.spec, "token_dim", 0) or 0)
    if D:
        head = model.head
        if head is None or not head.exact_likelihood:
            raise InputError(f"{where}: the model's head {type(head).__name__} has no exact likelihood")
        x = check_latents(codes, L, D, where=where).to(model.device)
        dev = model.device
        inputs = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1)
        kw = {"target_positions": torch.arange(L, device=dev)} if target_aware else {}
        hidden = model(inputs, cond.to(dev).long(), positions=torch.arange(-1, L - 1, device=dev),
                       return_hidden=True, **kw)  # (B, L, C)
        with torch.no_grad():
            return head.log_likelihood(hidden, x).sum(-1)
    codes = check_codes(codes, L, V, where=where)
    dev = model.device
    codes, cond = codes.to(dev), cond.to(dev).long()
    inputs = torch.cat([torch.zeros_like(codes[:, :1]), codes[:, :-1]], 1)
    positions = torch.arange(-1, L - 1, device=dev)
    kw = {"target_positions": torch.arange(L, device=dev)} if target_aware else {}
    logits = model(inputs, cond, positions=positions, **kw)  # (B, L, V)
    return torch.log_softmax(logits.float(), -1).gather(-1, codes[..., None])[..., 0].sum(-1)


def raster_decode(model: Any, chain: Chain, cond: torch.Tensor, rng: RNG, L: int, *,
                  target_aware: bool = False) -> torch.Tensor:
    """Raster next-token decoding with a KV cache — one forward pass per
    token (NFE = L), the chain's draw at step t for position t; with
    guidance the conditional and null-class rows run in one batched pass.
    ``model``: a :class:`~tokenloom.Backbone`, or the bare transformer behind
    one (a measurement kept out of the counters: device and null class are
    then read from its parameters and ``n_classes``). ``chain``: a
    :class:`~tokenloom.Chain`; ``rng``: the :class:`~tokenloom.RNG` of the
    ``B`` images. Returns ``LongTensor[B, L]``. The decoding loop of
    ``raster`` and the baseline the speculative orders measure.

    A continuous model (``spec.token_dim = D > 0``): the same loop, each
    pass's hidden state handed to the run's head through
    :func:`tokenloom.sampling.draw_continuous` (the chain's guidance and
    temperature, null rows batched as above), the drawn latent fed back as
    the next input; returns ``FloatTensor[B, L, D]``. NFE = L backbone
    passes, plus ``head.steps`` head steps per token (counted apart)."""
    if int(getattr(model.spec, "token_dim", 0) or 0):
        return _raster_decode_continuous(model, chain, cond, rng, L, target_aware=target_aware)
    B = cond.shape[0]
    dev = model.device if hasattr(model, "device") else next(model.parameters()).device
    null = model.null_class if hasattr(model, "null_class") else model.n_classes
    cond = cond.to(dev).long()
    guided = chain.needs_uncond
    rows = torch.cat([cond, torch.full_like(cond, null)]) if guided else cond
    cache = model.new_cache(rows.shape[0], L)
    codes = torch.zeros(B, L, dtype=torch.long, device=dev)
    token = torch.zeros(rows.shape[0], 1, dtype=torch.long, device=dev)  # the class slot
    # per-step tensors made once: the input at step t sits at grid position t - 1 (the class token at none)
    # and predicts position t (RAR's target-aware embedding); the samplers are told the position t
    position = torch.arange(-1, L - 1, device=dev).clamp(min=NO_POSITION)  # (L,)
    target = torch.arange(L, device=dev)  # (L,)
    decoded = target[:, None].expand(L, B)  # (L, B)
    with torch.no_grad():
        for t in range(L):
            kw = {"target_positions": target[t : t + 1]} if target_aware else {}
            logits = model(token, rows, cache=cache, positions=position[t : t + 1], **kw)[:, -1]  # (rows, V)
            info = StepInfo(step=t, n_steps=L, positions=decoded[t], uncond_logits=logits[B:] if guided else None)
            nxt = chain.sample(logits[:B], info, rng)  # (B,)
            codes[:, t] = nxt
            token = (nxt.repeat(2) if guided else nxt)[:, None]
    return codes


def _raster_decode_continuous(model: Any, chain: Chain, cond: torch.Tensor, rng: RNG, L: int, *,
                              target_aware: bool = False) -> torch.Tensor:
    """:func:`raster_decode` for a continuous model: ``FloatTensor[B, L, D]``."""
    from .sampling import draw_continuous

    B, D = cond.shape[0], int(model.spec.token_dim)
    dev = model.device if hasattr(model, "device") else next(model.parameters()).device
    null = model.null_class if hasattr(model, "null_class") else model.n_classes
    cond = cond.to(dev).long()
    guided = chain.needs_uncond
    rows = torch.cat([cond, torch.full_like(cond, null)]) if guided else cond
    cache = model.new_cache(rows.shape[0], L)
    latents = torch.zeros(B, L, D, device=dev)
    token = torch.zeros(rows.shape[0], 1, D, device=dev)  # the class slot (its value is ignored)
    position = torch.arange(-1, L - 1, device=dev).clamp(min=NO_POSITION)
    target = torch.arange(L, device=dev)
    decoded = target[:, None].expand(L, B)
    with torch.no_grad():
        for t in range(L):
            kw = {"target_positions": target[t : t + 1]} if target_aware else {}
            hidden = model(token, rows, cache=cache, positions=position[t : t + 1], return_hidden=True,
                           **kw)[:, -1]  # (rows, C)
            info = StepInfo(step=t, n_steps=L, positions=decoded[t])
            x = draw_continuous(model, chain, hidden[:B], rng, info=info,
                                uncond_hidden=hidden[B:] if guided else None)  # (B, D)
            latents[:, t] = x
            token = (torch.cat([x, x]) if guided else x)[:, None].to(token.dtype)
    return latents


def instruction_spec(tokenizer: Any, rotate: bool = False) -> ModelSpec:
    """The spec of RandAR's model (``[cls, p0, x0, p1, x1, ...]``, one extra
    token: the position instruction, id ``vocab_size``): one place, so that
    ``random`` and ``random-parallel`` share one trained model by construction.
    ``rotate``: the instruction's input embedding is rotated by the RoPE of the
    position it asks for, as RandAR's reference (spec option ``rotate_ids``)."""
    L, V = tokenizer.layout.length, tokenizer.vocab_size
    return ModelSpec(seq_len=2 * L, vocab_size=V + 1, n_extra_tokens=1, heads=(V,), train_order="random",
                     attention="causal", cache_ops=frozenset({"append"}), layout=tokenizer.layout,
                     extra=(("rotate_ids", (V,)),) if rotate else ())


def instruction_sequence(codes: torch.Tensor, order: torch.Tensor, instruction: int) -> TrainBatch:
    """RandAR's teacher-forcing sequence ``[cls, p0, x0, p1, x1, ...]`` of
    ``codes`` (``[B, L]``) visited in the orders ``order`` (``[B, L]``, a
    permutation per row): a position-instruction token (id ``instruction``,
    at the grid position it announces) before every image token, the loss on
    the instruction slots, which predict the token they announce. ``cond`` is
    left at zeros for the caller to fill. Shared by ``random`` and
    ``random-parallel`` (which must train the very same model)."""
    B, L = codes.shape
    x = codes.gather(1, order)  # (B, L) tokens in decoding order
    inputs = torch.zeros(B, 2 * L, dtype=torch.long, device=codes.device)
    inputs[:, 1::2] = instruction
    inputs[:, 2::2] = x[:, :-1]
    positions = torch.full_like(inputs, NO_POSITION)
    positions[:, 1::2] = order
    positions[:, 2::2] = order[:, :-1]
    targets = torch.zeros_like(inputs)
    targets[:, 1::2] = x
    loss_mask = torch.zeros_like(inputs, dtype=torch.bool)
    loss_mask[:, 1::2] = True
    return TrainBatch(inputs=inputs, targets=targets, loss_mask=loss_mask,
                      cond=torch.zeros(B, dtype=torch.long, device=codes.device), positions=positions)

__all__ = [
    "GroupOrder",
    "MaskedCache",
    "ScaleOrder",
    "check_known",
    "check_known_latents",
    "continuous_spec",
    "draw_tokens",
    "flat_index",
    "grid_of",
    "guidance_rows",
    "instruction_sequence",
    "instruction_spec",
    "raster_decode",
    "raster_log_likelihood",
    "raster_spec",
    "raster_training_batch",
    "refuse_known",
    "sample_codes",
    "scales_of",
]
