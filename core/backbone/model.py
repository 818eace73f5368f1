"""The backbone: a decoder transformer that every generation order shares.

Read it like nanoGPT (Karpathy, https://github.com/karpathy/nanoGPT): a
pre-norm GPT-2 block (LayerNorm, attention, 4×GELU MLP), with what visual
autoregression adds on top:

- **class conditioning** — index 0 of every sequence is the class token; its
  embedding comes from ``cond`` (``n_classes + 1`` rows, the last one the
  *null class* used for classifier-free guidance, LlamaGen §2.3);
- **positions** — ``pos = "learned"`` (an embedding per flat code position)
  or ``"rope2d"`` (LlamaGen's 2-D rotary embedding: half of each head's
  dimensions rotate with the row, half with the column). Position ids are
  flat code positions of ``spec.layout``; ``-1`` is "no position" (the class
  token: identity rotation, its own learned row);
- **target-aware positions** (RAR, Yu et al. 2024) when the spec asks for
  them: an additive embedding of the position the token *predicts*;
- **attention** through ``F.scaled_dot_product_attention`` with any mask a
  generator asks for: causal, bidirectional, block-causal, or a custom
  ``[T, S]`` / ``[B, T, S]`` boolean mask (True = may attend);
- **output heads** — one linear head per entry of ``spec.heads``;
- **a depth head** when the spec asks for one (``("depth_head", n_layer)``:
  RQ-Transformer, Lee et al. 2022): the input at a position is the sum of
  the embeddings of a stack of codes ``[B, T, D]``, and a small causal
  transformer over depth turns each hidden state into the D codes of the
  next stack, one head per depth (:meth:`Transformer.depth_logits`);
- **a preallocated KV cache** (:class:`KVCache`) with ``append`` (every
  forward writes its keys/values after the current length) and ``truncate``
  (roll back, for speculative and Jacobi decoding).

:class:`InstrumentedModel` is what generators receive: it counts forward
passes (NFE), tokens scored and wall time, and the run's cost metrics come
from it — plugins never report their own cost.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..contract.config import ModelConfig
from ..contract.errors import ConfigError, InputError
from ..contract.interfaces import NO_POSITION, ModelSpec, TokenLayout

# ---------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------


class KVCache:
    """Static, preallocated keys and values for ``n_layer`` layers:
    ``k``/``v`` are ``[n_layer, B, n_head, max_len, head_dim]``.

    A forward pass with a cache attends to the cached ``[0, length)`` plus its
    own ``T`` tokens and appends them (``length += T``). :meth:`truncate`
    rolls back to a shorter prefix (rejected speculative drafts); the stale
    entries beyond ``length`` are simply overwritten later.

    **Per-row lengths.** ``truncate(LongTensor[B])`` rolls every row back to
    its own length (speculative and Jacobi decoding, where each image keeps
    its own accepted prefix). From then on the cache is *ragged*:
    ``lengths`` holds the rows' lengths, ``length`` their maximum; a forward
    pass writes row ``b``'s ``T`` tokens at ``[lengths[b], lengths[b] + T)``,
    and the backbone masks each row's keys beyond its own prefix (causal
    attention), puts row ``b``'s default positions after its own prefix and
    the class embedding wherever a row's token sits at sequence index 0.
    With ``lengths`` None (the default) nothing changes.
    """

    def __init__(self, n_layer: int, batch: int, n_head: int, max_len: int, head_dim: int,
                 *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (n_layer, batch, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self._layers = list(zip(self.k.unbind(0), self.v.unbind(0)))  # per-layer (B, H, max_len, hd) views
        self.max_len = max_len
        self.length = 0
        self.lengths: torch.Tensor | None = None  # LongTensor[B] once ragged

    @property
    def ragged(self) -> bool:
        """Whether rows have their own lengths (after a per-row truncate)."""
        return self.lengths is not None

    def row_lengths(self) -> torch.Tensor:
        """``LongTensor[B]``: every row's cached length."""
        if self.lengths is not None:
            return self.lengths.clone()
        return torch.full((self.batch_size,), self.length, dtype=torch.long, device=self.k.device)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``/``v`` (``[B, H, T, hd]``) after the current length and
        return the keys/values ``[B, H, length + T, hd]`` to attend to."""
        T = k.shape[2]
        start, end = self.length, self.length + T
        if end > self.max_len:
            raise InputError(f"KV cache overflow: {end} tokens > max_len {self.max_len}")
        kl, vl = self._layers[layer]  # (B, H, max_len, hd) views, written in place
        if self.lengths is not None:  # ragged: row b writes at [lengths[b], lengths[b] + T)
            B = k.shape[0]
            rows = torch.arange(B, device=k.device)[:, None]  # (B, 1)
            cols = self.lengths.to(k.device)[:, None] + torch.arange(T, device=k.device)  # (B, T)
            kl[rows, :, cols] = k.transpose(1, 2)  # (B, T, H, hd)
            vl[rows, :, cols] = v.transpose(1, 2)
        else:
            kl.narrow(2, start, T).copy_(k)
            vl.narrow(2, start, T).copy_(v)
        return kl.narrow(2, 0, end), vl.narrow(2, 0, end)

    def advance(self, n: int) -> None:
        if self.lengths is not None:
            self.lengths = self.lengths + n
            self.length = int(self.lengths.max()) if self.lengths.numel() else 0
        else:
            self.length += n

    def truncate(self, length: int | torch.Tensor) -> None:
        """Roll back to the first ``length`` cached tokens — one length for
        every row (an int), or each row its own (``LongTensor[B]``, which
        makes the cache ragged)."""
        if isinstance(length, torch.Tensor) and length.dim() > 0:
            lengths = length.to(device=self.k.device, dtype=torch.long)
            if lengths.shape != (self.batch_size,):
                raise InputError(f"KV cache truncate: expected {self.batch_size} row lengths, got {tuple(lengths.shape)}")
            current = self.row_lengths()
            if (lengths < 0).any() or (lengths > current).any():
                raise InputError(f"KV cache truncate: row lengths must lie in [0, current length], got "
                                 f"{lengths.tolist()[:8]} for {current.tolist()[:8]}")
            self.lengths = lengths.clone()
            self.length = int(lengths.max()) if lengths.numel() else 0
            return
        length = int(length)
        if not 0 <= length <= (int(self.row_lengths().min()) if self.lengths is not None else self.length):
            raise InputError(f"KV cache truncate({length}): must lie in [0, {self.length}]")
        self.length = length
        if self.lengths is not None:
            self.lengths = torch.full_like(self.lengths, length)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows ``rows`` (``LongTensor[B']``, in that
        order) — e.g. to drop images that finished decoding."""
        rows = rows.to(self.k.device)
        self.k, self.v = self.k[:, rows], self.v[:, rows]
        self._layers = list(zip(self.k.unbind(0), self.v.unbind(0)))
        if self.lengths is not None:
            self.lengths = self.lengths[rows]
            self.length = int(self.lengths.max()) if self.lengths.numel() else 0

    def reset(self) -> None:
        self.length = 0
        self.lengths = None


# ---------------------------------------------------------------------------
# Positions
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


# ---------------------------------------------------------------------------
# The transformer
# ---------------------------------------------------------------------------


class PlainLinear:
    """The linears of :func:`block_forward` as plain ``torch.nn.functional``
    calls (training, accelerators, single rows): ``linear(x, w, b)``, and the
    two products :class:`CPULinear` fuses — ``gelu_tanh`` (the MLP's hidden
    layer) and ``add`` (a residual branch added to the stream)."""

    def __call__(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, w, b)

    def gelu_tanh(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.gelu(F.linear(x, w, b), approximate="tanh")

    def add(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, other: torch.Tensor) -> torch.Tensor:
        return other + F.linear(x, w, b)


PLAIN_LINEAR = PlainLinear()


class CPULinear(PlainLinear):
    """``F.linear`` for inference on the CPU, through oneDNN with each weight
    reordered once into its blocked layout ("prepacked", the way
    ``torch.compile``'s CPU backend runs frozen linears).

    Why: on the development machine (AMD EPYC, 2 cores) ``F.linear`` goes to
    MKL, whose fp32 GEMM reaches about half of what oneDNN's kernels do for
    the few-row products of a decoding step (bench/decode.py, docs/
    benchmarks.md), and MKL's result for a row depends on how many rows
    share the call (below 16) while oneDNN's does not — so with oneDNN an
    image's logits are the same bits whatever its batch. A single row (one
    image, one token) stays with ``F.linear``: MKL's matrix-vector product
    is the faster there — so a micro-batch of one image may differ from the
    same image among others in the last bits of its logits (rarely in a
    sampled token); with ``TOKENLOOM_ONEDNN=0`` (MKL everywhere) so may
    any batch of fewer than 16 rows.

    ``gelu_tanh`` and ``add`` run the MLP's GELU and the residual addition
    inside the same oneDNN kernel (post-ops): the addition gives the same
    bits as a separate one, the fused GELU differs from ``F.gelu`` by
    rounding (~1e-7).

    A packed weight is kept with the weight's version counter and made again
    after any in-place change (an optimizer step, ``load_state_dict``). Used
    only without autograd, for float32 on the CPU, and only where oneDNN
    is built in; ``TOKENLOOM_ONEDNN=0`` turns it off (then ``F.linear``
    everywhere). If the oneDNN call fails, it says so once and falls back.
    """

    def __init__(self) -> None:
        # id(w) -> (w, its version counter, its storage address, the packed weight)
        self._packed: dict[int, tuple[torch.Tensor, int, int, torch.Tensor]] = {}
        self.enabled = _onednn_wanted()
        # looked up once (~1 µs a time)
        self._op = torch.ops.mkldnn._linear_pointwise if self.enabled else None
        self._binary = torch.ops.mkldnn._linear_pointwise.binary if self.enabled else None

    def __getstate__(self) -> dict:  # a model that is pickled (torch.save(model)) packs again where it is loaded
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def __call__(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        packed = self._packed_for(x, w)
        return F.linear(x, w, b) if packed is None else self._op(x, packed, b, "none", [], "")

    def gelu_tanh(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        packed = self._packed_for(x, w)
        if packed is None:
            return super().gelu_tanh(x, w, b)
        return self._op(x, packed, b, "gelu", [], "tanh")

    def add(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, other: torch.Tensor) -> torch.Tensor:
        packed = self._packed_for(x, w)
        if packed is None or other.shape != (*x.shape[:-1], w.shape[0]) or other.dtype != x.dtype:
            return super().add(x, w, b, other)
        return self._binary(x, other, packed, b, "add")

    def _packed_for(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
        """``w`` packed for oneDNN, or None where ``F.linear`` serves (off,
        not float32, a single row)."""
        if not self.enabled or x.dtype != torch.float32 or x.numel() <= x.shape[-1]:
            return None
        hit = self._packed.get(id(w))
        if hit is None or hit[0] is not w or hit[1] != w._version or hit[2] != w.data_ptr():
            hit = self._pack(w)
            if hit is None:
                return None
        return hit[3]

    def _pack(self, w: torch.Tensor) -> tuple[torch.Tensor, int, int, torch.Tensor] | None:
        try:
            with torch.no_grad():
                packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), 16)
        except Exception as exc:  # noqa: BLE001 - a torch without these ops: plain F.linear from now on
            import warnings

            warnings.warn(f"tokenloom: oneDNN linear unavailable ({exc!s:.100}); using F.linear", stacklevel=3)
            self.enabled = False
            return None
        if len(self._packed) > 4096:
            self._packed.clear()
        hit = self._packed[id(w)] = (w, w._version, w.data_ptr(), packed)
        return hit


def _onednn_wanted() -> bool:
    import os

    if os.environ.get("TOKENLOOM_ONEDNN", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn  # private operators (what torch.compile's CPU backend calls): check they exist
    return hasattr(ops, "_linear_pointwise") and hasattr(ops, "_reorder_linear_weight")


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


#: From this many (row, head) pairs on, one query each (a decoding step of a
#: batch) attends through two batched products instead of SDPA's CPU flash
#: kernel, which runs a pair of tiny products per pair: 13–30 % faster at 64–128
#: pairs on the development machine, slower below 32.
BMM_ATTENTION_PAIRS = 64


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, dropout: float = 0.0) -> torch.Tensor:
    """``softmax(q kᵀ / √hd) v`` for ``q`` ``[B, H, T, hd]`` over keys/values
    ``[B, H, S, hd]``; ``mask`` as SDPA takes it (None, ``"causal"`` or a
    boolean mask). Scaled dot-product attention, except for the batched
    one-query case on the CPU (:data:`BMM_ATTENTION_PAIRS`)."""
    B, H, T, hd = q.shape
    if (T == 1 and mask is None and not dropout and B * H >= BMM_ATTENTION_PAIRS and q.device.type == "cpu"
            and q.dtype == torch.float32 and not q.requires_grad):
        S = k.shape[2]
        w = torch.bmm(q.reshape(B * H, 1, hd) * hd**-0.5, k.reshape(B * H, S, hd).transpose(1, 2))  # (BH, 1, S)
        return torch.bmm(torch.softmax(w, -1), v.reshape(B * H, S, hd)).view(B, H, 1, hd)
    causal = isinstance(mask, str)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else mask, is_causal=causal,
                                          dropout_p=dropout)


def block_forward(x: torch.Tensor, p: tuple[torch.Tensor, ...], n_head: int, rope: torch.Tensor | None, mask: Any,
                  cache: KVCache | None, layer: int, dropout: float = 0.0,
                  linear: PlainLinear = PLAIN_LINEAR) -> torch.Tensor:
    """One pre-norm GPT-2 block on ``x`` (``[B, T, C]``) as plain functions of
    its weights ``p`` (:meth:`Block.params`), so that a decoding step costs
    the kernels and not the ``nn.Module`` calls around them: ``x + attn(ln_1
    x)``, then ``x + mlp(ln_2 x)``. ``rope``: the rotations ``cos θ + i·sin θ``
    (complex) shaped ``[B or 1, T, 1, 1, hd/2]`` to broadcast over ``(q, k)``
    and heads; ``mask``: what SDPA gets (``"causal"``: its fused causal path);
    ``dropout``: attention and residual dropout (training only); ``linear``:
    how the products are computed (:class:`PlainLinear`, or
    :class:`CPULinear` for inference on the CPU)."""
    ln1_w, ln1_b, qkv_w, qkv_b, o_w, o_b, ln2_w, ln2_b, fc_w, fc_b, out_w, out_b = p
    B, T, C = x.shape
    # torch.layer_norm: F.layer_norm's checks cost more than the kernel on a one-token decoding step
    qkv = linear(torch.layer_norm(x, (C,), ln1_w, ln1_b), qkv_w, qkv_b).view(B, T, 3, n_head, C // n_head)
    if rope is not None and (qkv.requires_grad or qkv.dtype != torch.float32):  # q and k: one complex multiply
        (q, k), v = rotate_pairs(qkv[:, :, :2], rope).unbind(2), qkv[:, :, 2]  # (B, T, H, hd) each
    else:
        if rope is not None:  # the same multiply, in place on the projection's own output (no autograd here)
            torch.view_as_complex(qkv.unflatten(-1, (-1, 2)))[:, :, :2].mul_(rope)
        q, k, v = qkv.unbind(2)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd)
    if cache is not None:
        k, v = cache.update(layer, k, v)  # (B, H, S, hd)
    y = attend(q, k, v, mask, dropout)  # (B, H, T, hd)
    y = y.transpose(1, 2).reshape(B, T, C)
    if dropout:  # training
        x = x + F.dropout(linear(y, o_w, o_b), dropout)
        h = linear.gelu_tanh(torch.layer_norm(x, (C,), ln2_w, ln2_b), fc_w, fc_b)
        return x + F.dropout(linear(h, out_w, out_b), dropout)
    x = linear.add(y, o_w, o_b, x)  # x + proj(y)
    return linear.add(linear.gelu_tanh(torch.layer_norm(x, (C,), ln2_w, ln2_b), fc_w, fc_b), out_w, out_b, x)


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

    def params(self) -> tuple[torch.Tensor, ...]:
        """The weights in :func:`block_forward`'s order."""
        a, m = self.attn, self.mlp
        return (self.ln_1.weight, self.ln_1.bias, a.qkv.weight, a.qkv.bias, a.proj.weight, a.proj.bias,
                self.ln_2.weight, self.ln_2.bias, m.fc.weight, m.fc.bias, m.proj.weight, m.proj.bias)

    def forward(self, x, rope, mask, cache, layer):
        return block_forward(x, self.params(), self.n_head, rope, mask, cache, layer,
                             self.dropout if self.training else 0.0)


class Transformer(nn.Module):
    """Decoder transformer built from a generator's :class:`ModelSpec` and the
    ``[model]`` config. ``forward`` returns logits ``[B, T, V_head]`` (a
    tuple of them when the spec has several heads)."""

    def __init__(self, spec: ModelSpec, config: ModelConfig, *, n_classes: int):
        super().__init__()
        if n_classes < 1:
            raise ConfigError(f"model: n_classes must be >= 1, got {n_classes}")
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
        self.cls_emb = nn.Embedding(n_classes + 1, d)  # row n_classes: the null class
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

        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self._inference_params: list[tuple[torch.Tensor, ...]] | None = None  # see _layer_params
        self._cpu_linear = CPULinear()
        self._errors = {  # the messages of bad inputs, made once (they are looked for on every step)
            "ids": f"inputs: ids must lie in [0, {spec.vocab_size})",
            "positions": f"positions: must lie in [-1, {self.n_pos})",
            "cond": f"cond: class ids must lie in [0, {n_classes}] ({n_classes}: the null class)",
        }
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

        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scaled residual projections
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

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
        return self.config.d_model // self.config.n_head

    def n_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            for m in (getattr(self, "tok_emb", None), self.cls_emb, getattr(self, "pos_emb", None), self.tgt_emb,
                      self.scale_emb, self.depth_emb):
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
        flops = 6 * self.n_params() + 12 * self.config.n_layer * d * T
        if self.depth_layers:
            D = len(self.heads)
            n_depth = sum(p.numel() for m in (*self.depth_blocks, self.depth_ln) for p in m.parameters())
            flops += 6 * (D - 1) * n_depth + 12 * self.depth_layers * d * D * D
        return flops

    def train(self, mode: bool = True) -> Transformer:
        self._inference_params = None
        return super().train(mode)

    def _layer_params(self) -> list[tuple[torch.Tensor, ...]]:
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
        self._inference_params = None
        p = next(self.parameters())
        return KVCache(self.config.n_layer, batch_size, self.config.n_head, max_len or self.spec.seq_len,
                       self.head_dim, dtype=p.dtype, device=p.device)

    def token_embeddings(self) -> torch.Tensor | None:
        return self.tok_emb.weight if self.spec.input_kind == "tokens" else None

    # -- forward -------------------------------------------------------------

    def _class_embedding(self, cond: torch.Tensor) -> torch.Tensor:
        return _lookup(self.cls_emb.weight, cond.long(), self._errors["cond"])

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
        start = cache.length if cache is not None else 0
        dev = inputs.device
        ragged = cache is not None and cache.ragged  # rows continue their own prefixes
        if ragged:
            slot = cache.lengths.to(dev)[:, None] + torch.arange(T, device=dev)  # (B, T) sequence index
            is_cls = slot == 0
        if self.spec.input_kind == "tokens":
            if inputs.dtype.is_floating_point or inputs.dim() != (3 if self.depth_layers else 2):
                want = "LongTensor[B, T, depth] of stacks" if self.depth_layers else "LongTensor[B, T] of ids"
                raise InputError(f"inputs: expected {want}, got {inputs.dtype} {tuple(inputs.shape)}")
            ids = inputs.long()
            if ragged:
                ids = ids.masked_fill(is_cls[..., None] if ids.dim() == 3 else is_cls, 0)
            elif start == 0:  # the class slot's value is ignored
                ids = torch.cat([torch.zeros_like(ids[:, :1]), ids[:, 1:]], 1)
            x = _lookup(self.tok_emb.weight, ids, self._errors["ids"])
            if x.dim() == 4:  # RQ-Transformer: a position's input is the sum of its stack's embeddings
                x = x.sum(2)
        else:
            x = self.in_proj(inputs)
        if ragged:  # sequence index 0 of any row: the class token
            if is_cls.any():
                if cond is None:
                    cond = torch.full((B,), self.n_classes, dtype=torch.long, device=dev)
                x = torch.where(is_cls[..., None], self._class_embedding(cond)[:, None].to(x.dtype), x)
        elif start == 0:  # sequence index 0: the class token
            if cond is None:
                cond = torch.full((B,), self.n_classes, dtype=torch.long, device=dev)
            x = torch.cat([self._class_embedding(cond)[:, None], x[:, 1:]], 1)

        if positions is None:
            positions = slot - 1 if ragged else torch.arange(start - 1, start - 1 + T, device=dev)
        pos = torch.where(positions < 0, self.n_pos, positions).long()  # no position -> n_pos
        if self.config.pos == "learned":
            x = x + _lookup(self.pos_emb.weight, pos, self._errors["positions"])
            rope = None
        else:  # ([B,] T, hd/2) -> ([B,] T, 1, 1, hd/2): broadcast over (q, k) and heads
            rope = _lookup(self.rope_cis, pos, self._errors["positions"])[..., None, None, :]
        if self.scale_emb is not None or self.depth_emb is not None:
            has = (pos < self.n_pos).unsqueeze(-1).to(x.dtype)
        if self.scale_emb is not None:
            x = x + self.scale_emb(self.pos_scale[pos]) * has
        if self.depth_emb is not None:
            x = x + self.depth_emb(self.pos_depth[pos]) * has
        if self.tgt_emb is not None:
            if target_positions is None:
                raise InputError("this model has target-aware positions (RAR): pass target_positions")
            x = x + self.tgt_emb(torch.where(target_positions < 0, self.n_pos, target_positions).long())

        if ragged and attn_mask is None and self.spec.attention == "causal":
            # row b's query t sees its own prefix and the new tokens up to t
            keys = torch.arange(start + T, device=dev)  # (S,)
            attn_mask = keys[None, None, :] <= slot[:, :, None]  # (B, T, S)
        mask = self._mask(T, start, attn_mask, dev)
        if self.training and self.drop.p > 0:
            x = self.drop(x)
        dropout = self.config.dropout if self.training else 0.0
        n_head = self.config.n_head
        # one row (batch 1, one token): MKL's matrix-vector product, called without CPULinear's checks
        cpu_inference = x.device.type == "cpu" and not torch.is_grad_enabled() and B * T > 1
        linear = self._cpu_linear if cpu_inference else PLAIN_LINEAR
        for i, params in enumerate(self._layer_params()):
            x = block_forward(x, params, n_head, rope, mask, cache, i, dropout, linear)
        if cache is not None:
            cache.advance(T)
        x = torch.layer_norm(x[:, -1:] if last_only else x, self.ln_f.normalized_shape, self.ln_f.weight,
                             self.ln_f.bias, self.ln_f.eps)
        if return_hidden:
            return x
        if self.depth_layers:
            if depth_inputs is None:  # teacher forcing: the stack at t + 1 is what index t predicts
                nxt = torch.cat([inputs[:, 1:], torch.zeros_like(inputs[:, :1])], 1)
                depth_inputs = nxt[:, -1:] if last_only else nxt
            out = self.depth_logits(x, depth_inputs[..., : len(self.heads) - 1])
            return out[0] if len(out) == 1 else out
        logits = tuple(linear(x, head.weight) for head in self.heads)
        return logits[0] if len(logits) == 1 else logits

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


def build_model(spec: ModelSpec, config: ModelConfig, *, n_classes: int, seed: int = 0) -> Transformer:
    """The backbone for ``spec`` (what :func:`tokenloom.pipeline.run` trains),
    its initial weights a pure function of ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Transformer(spec, config, n_classes=n_classes)


# ---------------------------------------------------------------------------
# Instrumentation
# ---------------------------------------------------------------------------


class InstrumentedModel:
    """The backbone as generators see it: calling it runs one forward pass
    (no gradients) and counts it.

    Counters: ``nfe`` (forward passes), ``tokens`` (input tokens scored,
    rows × T), ``seconds`` (wall time inside the backbone) and
    ``kv_cache_bytes`` (the largest cache allocated). :meth:`reset` zeroes them.
    """

    def __init__(self, model: Transformer):
        self.model = model
        self.reset()

    def reset(self) -> None:
        self.nfe = 0
        self.tokens = 0
        self.seconds = 0.0
        self.kv_cache_bytes = 0
        self.depth_steps = 0  # depth-head steps (RQ-Transformer); not forward passes of the backbone

    def counters(self) -> dict[str, float]:
        return {"nfe": self.nfe, "tokens": self.tokens, "seconds": self.seconds,
                "kv_cache_bytes": self.kv_cache_bytes}

    # what generators need to know
    @property
    def spec(self) -> ModelSpec:
        return self.model.spec

    @property
    def n_classes(self) -> int:
        return self.model.n_classes

    @property
    def null_class(self) -> int:
        """The class id of unconditional rows (classifier-free guidance)."""
        return self.model.n_classes

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def token_embeddings(self) -> torch.Tensor | None:
        return self.model.token_embeddings()

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        cache = self.model.new_cache(batch_size, max_len)
        self.kv_cache_bytes = max(self.kv_cache_bytes, cache.nbytes)
        return cache

    def __call__(self, inputs: torch.Tensor, cond: torch.Tensor | None = None, **kwargs: Any):
        cuda = inputs.is_cuda
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if torch.is_grad_enabled():
            with torch.no_grad():
                out = self.model(inputs, cond, **kwargs)
        else:  # already under no_grad / inference_mode (the pipeline's decoding loop)
            out = self.model(inputs, cond, **kwargs)
        if cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - t0
        self.nfe += 1
        self.tokens += inputs.shape[0] * inputs.shape[1]
        return out

    def depth_logits(self, hidden: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The depth head on hidden states of a ``return_hidden`` pass: timed
        into ``seconds`` and counted in ``depth_steps``, not in ``nfe`` (one
        backbone pass per position, as RQ-Transformer counts it)."""
        cuda = hidden.is_cuda
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = self.model.depth_logits(hidden, codes)
        if cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - t0
        self.depth_steps += 1
        return out


__all__ = [
    "BMM_ATTENTION_PAIRS",
    "NO_POSITION",
    "PLAIN_LINEAR",
    "CPULinear",
    "InstrumentedModel",
    "KVCache",
    "PlainLinear",
    "Transformer",
    "apply_rope",
    "attend",
    "block_causal_mask",
    "build_model",
    "layout_coordinates",
    "rope2d_table",
    "rotate_pairs",
]
