"""The backbone: a decoder transformer that every generation order shares.

Read it like nanoGPT's ``model.py`` (Karpathy, https://github.com/karpathy/nanoGPT): a
pre-norm GPT-2 block (LayerNorm, attention, 4×GELU MLP), with what visual
autoregression adds on top:

- **conditioning** — ``cond`` (``LongTensor[B]``) indexes a *condition table*
  built by a :class:`~tokenloom.interfaces.Conditioner` (the run's encoded
  training conditions or prompts; its last row is the null condition used for
  classifier-free guidance, LlamaGen §2.3). A row's prefix has P positions:
  the last takes sequence index 0 of the generator's sequence (the class
  token's slot), the other ``M = P - 1`` come before it, at no position, seen
  by every query (and, in cached decoding, written to the cache by the first
  call). Prefix token ids are embedded by ``cls_emb`` (for the ``class``
  conditioner: ``n_classes + 1`` rows, the class token exactly as before),
  prefix embeddings projected by ``cond_proj``; padded prefix positions are
  attended by nobody;
- **positions** — ``pos = "learned"`` (an embedding per flat code position)
  or ``"rope2d"`` (LlamaGen's 2-D rotary embedding: half of each head's
  dimensions rotate with the row, half with the column). Position ids are
  flat code positions of ``spec.layout``; ``-1`` is "no position" (the class
  token: identity rotation, its own learned row);
- **target-aware positions** (RAR, Yu et al. 2024) when the spec asks for
  them: an additive embedding of the position the token *predicts*;
- **attention** with any mask a generator asks for: causal, bidirectional,
  block-causal, or a custom ``[T, S]`` / ``[B, T, S]`` boolean mask
  (True = may attend);
- **output heads** — one linear head per entry of ``spec.heads``; with the
  spec options ``head_blocks`` (NAR) or ``head_branch`` (HMAR) a head also
  has transformer blocks, a norm and an output layer of its own
  (:mod:`~tokenloom.backbone.head_blocks`);
- **AdaLN** (``[model] cond = "adaln"``, VAR): every block and the final norm
  modulated by the condition vector (:mod:`~tokenloom.backbone.adaln`);
- **rotated inputs** (spec option ``rotate_ids``, RandAR): the position
  instruction's embedding rotated by its RoPE (:mod:`~tokenloom.backbone.positions`);
- **a depth head** when the spec asks for one (``("depth_head", n_layer)``:
  RQ-Transformer, Lee et al. 2022): the input at a position is the sum of
  the embeddings of a stack of codes ``[B, T, D]``, and a small causal
  transformer over depth turns each hidden state into the D codes of the
  next stack, one head per depth (:meth:`Transformer.depth_logits`);
- **a KV cache** that every cached forward appends to.

Shapes: ``B`` batch, ``T`` new tokens, ``S`` keys attended to (cached + new),
``C`` model width, ``H`` heads, ``hd = C / H``, ``V`` a head's vocabulary.

The neighbouring modules hold the other ideas (and are re-exported here, the
old public path ``tokenloom.model``): :mod:`~tokenloom.backbone.kvcache`
(:class:`KVCache`), :mod:`~tokenloom.backbone.kernels` (how the products are
computed on the CPU: :class:`CPULinear`, :func:`attend`) and
:mod:`~tokenloom.backbone.instrumented` (:class:`InstrumentedModel`, what
generators receive: it counts forward passes, tokens and time).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..contract.config import ModelConfig
from ..contract.errors import ConfigError, InputError
from ..contract.interfaces import NO_POSITION, ModelSpec, Prefix, TokenLayout
from .adaln import AdaLN, adaln_block_forward
from .head_blocks import branch_blocks, head_hiddens, head_norms, head_outputs, head_paths_of
from .instrumented import InstrumentedModel
from .kernels import BMM_ATTENTION_PAIRS, PLAIN_LINEAR, CPULinear, PlainLinear, attend
from .kvcache import KVCache
from .positions import rotate_ids_of, rotate_inputs

# ---------------------------------------------------------------------------
# Positions and masks
# ---------------------------------------------------------------------------


def layout_coordinates(layout: TokenLayout) -> torch.Tensor:
    """``FloatTensor[L, 4]``: (row, column, scale, depth) of each flat code
    position. Rows/columns of coarser scales are mapped onto the finest grid
    (cell centres), so a scale's tokens rotate like the area they cover."""
    H, W = layout.grid
    rows = []
    for s, (h, w) in enumerate(layout.scales):
        r = (torch.arange(h, dtype=torch.float64) + 0.5) * H / h - 0.5
        c = (torch.arange(w, dtype=torch.float64) + 0.5) * W / w - 0.5
        rr, cc = torch.meshgrid(r, c, indexing="ij")
        rc = torch.stack([rr.flatten(), cc.flatten()], -1).repeat_interleave(layout.depth, 0)
        d = torch.arange(layout.depth, dtype=torch.float64).repeat(h * w)
        rows.append(torch.cat([rc, torch.full_like(d, s)[:, None], d[:, None]], -1))
    return torch.cat(rows).float()


def rope2d_table(coords: torch.Tensor, head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[P + 1, head_dim // 2]`` for P positions with (row, col)
    ``coords`` (LlamaGen's 2-D RoPE); the last row (no position) is the
    identity rotation."""
    if head_dim % 4:
        raise ConfigError(f"model: pos = 'rope2d' needs d_model / n_head divisible by 4, got head_dim {head_dim}")
    n = head_dim // 4
    freqs = 1.0 / theta ** (torch.arange(n, dtype=torch.float64) * 2 / (head_dim // 2))  # (n,)
    ang = torch.cat([coords[:, :1].double() * freqs, coords[:, 1:2].double() * freqs], -1)  # (P, hd/2)
    ang = torch.cat([ang, torch.zeros(1, ang.shape[1], dtype=ang.dtype)])  # no-position row
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of ``x`` (``[B, H, T, hd]``) by the angles
    whose cos/sin are ``[B or 1, 1, T, hd/2]`` (any shapes that broadcast
    against ``x[..., :hd/2]``)."""
    return rotate_pairs(x, torch.complex(cos.float(), sin.float()))


def rotate_pairs(x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
    """``x`` (``[..., hd]``) with each pair ``(x_2i, x_2i+1)`` taken as the
    complex number ``x_2i + i·x_2i+1`` and multiplied by ``cis`` (unit
    complex numbers ``cos θ + i·sin θ``, broadcast against ``[..., hd/2]``):
    ``(a cos θ − b sin θ, a sin θ + b cos θ)`` in one complex multiply
    (the form of Meta's LLaMA code), computed in float32."""
    x2 = (x if x.dtype == torch.float32 else x.float()).unflatten(-1, (-1, 2))
    try:
        xc = torch.view_as_complex(x2)
    except RuntimeError:  # view_as_complex needs pairs that are adjacent and aligned
        xc = torch.view_as_complex(x2.contiguous())
    out = torch.view_as_real(xc * cis).flatten(-2)
    return out if x.dtype == torch.float32 else out.to(x.dtype)


def block_causal_mask(sizes: tuple[int, ...], device: torch.device | str | None = None) -> torch.Tensor:
    """``BoolTensor[T, T]``: block ``i`` sees every block ``<= i`` (VAR's
    next-scale mask; causal between blocks, bidirectional inside)."""
    block = torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))
    return block[:, None] >= block[None, :]


def _lookup(table: torch.Tensor, index: torch.Tensor, error: str) -> torch.Tensor:
    """``table[index]`` (rows of an embedding table) with an out-of-range
    index reported as ``InputError(error)``. On the CPU the lookup itself
    detects it (no extra pass over the index on every decoding step); on an
    accelerator, where a bad index is a device-side assert, it is checked
    first."""
    if index.device.type != "cpu" and index.numel():
        lo, hi = torch.aminmax(index)
        if lo < 0 or hi >= table.shape[0]:
            raise InputError(error)
    try:
        return F.embedding(index, table)
    except IndexError:
        raise InputError(error) from None


# ---------------------------------------------------------------------------
# The block
# ---------------------------------------------------------------------------


class BlockWeights(NamedTuple):
    """A block's twelve weights, in the order :func:`block_forward` reads
    them (:meth:`Block.params` gathers them; the names follow the module's
    parameter names, ``ln_1.weight`` -> ``ln_1_weight``)."""

    ln_1_weight: torch.Tensor  # (C,)
    ln_1_bias: torch.Tensor  # (C,)
    qkv_weight: torch.Tensor  # (3C, C): attn.qkv
    qkv_bias: torch.Tensor  # (3C,)
    attn_proj_weight: torch.Tensor  # (C, C): attn.proj
    attn_proj_bias: torch.Tensor  # (C,)
    ln_2_weight: torch.Tensor  # (C,)
    ln_2_bias: torch.Tensor  # (C,)
    fc_weight: torch.Tensor  # (4C, C): mlp.fc
    fc_bias: torch.Tensor  # (4C,)
    mlp_proj_weight: torch.Tensor  # (C, 4C): mlp.proj
    mlp_proj_bias: torch.Tensor  # (C,)


def block_forward(x: torch.Tensor, p: BlockWeights, n_head: int, rope: torch.Tensor | None, mask: Any,
                  cache: KVCache | None, layer: int, dropout: float = 0.0,
                  linear: PlainLinear = PLAIN_LINEAR) -> torch.Tensor:
    """One pre-norm GPT-2 block on ``x`` (``[B, T, C]``) as plain functions of
    its weights ``p`` (:class:`BlockWeights`), so that a decoding step costs
    the kernels and not the ``nn.Module`` calls around them: ``x + attn(ln_1
    x)``, then ``x + mlp(ln_2 x)``. ``rope``: the rotations ``cos θ + i·sin θ``
    (complex) shaped ``[B or 1, T, 1, 1, hd/2]`` to broadcast over ``(q, k)``
    and heads; ``mask``: what SDPA gets (``"causal"``: its fused causal path);
    ``cache``/``layer``: the KV cache to append this layer's keys/values to;
    ``dropout``: attention and residual dropout (training only); ``linear``:
    how the products are computed (:class:`~tokenloom.backbone.kernels.PlainLinear`,
    or :class:`~tokenloom.backbone.kernels.CPULinear` for inference on the CPU)."""
    # unpacked in field order: cheaper than twelve attribute reads on every decoding step
    (ln_1_w, ln_1_b, qkv_w, qkv_b, attn_proj_w, attn_proj_b,
     ln_2_w, ln_2_b, fc_w, fc_b, mlp_proj_w, mlp_proj_b) = p
    B, T, C = x.shape
    # attention: torch.layer_norm, as F.layer_norm's checks cost more than the kernel on a one-token step
    qkv = linear(torch.layer_norm(x, (C,), ln_1_w, ln_1_b), qkv_w, qkv_b).view(B, T, 3, n_head, C // n_head)
    if rope is not None and (qkv.requires_grad or qkv.dtype != torch.float32):  # q and k: one complex multiply
        (q, k), v = rotate_pairs(qkv[:, :, :2], rope).unbind(2), qkv[:, :, 2]  # (B, T, H, hd) each
    else:
        if rope is not None:  # the same multiply, in place on the projection's own output (no autograd here)
            torch.view_as_complex(qkv.unflatten(-1, (-1, 2)))[:, :, :2].mul_(rope)
        q, k, v = qkv.unbind(2)  # (B, T, H, hd) each
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd)
    if cache is not None:
        k, v = cache.update(layer, k, v)  # (B, H, S, hd): the cached keys/values, then these
    y = attend(q, k, v, mask, dropout)  # (B, H, T, hd)
    y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C): heads side by side
    if dropout:  # training
        x = x + F.dropout(linear(y, attn_proj_w, attn_proj_b), dropout)
        h = linear.gelu_tanh(torch.layer_norm(x, (C,), ln_2_w, ln_2_b), fc_w, fc_b)  # (B, T, 4C)
        return x + F.dropout(linear(h, mlp_proj_w, mlp_proj_b), dropout)
    x = linear.add(y, attn_proj_w, attn_proj_b, x)  # (B, T, C): x + proj(y)
    h = linear.gelu_tanh(torch.layer_norm(x, (C,), ln_2_w, ln_2_b), fc_w, fc_b)  # (B, T, 4C)
    return linear.add(h, mlp_proj_w, mlp_proj_b, x)  # (B, T, C): x + proj(h)


class SelfAttention(nn.Module):
    """The attention weights of a block (:func:`block_forward` computes)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)


class MLP(nn.Module):
    """The MLP weights of a block: ``proj(gelu(fc(x)))``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model)


class Block(nn.Module):
    """A pre-norm GPT-2 block; the parameter names are nanoGPT's
    (``ln_1``, ``attn.qkv``, ``attn.proj``, ``ln_2``, ``mlp.fc``, ``mlp.proj``)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def params(self) -> BlockWeights:
        """The weights, as :func:`block_forward` takes them."""
        a, m = self.attn, self.mlp
        return BlockWeights(self.ln_1.weight, self.ln_1.bias, a.qkv.weight, a.qkv.bias, a.proj.weight, a.proj.bias,
                            self.ln_2.weight, self.ln_2.bias, m.fc.weight, m.fc.bias, m.proj.weight, m.proj.bias)

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None, mask: Any, cache: KVCache | None,
                layer: int) -> torch.Tensor:
        """:func:`block_forward` with this block's weights: ``[B, T, C]`` -> ``[B, T, C]``."""
        return block_forward(x, self.params(), self.n_head, rope, mask, cache, layer,
                             self.dropout if self.training else 0.0)


# ---------------------------------------------------------------------------
# The transformer
# ---------------------------------------------------------------------------


class PrefixFormat(NamedTuple):
    """The shape of a backbone's conditioning prefix (from its conditioner):
    ``kind`` ``"tokens"`` (ids into a ``vocab``-row table; None: ``n_classes + 1``)
    or ``"embeddings"`` (``dim``-wide vectors, projected), ``length`` P positions."""

    kind: str = "tokens"
    length: int = 1
    vocab: int | None = None
    dim: int | None = None

    @classmethod
    def of(cls, conditioner: Any) -> PrefixFormat:
        """The format of a :class:`~tokenloom.interfaces.Conditioner`."""
        kind = conditioner.prefix_kind
        if kind == "tokens":
            return cls(kind, int(conditioner.prefix_len), vocab=int(conditioner.prefix_vocab))
        return cls(kind, int(conditioner.prefix_len), dim=int(conditioner.prefix_dim))


class Transformer(nn.Module):
    """Decoder transformer built from a generator's :class:`ModelSpec` and the
    ``[model]`` config. ``forward`` returns logits ``[B, T, V_head]`` (a
    tuple of them when the spec has several heads)."""

    def __init__(self, spec: ModelSpec, config: ModelConfig, *, n_classes: int,
                 prefix: PrefixFormat | None = None):
        super().__init__()
        prefix = prefix or PrefixFormat()
        if prefix.vocab is None and prefix.kind == "tokens":
            prefix = prefix._replace(vocab=n_classes + 1)
        if n_classes < 1 and prefix == PrefixFormat(vocab=n_classes + 1):
            raise ConfigError(f"model: n_classes must be >= 1, got {n_classes}")
        if prefix.kind not in ("tokens", "embeddings") or prefix.length < 1:
            raise ConfigError(f"model: a conditioning prefix must be 'tokens' or 'embeddings' of >= 1 positions, "
                              f"got {prefix}")
        if spec.input_kind not in ("tokens", "embeddings"):
            raise ConfigError(f"model: unknown input_kind {spec.input_kind!r} (tokens, embeddings)")
        if spec.attention not in ("causal", "bidirectional", "block-causal", "custom"):
            raise ConfigError(f"model: unknown attention {spec.attention!r}")
        self.spec, self.config, self.n_classes = spec, config, n_classes
        d = config.d_model
        self.layout = spec.layout or TokenLayout(scales=((1, spec.seq_len),))
        self.n_pos = self.layout.length  # position ids [0, n_pos); n_pos = none
        coords = layout_coordinates(self.layout)

        if spec.input_kind == "tokens":
            self.tok_emb = nn.Embedding(spec.vocab_size, d)
        else:
            self.in_proj = nn.Linear(spec.input_dim, d)
        self.prefix = prefix
        self.n_memory = prefix.length - 1  # M: prefix positions before sequence index 0
        if prefix.kind == "tokens":  # the class conditioner: n_classes + 1 rows, row n_classes the null class
            self.cls_emb = nn.Embedding(prefix.vocab, d)
        else:
            self.cond_proj = nn.Linear(prefix.dim, d)
        if config.pos == "learned":
            self.pos_emb = nn.Embedding(self.n_pos + 1, d)
        else:
            cos, sin = rope2d_table(coords, d // config.n_head)  # rotations cos θ + i·sin θ per position
            self.register_buffer("rope_cis", torch.complex(cos, sin), persistent=False)
        # multi-scale / residual-depth layouts: which scale and depth a position is
        self.register_buffer("pos_scale", torch.cat([coords[:, 2].long(), torch.zeros(1, dtype=torch.long)]),
                             persistent=False)
        self.register_buffer("pos_depth", torch.cat([coords[:, 3].long(), torch.zeros(1, dtype=torch.long)]),
                             persistent=False)
        self.scale_emb = nn.Embedding(self.layout.n_scales, d) if self.layout.n_scales > 1 else None
        self.depth_emb = nn.Embedding(self.layout.depth, d) if self.layout.depth > 1 else None
        self.tgt_emb = nn.Embedding(self.n_pos + 1, d) if spec.option("target_aware", False) else None
        self.rotate_ids = rotate_ids_of(spec, config.pos)  # RandAR: ids whose input rotates by its position

        self.drop = nn.Dropout(config.dropout)
        # spec options "head_blocks" (NAR: extra blocks after the n_layer-th that some heads read past) and
        # "head_branch" (HMAR: a head's own copy of the last blocks): where each head reads (head_blocks.py)
        self.head_blocks = head_paths_of(spec, config.n_layer)
        n_blocks = config.n_layer + (self.head_blocks.extra if self.head_blocks else 0)
        n_own = sum(self.head_blocks.own) if self.head_blocks else 0
        self.n_block_layers = n_blocks + n_own  # every block that runs: the KV cache's and AdaLN's layers
        self.blocks = nn.ModuleList(Block(config) for _ in range(n_blocks))
        self._inference_params: list[BlockWeights] | None = None  # see _layer_params
        self._cpu_linear = CPULinear()
        self._errors = {  # the messages of bad inputs, made once (they are looked for on every step)
            "ids": f"inputs: ids must lie in [0, {spec.vocab_size})",
            "positions": f"positions: must lie in [-1, {self.n_pos})",
            "cond": f"cond: class ids must lie in [0, {n_classes}] ({n_classes}: the null class)",
        }
        # the condition table: identity for the class conditioner (cond = class id), else set_conditions
        for name in ("cond_ids", "cond_emb", "cond_mask"):
            self.register_buffer(name, None, persistent=False)
        self._identity_table = prefix.kind == "tokens" and prefix.length == 1 and prefix.vocab == n_classes + 1
        if self._identity_table:
            self._set_table(torch.arange(n_classes + 1)[:, None], torch.ones(n_classes + 1, 1, dtype=torch.bool))

        self.ln_f = nn.LayerNorm(d)
        self.heads = nn.ModuleList(nn.Linear(d, v, bias=False) for v in spec.heads)
        # RQ-Transformer's depth transformer: spec option "depth_head" = its number of layers
        self.depth_layers = int(spec.option("depth_head", 0) or 0)
        if self.depth_layers:
            if spec.input_kind != "tokens":
                raise ConfigError("model: a depth head needs token inputs (stacks of code ids)")
            n_depth = len(spec.heads)
            self.depth_pos = nn.Embedding(n_depth, d)
            self.depth_blocks = nn.ModuleList(Block(config) for _ in range(self.depth_layers))
            self.depth_ln = nn.LayerNorm(d)
            self.register_buffer("depth_causal", torch.ones(n_depth, n_depth, dtype=torch.bool).tril(),
                                 persistent=False)

        # a prefix of P > 1 positions: a learned embedding per prefix position (created last, so a
        # P = 1 model draws its initial weights exactly as before)
        self.prefix_pos = nn.Embedding(prefix.length, d) if prefix.length > 1 else None
        # cond = "adaln": VAR's adaptive LayerNorm (tokenloom.backbone.adaln; created last, as above)
        self.adaln = AdaLN(d, self.n_block_layers) if config.cond == "adaln" else None
        self.head_lns = head_norms(self.head_blocks, d)  # heads 1, 2, ...: their own final norms
        self.branch_blocks = branch_blocks(self.head_blocks, lambda: Block(config))  # head_branch's own blocks

        self.token_head: nn.Module | None = None  # a continuous spec's Head (attach_head); never init here
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scaled residual projections
            if name.endswith("proj.weight") and not name.startswith("cond_proj"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if self.adaln is not None:  # VAR's init multipliers; its LayerNorms without affine weights
            self.adaln.reset_parameters()
            for block in [*self.blocks, *(b for own in self.branch_blocks or () for b in own)]:
                block.ln_1, block.ln_2 = (nn.LayerNorm(d, elementwise_affine=False) for _ in range(2))
            self.ln_f = nn.LayerNorm(d, elementwise_affine=False)
            if self.head_lns is not None:
                self.head_lns = nn.ModuleList(nn.LayerNorm(d, elementwise_affine=False) for _ in self.head_lns)

    # -- the condition table -------------------------------------------------

    def _set_table(self, values: torch.Tensor, mask: torch.Tensor) -> None:
        device = next(self.parameters()).device  # (ln_f has no weight under cond = "adaln")
        name = "cond_ids" if values.dtype == torch.long else "cond_emb"
        self.register_buffer(name, values.to(device), persistent=False)
        self.register_buffer("cond_mask", mask.to(device), persistent=False)
        self.n_classes = int(values.shape[0]) - 1

    def set_conditions(self, conditions: Prefix, null: Prefix) -> None:
        """Make ``conditions`` (N rows) and ``null`` (one row) the condition
        table: ``cond`` id ``i < N`` reads row ``i``, :attr:`n_classes` becomes
        N and the null condition (``null_class``) is id N. Built once per run
        (the training conditions, then the prompts to generate from); not
        part of the saved weights."""
        fmt = self.prefix
        for what, part in (("conditions", conditions), ("null", null)):
            if not isinstance(part, Prefix) or part.mask.dim() != 2 or part.length != fmt.length:
                got = f"{part.length} prefix positions" if isinstance(part, Prefix) else type(part).__name__
                raise InputError(f"{what}: {got}, the model was built for {fmt.length}")
        if len(null) != 1:
            raise InputError(f"null: expected one row, got {len(null)}")
        table = Prefix.cat([conditions, null])
        P = table.length
        if P != fmt.length:
            raise InputError(f"conditions: {P} prefix positions, the model was built for {fmt.length}")
        if table.mask.dtype != torch.bool or not bool(table.mask[:, -1].all()):
            raise InputError("conditions: the mask must be a BoolTensor whose last position is real in every row")
        if fmt.kind == "tokens":
            ids = table.ids
            if ids is None or ids.dtype.is_floating_point or ids.dim() != 2:
                raise InputError(f"conditions: expected ids LongTensor[N, {P}] for a token prefix")
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= fmt.vocab):
                raise InputError(f"conditions: prefix ids must lie in [0, {fmt.vocab})")
            self._set_table(ids.long(), table.mask)
            N = ids.shape[0]
            if P == 1 and N == fmt.vocab and torch.equal(ids[:, 0].cpu(), torch.arange(N)):
                return  # the class conditioner's table: cond is the class id (the one-lookup path)
        else:
            emb = table.embeddings
            if emb is None or emb.dim() != 3 or emb.shape[-1] != fmt.dim:
                raise InputError(f"conditions: expected embeddings FloatTensor[N, {P}, {fmt.dim}]")
            self._set_table(emb.float(), table.mask)
        self._identity_table = False
        self._errors["cond"] = (f"cond: condition ids must lie in [0, {self.n_classes}] "
                                f"({self.n_classes}: the null condition)")

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # -- bookkeeping ---------------------------------------------------------

    @property
    def head_dim(self) -> int:
        """``hd = d_model / n_head``: the width of one attention head."""
        return self.config.d_model // self.config.n_head

    def head_flops_per_token(self) -> int:
        """Training FLOPs per token of the continuous head (0 without one; included in
        :meth:`flops_per_token`)."""
        return 0 if self.token_head is None else int(self.token_head.train_flops_per_token())

    def attach_head(self, head: nn.Module | None) -> None:
        """Make ``head`` (a :class:`~tokenloom.interfaces.Head`) the model's token head.

        A continuous spec (``spec.token_dim = D > 0``) needs a continuous head of that width
        reading hidden states of ``d_model``: the backbone then returns hidden states, and the
        head (``self.token_head``, part of the model's weights and checkpoint) turns them into
        tokens. A discrete spec's head is its own output layer ``heads[0]`` — the categorical
        head, exactly as before heads existed — so a non-continuous ``head`` adds nothing (None
        stays None); a continuous head on a discrete spec is a ConfigError."""
        spec, d = self.spec, self.config.d_model
        continuous = bool(getattr(head, "continuous", False))
        if not spec.token_dim:
            if continuous:
                raise ConfigError([(f"head: {type(head).__name__} models continuous tokens, but the generator's "
                                   "model spec is discrete (token_dim 0): use head = 'categorical'")])
            self.token_head = None
            return
        if head is None or not continuous:
            name = "none" if head is None else type(head).__name__
            raise ConfigError([(f"head: the model spec is continuous (token_dim {spec.token_dim}); it needs a "
                               f"continuous head (diffusion, flow), got {name}")])
        if head.token_dim != spec.token_dim or head.hidden_dim != d:
            raise ConfigError([(f"head: {type(head).__name__} was built for token_dim {head.token_dim} and "
                               f"hidden_dim {head.hidden_dim}; the model needs {spec.token_dim} and {d}")])
        self.token_head = head

    def n_params(self, non_embedding: bool = True) -> int:
        """The number of parameters, without the embedding tables by default
        (nanoGPT's convention: they cost no FLOPs)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            for m in (getattr(self, "tok_emb", None), getattr(self, "cls_emb", None), getattr(self, "pos_emb", None),
                      self.tgt_emb, self.scale_emb, self.depth_emb, self.prefix_pos):
                if m is not None:
                    n -= m.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs (forward + backward) per token: ``6 N`` for the
        weights plus ``12 · n_layer · d · T`` for attention (Kaplan et al. 2020;
        PaLM appendix B). A depth head (RQ-Transformer) runs its layers over
        the D codes of every position's stack, so its weights count D times
        per token (6 N counts them once) plus its attention over D."""
        T = seq_len or self.spec.seq_len
        d = self.config.d_model
        flops = 6 * self.n_params() + 12 * self.n_block_layers * d * T  # heads' own blocks included
        if self.adaln is not None:  # AdaLN's linears run once per sequence, not per token
            n_ada = self.adaln.n_params()
            flops -= 6 * n_ada - (6 * n_ada) // T
        if self.depth_layers:
            D = len(self.heads)
            n_depth = sum(p.numel() for m in (*self.depth_blocks, self.depth_ln) for p in m.parameters())
            flops += 6 * (D - 1) * n_depth + 12 * self.depth_layers * d * D * D
        if self.token_head is not None:  # a continuous head: its own count (e.g. MAR's 4 noise draws per token)
            flops += self.head_flops_per_token() - 6 * sum(p.numel() for p in self.token_head.parameters())
        return flops

    def train(self, mode: bool = True) -> Transformer:
        """``nn.Module.train``, forgetting the kept weight list (:meth:`_layer_params`)."""
        self._inference_params = None
        return super().train(mode)

    def _layer_params(self) -> list[BlockWeights]:
        """Every block's weights (:meth:`Block.params`). In eval mode the list
        is kept between calls (a decoding step then gathers nothing); it is
        rebuilt by :meth:`new_cache` and :meth:`train` / ``eval``, so a block
        replaced on the module is picked up by the next generation."""
        if self.training:
            return [b.params() for b in self.blocks]
        if self._inference_params is None:
            self._inference_params = [b.params() for b in self.blocks]
        return self._inference_params

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty :class:`KVCache` for ``batch_size`` rows and ``max_len``
        tokens (default ``spec.seq_len``) on the weights' device and dtype."""
        self._inference_params = None
        p = next(self.parameters())
        return KVCache(self.n_block_layers, batch_size, self.config.n_head,
                       (max_len or self.spec.seq_len) + self.n_memory, self.head_dim, dtype=p.dtype,
                       device=p.device)

    def token_embeddings(self) -> torch.Tensor | None:
        """The input embedding table ``[V, C]``, or None for embedding inputs."""
        return self.tok_emb.weight if self.spec.input_kind == "tokens" else None

    # -- forward -------------------------------------------------------------

    def _class_embedding(self, cond: torch.Tensor) -> torch.Tensor:
        """``[B, C]``: the embedding at sequence index 0 (the prefix's last
        position) for ``cond`` (``LongTensor[B]``)."""
        if self._identity_table:  # the class token: one lookup, exactly as before conditioners
            return _lookup(self.cls_emb.weight, cond.long(), self._errors["cond"])
        return self._prefix(cond)[0][:, -1]

    def _prefix(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefix of ``cond`` (``LongTensor[B]``, rows of the condition
        table): embeddings ``[B, P, C]`` and the mask ``BoolTensor[B, P]``."""
        if self.cond_mask is None:
            raise InputError("this model has no condition table: call set_conditions(conditions, null) first")
        rows = cond.long()
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) > self.n_classes):
            raise InputError(self._errors["cond"])
        if self.prefix.kind == "tokens":
            x = _lookup(self.cls_emb.weight, self.cond_ids[rows], self._errors["cond"])  # (B, P, C)
        else:
            x = self.cond_proj(self.cond_emb[rows].to(self.cond_proj.weight.dtype))  # (B, P, C)
        if self.prefix_pos is not None:
            x = x + self.prefix_pos.weight
        return x, self.cond_mask[rows]

    def _mask(self, T: int, start: int, attn_mask: torch.Tensor | None, device: torch.device) -> Any:
        """What SDPA gets: None, ``"causal"`` (the fused path) or a boolean
        ``[T, S]`` / ``[B, 1, T, S]`` mask over the ``S = start + T`` keys."""
        S = start + T
        if attn_mask is not None:
            if attn_mask.dtype != torch.bool or attn_mask.shape[-2:] != (T, S):
                raise InputError(
                    f"attn_mask: expected a BoolTensor [.., {T}, {S}] (queries × keys), "
                    f"got {attn_mask.dtype} {tuple(attn_mask.shape)}"
                )
            return attn_mask[:, None] if attn_mask.dim() == 3 else attn_mask
        kind = self.spec.attention
        if kind == "bidirectional":
            return None
        if kind == "causal":
            if start == 0:
                return "causal"
            if T == 1:
                return None  # one query sees every cached key
            q = torch.arange(start, S, device=device)
            return torch.arange(S, device=device)[None, :] <= q[:, None]
        if kind == "block-causal" and self.spec.option("block_sizes") is not None:
            return block_causal_mask(tuple(self.spec.option("block_sizes")), device)[start:S, :S]
        raise InputError(f"attention {kind!r}: the generator must supply attn_mask")

    def forward(
        self,
        inputs: torch.Tensor,
        cond: torch.Tensor | None = None,
        *,
        positions: torch.Tensor | None = None,
        target_positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        depth_inputs: torch.Tensor | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """``inputs``: ``LongTensor[B, T]`` ids (or ``[B, T, D]`` embeddings);
        ``cond``: ``LongTensor[B]`` classes, used at sequence index 0;
        ``positions`` / ``target_positions``: ``[T]`` or ``[B, T]`` flat code
        positions (``-1``: none); with a ``cache`` the tokens continue the
        cached sequence. Returns logits ``[B, T, V]`` (``[B, 1, V]`` with
        ``last_only``) per head, or the final hidden states ``[B, T, C]``
        with ``return_hidden``.

        Depth-head models (RQ-Transformer) take ``inputs`` as stacks
        ``LongTensor[B, T, D]`` (summed embeddings) and return D logits, head
        d predicting code d of the next stack given its codes ``< d``:
        ``depth_inputs`` ``[B, T, D']`` are those codes (teacher forcing;
        default: the next input's stack, ``inputs[:, t + 1]``)."""
        B, T = inputs.shape[:2]
        start = cache.length if cache is not None else 0  # cached tokens (the longest row's, if ragged)
        dev = inputs.device
        slot = None  # (B, T): each new token's sequence index, when the rows continue their own prefixes
        if cache is not None and cache.ragged:
            slot = cache.lengths.to(dev)[:, None] + torch.arange(T, device=dev)
        M = self.n_memory
        if M and cond is None:
            cond = torch.full((B,), self.n_classes, dtype=torch.long, device=dev)
        pre = self._prefix(cond) if M else None  # ((B, P, C), (B, P)): a prefix of P > 1 positions
        x = self._embed(inputs, cond, start, slot, None if pre is None else pre[0][:, -1])  # (B, T, C)
        if positions is None:  # ([B,] T): the flat code position after the class token's
            positions = slot - 1 if slot is not None else torch.arange(start - 1, start - 1 + T, device=dev)
        x, rope = self._add_positions(x, positions, target_positions)  # (B, T, C), ([B,] T, 1, 1, hd/2)
        if self.rotate_ids is not None:  # RandAR's position instruction: its embedding rotated too
            x = rotate_inputs(x, inputs, rope, self.rotate_ids, self.config.n_head)

        if slot is not None and attn_mask is None and self.spec.attention == "causal":
            # row b's query t sees its own prefix and the new tokens up to t
            keys = torch.arange(start + T, device=dev)  # (S,)
            attn_mask = keys[None, None, :] <= slot[:, :, None]  # (B, T, S)
        mask = self._mask(T, start, attn_mask, dev)
        write_memory = False  # whether the M prefix positions before index 0 run in this pass
        if M:
            if cache is not None and cache.offset:  # written by an earlier call: only their keys
                mask = self._memory_mask(mask, B, T, start, cache.prefix_mask, False, dev)
            else:
                if start:
                    raise InputError("a prefix of several positions is written by a sequence's first call "
                                     "(start it at sequence index 0)")
                write_memory = True
                valid = pre[1][:, :-1]  # (B, M)
                x, rope = self._with_memory(x, rope, pre[0][:, :-1])  # (B, M + T, C)
                mask = self._memory_mask(mask, B, T, 0, valid, True, dev)
        if self.training and self.drop.p > 0:
            x = self.drop(x)
        dropout = self.config.dropout if self.training else 0.0
        n_head = self.config.n_head
        # one row (batch 1, one token): MKL's matrix-vector product, called without CPULinear's checks
        cpu_inference = x.device.type == "cpu" and not torch.is_grad_enabled() and B * T > 1
        linear = self._cpu_linear if cpu_inference else PLAIN_LINEAR
        c_vec, taps, hiddens = None, {}, None  # taps: depth -> the hidden states there (heads' own blocks)
        if self.adaln is None and self.head_blocks is None:
            for i, params in enumerate(self._layer_params()):
                x = block_forward(x, params, n_head, rope, mask, cache, i, dropout, linear)  # (B, T, C)
        else:  # AdaLN and/or heads with their own blocks
            mods = None
            if self.adaln is not None:  # VAR's AdaLN: blocks modulated by the condition vector (index 0's)
                if cond is None:
                    cond = torch.full((B,), self.n_classes, dtype=torch.long, device=dev)
                c_vec = self._class_embedding(cond) if pre is None else pre[0][:, -1]  # (B, C)
                mods = self.adaln(c_vec)

            def run(h: torch.Tensor, params: BlockWeights, i: int) -> torch.Tensor:
                if mods is None:
                    return block_forward(h, params, n_head, rope, mask, cache, i, dropout, linear)
                return adaln_block_forward(h, params, mods[i], n_head, rope, mask, cache, i, dropout, linear)

            want = self.head_blocks.taps if self.head_blocks is not None else frozenset()
            if 0 in want:
                taps[0] = x
            for i, params in enumerate(self._layer_params()):
                x = run(x, params, i)  # (B, T, C)
                if i + 1 in want:
                    taps[i + 1] = x
            if self.head_blocks is not None:  # per head: its depth of the stack, then its own blocks
                hiddens = head_hiddens(self, taps, run)
        if write_memory:
            x = x[:, M:]  # the prefix positions predict nothing
            if cache is not None:  # from now on the cache holds the prefix before index 0
                cache.offset, cache.prefix_mask = M, pre[1][:, :-1].clone()
        if cache is not None:
            cache.advance(T)
        if hiddens is not None:  # NAR / HMAR: each head through its own norm and output layer
            return head_outputs(self, hiddens, M if write_memory else 0, last_only, return_hidden, linear, c_vec)
        x = torch.layer_norm(x[:, -1:] if last_only else x, self.ln_f.normalized_shape, self.ln_f.weight,
                             self.ln_f.bias, self.ln_f.eps)  # (B, T or 1, C)
        if self.adaln is not None:  # VAR's AdaLNBeforeHead (ln_f has no affine weights then)
            x = self.adaln.modulate_head(x, c_vec)
        if return_hidden or self.token_head is not None:  # a continuous model: its head reads these
            return x
        if self.depth_layers:
            if depth_inputs is None:  # teacher forcing: the stack at t + 1 is what index t predicts
                nxt = torch.cat([inputs[:, 1:], torch.zeros_like(inputs[:, :1])], 1)  # (B, T, D)
                depth_inputs = nxt[:, -1:] if last_only else nxt
            out = self.depth_logits(x, depth_inputs[..., : len(self.heads) - 1])  # D × (B, T, V)
            return out[0] if len(out) == 1 else out
        logits = tuple(linear(x, head.weight) for head in self.heads)  # per head: (B, T or 1, V)
        return logits[0] if len(logits) == 1 else logits

    def _with_memory(self, x: torch.Tensor, rope: torch.Tensor | None,
                     memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x`` (``[B, T, C]``) with the ``M`` prefix positions ``memory``
        (``[B, M, C]``) in front, at no position, and the rotations to match
        (the identity for the prefix)."""
        M = memory.shape[1]
        mem = memory.to(x.dtype)
        if self.config.pos == "learned":
            mem = mem + self.pos_emb.weight[self.n_pos]
        if self.tgt_emb is not None:
            mem = mem + self.tgt_emb.weight[self.n_pos]
        x = torch.cat([mem, x], 1)
        if rope is not None:  # ([B,] T, 1, 1, hd/2): the prefix rotates by nothing
            one = torch.ones_like(rope.narrow(-4, 0, 1)).expand(*rope.shape[:-4], M, *rope.shape[-3:])
            rope = torch.cat([one, rope], -4)
        return x, rope

    def _memory_mask(self, mask: Any, B: int, T: int, start: int, valid: torch.Tensor, queries: bool,
                     dev: torch.device) -> torch.Tensor | None:
        """The attention mask with the ``M`` prefix keys in front: every query
        sees the real (``valid``, ``[B, M]``) ones. ``queries``: the prefix
        positions are queries of this pass too (causal among themselves,
        padding seen only by itself). ``[B, 1, T', M + S]`` (None when
        nothing is masked)."""
        S = start + T
        M = valid.shape[1]
        valid = valid.to(dev)
        if mask is None and not queries and bool(valid.all()):
            return None
        if mask is None:
            base = torch.ones(1, 1, T, S, dtype=torch.bool, device=dev)
        elif isinstance(mask, str):  # "causal" from index 0
            base = torch.ones(T, S, dtype=torch.bool, device=dev).tril(start)[None, None]
        else:
            base = mask if mask.dim() == 4 else mask[None, None]
        rows = torch.cat([valid[:, None, None, :].expand(B, 1, T, M), base.expand(B, 1, T, S)], -1)
        if not queries:
            return rows
        ar = torch.arange(M, device=dev)
        own = (ar[None, :] <= ar[:, None]) & (valid[:, None, :] | torch.eye(M, dtype=torch.bool, device=dev))
        mem_rows = torch.cat([own, torch.zeros(B, M, S, dtype=torch.bool, device=dev)], -1)[:, None]
        return torch.cat([mem_rows, rows], 2)  # (B, 1, M + T, M + S)

    def _embed(self, inputs: torch.Tensor, cond: torch.Tensor | None, start: int,
               slot: torch.Tensor | None, first: torch.Tensor | None = None) -> torch.Tensor:
        """The input embeddings ``[B, T, C]``: the tokens' (a stack's summed,
        or projected ``input_kind = "embeddings"`` vectors), with the class
        embedding of ``cond`` (default: the null class) — the prefix's last
        position, ``first`` when already computed — wherever a token sits
        at sequence index 0 (``start`` tokens are cached; ``slot``: every
        token's sequence index when the cache is ragged, else None)."""
        B = inputs.shape[0]
        is_cls = None if slot is None else slot == 0  # (B, T): the class slots of a ragged cache
        if self.spec.input_kind == "tokens":
            if inputs.dtype.is_floating_point or inputs.dim() != (3 if self.depth_layers else 2):
                want = "LongTensor[B, T, depth] of stacks" if self.depth_layers else "LongTensor[B, T] of ids"
                raise InputError(f"inputs: expected {want}, got {inputs.dtype} {tuple(inputs.shape)}")
            ids = inputs.long()  # (B, T) or (B, T, D)
            if is_cls is not None:
                ids = ids.masked_fill(is_cls[..., None] if ids.dim() == 3 else is_cls, 0)
            elif start == 0:  # the class slot's value is ignored
                ids = torch.cat([torch.zeros_like(ids[:, :1]), ids[:, 1:]], 1)
            x = _lookup(self.tok_emb.weight, ids, self._errors["ids"])  # (B, T, C) or (B, T, D, C)
            if x.dim() == 4:  # RQ-Transformer: a position's input is the sum of its stack's embeddings
                x = x.sum(2)
        else:
            x = self.in_proj(inputs)  # (B, T, input_dim) -> (B, T, C)
        if is_cls is not None:  # sequence index 0 of any row: the class token
            if is_cls.any():
                if cond is None:
                    cond = torch.full((B,), self.n_classes, dtype=torch.long, device=inputs.device)
                first = self._class_embedding(cond) if first is None else first
                x = torch.where(is_cls[..., None], first[:, None].to(x.dtype), x)
        elif start == 0:  # sequence index 0: the class token
            if cond is None:
                cond = torch.full((B,), self.n_classes, dtype=torch.long, device=inputs.device)
            first = self._class_embedding(cond) if first is None else first
            x = torch.cat([first[:, None].to(x.dtype), x[:, 1:]], 1)
        return x

    def _add_positions(self, x: torch.Tensor, positions: torch.Tensor,
                       target_positions: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x`` (``[B, T, C]``) plus its additive position embeddings
        (learned positions, scale and depth of multi-scale / residual layouts,
        RAR's target positions), and the rotations of ``pos = "rope2d"``
        (complex ``[B or 1, T, 1, 1, hd/2]``, broadcast over ``(q, k)`` and
        heads; None with learned positions)."""
        pos = torch.where(positions < 0, self.n_pos, positions).long()  # ([B,] T); no position -> n_pos
        if self.config.pos == "learned":
            x = x + _lookup(self.pos_emb.weight, pos, self._errors["positions"])
            rope = None
        else:  # ([B,] T, hd/2) -> ([B,] T, 1, 1, hd/2)
            rope = _lookup(self.rope_cis, pos, self._errors["positions"])[..., None, None, :]
        if self.scale_emb is not None or self.depth_emb is not None:
            has = (pos < self.n_pos).unsqueeze(-1).to(x.dtype)  # ([B,] T, 1): 0 for "no position"
        if self.scale_emb is not None:
            x = x + self.scale_emb(self.pos_scale[pos]) * has
        if self.depth_emb is not None:
            x = x + self.depth_emb(self.pos_depth[pos]) * has
        if self.tgt_emb is not None:
            if target_positions is None:
                raise InputError("this model has target-aware positions (RAR): pass target_positions")
            x = x + self.tgt_emb(torch.where(target_positions < 0, self.n_pos, target_positions).long())
        elif target_positions is not None:
            raise InputError("target_positions: this model has no target-aware positions "
                             "(its spec does not ask for ('target_aware', True))")
        return x, rope

    def depth_logits(self, hidden: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """RQ-Transformer's depth transformer: from hidden states ``[B, T, C]``
        and the first ``d`` codes of each position's stack ``[B, T, d]``, the
        logits ``[B, T, V]`` of depths ``0 .. d`` (a tuple of d + 1). The input
        at depth 0 is the hidden state, at depth j the summed embeddings of
        codes ``< j`` (Lee et al. 2022, eq. 6), plus a depth embedding; causal
        over depth."""
        B, T, C = hidden.shape
        d = codes.shape[-1]
        u = [hidden]
        if d:
            u += list(self.tok_emb(codes.long()).cumsum(2).unbind(2))  # Σ_{i<j} e(c_i), j = 1..d
        u = (torch.stack(u, 2) + self.depth_pos.weight[: d + 1]).reshape(B * T, d + 1, C)
        mask = self.depth_causal[: d + 1, : d + 1]
        for block in self.depth_blocks:
            u = block(u, None, mask, None, 0)
        u = self.depth_ln(u).reshape(B, T, d + 1, C)
        return tuple(self.heads[j](u[:, :, j]) for j in range(d + 1))


def build_model(spec: ModelSpec, config: ModelConfig, *, n_classes: int, seed: int = 0,
                conditioner: Any = None, conditions: Prefix | None = None, head: Any = None) -> Transformer:
    """The backbone for ``spec`` (what :func:`tokenloom.pipeline.run` trains),
    its initial weights a pure function of ``seed``. ``conditioner`` (a
    :class:`~tokenloom.interfaces.Conditioner`; None: class labels, one
    prefix token of ``n_classes + 1``) sets the prefix's format;
    ``conditions`` (its encoded conditions) the condition table, with the
    conditioner's null condition as the last row. ``head``: the run's
    :class:`~tokenloom.interfaces.Head`, or a callable that builds it (then
    built here, after the backbone, its weights drawn from the same seeded
    generator); attached by :meth:`Transformer.attach_head` (a discrete spec
    keeps its own output layer: the categorical head)."""
    fmt = None if conditioner is None else PrefixFormat.of(conditioner)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Transformer(spec, config, n_classes=n_classes, prefix=fmt)
        if spec.token_dim or head is not None:
            built = head() if callable(head) and not isinstance(head, nn.Module) else head
            model.attach_head(built)
    if conditioner is not None and (conditions is not None or not model._identity_table):
        if conditions is None:
            raise ConfigError("build_model: a conditioner other than class labels needs its encoded conditions")
        model.set_conditions(conditions, conditioner.null())
    return model


__all__ = [
    "BMM_ATTENTION_PAIRS",
    "NO_POSITION",
    "PLAIN_LINEAR",
    "Block",
    "BlockWeights",
    "CPULinear",
    "InstrumentedModel",
    "KVCache",
    "PlainLinear",
    "PrefixFormat",
    "Transformer",
    "apply_rope",
    "attend",
    "block_causal_mask",
    "block_forward",
    "build_model",
    "layout_coordinates",
    "rope2d_table",
    "rotate_pairs",
]
