"""The KV cache: one idea — the keys and values a decoding loop keeps between forward passes.

A :class:`KVCache` is preallocated for a batch and a maximum length, appended
to by every cached forward pass of the backbone
(:meth:`tokenloom.model.Transformer.forward` with ``cache=``), rolled back by
:meth:`KVCache.truncate` (rejected speculative drafts, Jacobi iterations) —
per row if each image keeps its own accepted prefix — and narrowed by
:meth:`KVCache.select_rows` when images leave the batch. Generators get one
from ``model.new_cache(batch_size)``; only the backbone reads or writes it.

:class:`StaticDecoder` is the other way to decode, as gpt-fast and LlamaGen do it on a GPU: one
decoding step of fixed shapes (a token per row, keys and values written at a position given as a
tensor, attention over the whole preallocated cache under a mask), so that ``torch.compile`` can
compile it once and, on CUDA, replay it as a CUDA graph (``mode="reduce-overhead"``).
:func:`static_raster_decode` is :func:`tokenloom.orders.raster_decode` through it — the same draws
in the same order, behind its ``compile`` flag.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..contract.errors import InputError
from ..contract.interfaces import StepInfo


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

    **A conditioning prefix.** When the backbone's prefix has ``M = P - 1``
    positions before sequence index 0, its first call writes them at the
    front of the cache and sets ``offset = M`` (and ``prefix_mask``, the real
    ones, ``BoolTensor[B, M]``); ``length``, ``lengths`` and :meth:`truncate`
    count the sequence after them, so a generator never sees the prefix.
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
        self.offset = 0  # prefix positions before sequence index 0 (written by the first call)
        self.prefix_mask: torch.Tensor | None = None  # BoolTensor[B, offset]: the real ones

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
        """B: the number of rows (images) the cache holds."""
        return self.k.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of the preallocated keys and values (what ``kv_cache_bytes`` reports)."""
        return self.k.nbytes + self.v.nbytes

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``/``v`` (``[B, H, T, hd]``) after the current length and
        return the keys/values ``[B, H, length + T, hd]`` to attend to."""
        T = k.shape[2]
        base = self.offset
        start, end = base + self.length, base + self.length + T
        if end > self.max_len:
            raise InputError(f"KV cache overflow: {end - base} tokens > max_len {self.max_len - base}")
        kl, vl = self._layers[layer]  # (B, H, max_len, hd) views, written in place
        if self.lengths is not None:  # ragged: row b writes at [lengths[b], lengths[b] + T)
            B = k.shape[0]
            rows = torch.arange(B, device=k.device)[:, None]  # (B, 1)
            cols = base + self.lengths.to(k.device)[:, None] + torch.arange(T, device=k.device)  # (B, T)
            kl[rows, :, cols] = k.transpose(1, 2)  # (B, T, H, hd)
            vl[rows, :, cols] = v.transpose(1, 2)
        else:
            kl.narrow(2, start, T).copy_(k)
            vl.narrow(2, start, T).copy_(v)
        return kl.narrow(2, 0, end), vl.narrow(2, 0, end)

    def advance(self, n: int) -> None:
        """Count ``n`` more cached tokens in every row (after a forward pass
        wrote them with :meth:`update` for each layer)."""
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
        if self.prefix_mask is not None:
            self.prefix_mask = self.prefix_mask[rows]
        if self.lengths is not None:
            self.lengths = self.lengths[rows]
            self.length = int(self.lengths.max()) if self.lengths.numel() else 0

    def reset(self) -> None:
        """Empty the cache (every row back to length 0, not ragged)."""
        self.length = 0
        self.lengths = None
        self.offset = 0
        self.prefix_mask = None


class StaticDecoder(torch.nn.Module):
    """One raster decoding step of fixed shapes for a plain causal backbone (gpt-fast's recipe).

    ``step(ids, cond, pos)``: ``ids`` ``LongTensor[B, 1]`` (ignored at ``pos`` 0, where the class
    embedding of ``cond`` stands), ``pos`` ``LongTensor[1]`` the sequence index; writes this token's
    keys and values at ``pos`` of the preallocated ``k_cache``/``v_cache`` (buffers
    ``[n_layer, B, H, max_len, hd]``, static addresses for CUDA graphs) and attends to the keys
    ``<= pos``; returns the logits ``[B, V]``. Every shape is the same at every step, so
    ``torch.compile`` traces it once (``compile=True``; ``mode``: ``"reduce-overhead"`` for CUDA
    graphs, the default on CUDA; ``backend``: torch.compile's, e.g. ``"eager"`` to check the graph
    capture alone). ``bf16``: autocast to bfloat16 (CPU or CUDA) with a bfloat16 cache. 2-D RoPE
    rotates with real cos/sin products (the complex multiply of the eager path, which inductor does
    not generate code for, written out).

    Supports the backbones of raster decoding: causal attention, token inputs, one head, the class
    token (no longer prefix, AdaLN, depth heads, multi-scale or target-aware positions) —
    :meth:`unsupported` says why not otherwise. The eager path (:class:`KVCache`) stays the product
    path; on the CPU this one computes the same products through ``F.linear`` (not oneDNN), so
    logits agree to rounding.
    """

    def __init__(self, model: Any, batch_size: int, max_len: int | None = None, *, compile: bool = False,
                 mode: str | None = None, bf16: bool = False, backend: str = "inductor"):
        super().__init__()
        model = getattr(model, "model", model)  # an InstrumentedModel's transformer
        why = self.unsupported(model)
        if why:
            raise InputError(f"static decoding: {why}")
        self.net = model
        cfg = model.config
        self.n_head, self.bf16 = cfg.n_head, bf16
        self.max_len = (max_len or model.spec.seq_len)
        p = next(model.parameters())
        dtype = torch.bfloat16 if bf16 else p.dtype
        shape = (cfg.n_layer, batch_size, cfg.n_head, self.max_len, cfg.d_model // cfg.n_head)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=p.device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=p.device), persistent=False)
        self.register_buffer("keys", torch.arange(self.max_len, device=p.device), persistent=False)
        self.rope = model.config.pos != "learned"
        if self.rope:  # the rotations as real tables (inductor generates no code for complex tensors)
            self.register_buffer("rope_cos", model.rope_cis.real.contiguous(), persistent=False)
            self.register_buffer("rope_sin", model.rope_cis.imag.contiguous(), persistent=False)
        self.compiled = compile
        if compile:
            if mode is None and p.device.type == "cuda":
                mode = "reduce-overhead"  # CUDA graphs
            self._step = torch.compile(self._forward, mode=mode, fullgraph=True, dynamic=False, backend=backend)
        else:
            self._step = self._forward

    @staticmethod
    def unsupported(model: Any) -> str | None:
        """Why ``model`` cannot decode through a :class:`StaticDecoder` (None: it can)."""
        model = getattr(model, "model", model)
        checks = [
            (getattr(model, "spec", None) is None or not hasattr(model, "blocks"), "not a tokenloom backbone"),
            (model.spec.attention != "causal", f"attention {model.spec.attention!r} (causal only)"),
            (model.spec.input_kind != "tokens", "embedding inputs"),
            (len(model.heads) != 1 or model.depth_layers, "several heads or depth heads"),
            (model.n_memory or not model._identity_table, "a conditioning prefix longer than the class token"),
            (model.adaln is not None, "AdaLN conditioning"),
            (model.scale_emb is not None or model.depth_emb is not None, "a multi-scale or residual layout"),
            (model.tgt_emb is not None, "target-aware positions (RAR)"),
        ] if hasattr(model, "spec") else [(True, "not a tokenloom backbone")]
        for bad, why in checks:
            if bad:
                return why
        return None

    def reset(self) -> None:
        """Forget every cached key and value (a new batch of sequences)."""
        self.k_cache.zero_()
        self.v_cache.zero_()

    def _forward(self, ids: torch.Tensor, cond: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        m = self.net
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            tok = F.embedding(ids[:, 0], m.tok_emb.weight)  # (B, C)
            cls = F.embedding(cond, m.cls_emb.weight)  # (B, C): sequence index 0
            x = torch.where(pos == 0, cls, tok)[:, None]  # (B, 1, C)
            flat = torch.where(pos > 0, pos - 1, m.n_pos)  # (1,): the flat code position (none at index 0)
            rope = None
            if self.rope:  # (1, 1, 1, hd/2) each
                rope = (self.rope_cos[flat][..., None, None, :], self.rope_sin[flat][..., None, None, :])
            else:
                x = x + F.embedding(flat, m.pos_emb.weight)
            B, _, C = x.shape
            H = self.n_head
            mask = (self.keys <= pos)[None, None, None, :]  # (1, 1, 1, max_len)
            for i, blk in enumerate(m.blocks):
                a, mlp = blk.attn, blk.mlp
                qkv = F.linear(F.layer_norm(x, (C,), blk.ln_1.weight, blk.ln_1.bias), a.qkv.weight, a.qkv.bias)
                qkv = qkv.view(B, 1, 3, H, C // H)
                if rope is not None:
                    q, k = _rotate(qkv[:, :, :2], *rope).unbind(2)
                else:
                    q, k = qkv[:, :, 0], qkv[:, :, 1]
                v = qkv[:, :, 2]
                q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, 1, hd)
                kc, vc = self.k_cache[i], self.v_cache[i]  # (B, H, max_len, hd)
                kc.index_copy_(2, pos, k.to(kc.dtype))
                vc.index_copy_(2, pos, v.to(vc.dtype))
                y = F.scaled_dot_product_attention(q.to(kc.dtype), kc, vc, attn_mask=mask)  # (B, H, 1, hd)
                x = x + F.linear(y.transpose(1, 2).reshape(B, 1, C), a.proj.weight, a.proj.bias)
                h = F.gelu(F.linear(F.layer_norm(x, (C,), blk.ln_2.weight, blk.ln_2.bias), mlp.fc.weight,
                                    mlp.fc.bias), approximate="tanh")
                x = x + F.linear(h, mlp.proj.weight, mlp.proj.bias)
            x = F.layer_norm(x, (C,), m.ln_f.weight, m.ln_f.bias, m.ln_f.eps)
            return F.linear(x, m.heads[0].weight)[:, 0].float()  # (B, V)

    @torch.no_grad()
    def step(self, ids: torch.Tensor, cond: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The logits ``[B, V]`` of one decoding step (see the class docstring); a copy, so the
        next step (a CUDA graph replay) does not overwrite them."""
        return self._step(ids, cond, pos).clone()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` (``[..., hd]``) with each pair ``(a, b)`` rotated to ``(a cos − b sin, a sin + b cos)``
    in float32 (:func:`tokenloom.model.rotate_pairs` without complex tensors)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    out = torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)
    return out.to(x.dtype)


def static_raster_decode(model: Any, chain: Any, cond: torch.Tensor, rng: Any, L: int, *,
                         compile: bool = False, mode: str | None = None, bf16: bool = False,
                         backend: str = "inductor", decoder: StaticDecoder | None = None) -> torch.Tensor:
    """:func:`tokenloom.orders.raster_decode` through a :class:`StaticDecoder`: one step per token,
    the chain's draw at step t for position t (guidance: the conditional and null rows in one batch).
    ``compile``/``mode``/``bf16``/``backend``: as :class:`StaticDecoder`; ``decoder``: one made before (kept
    between calls so a compiled step is compiled once; its batch must be the rows'). Returns
    ``LongTensor[B, L]``."""
    B = cond.shape[0]
    net = getattr(model, "model", model)
    dev = next(net.parameters()).device
    cond = cond.to(dev).long()
    guided = chain.needs_uncond
    rows = torch.cat([cond, torch.full_like(cond, net.n_classes)]) if guided else cond
    if decoder is None:
        decoder = StaticDecoder(net, rows.shape[0], L, compile=compile, mode=mode, bf16=bf16, backend=backend)
    elif decoder.k_cache.shape[1] != rows.shape[0] or decoder.max_len < L:
        raise InputError(f"static decoding: the decoder holds {decoder.k_cache.shape[1]} rows × {decoder.max_len} "
                         f"tokens, the batch needs {rows.shape[0]} × {L}")
    decoder.reset()
    codes = torch.zeros(B, L, dtype=torch.long, device=dev)
    token = torch.zeros(rows.shape[0], 1, dtype=torch.long, device=dev)
    steps = torch.arange(L, device=dev)
    for t in range(L):
        logits = decoder.step(token, rows, steps[t : t + 1])  # (rows, V)
        info = StepInfo(step=t, n_steps=L, positions=steps[t].expand(B), uncond_logits=logits[B:] if guided else None)
        nxt = chain.sample(logits[:B], info, rng)  # (B,)
        codes[:, t] = nxt
        token = (nxt.repeat(2) if guided else nxt)[:, None]
    return codes


__all__ = ["KVCache", "StaticDecoder", "static_raster_decode"]
