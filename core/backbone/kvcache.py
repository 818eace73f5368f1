"""The KV cache: one idea — the keys and values a decoding loop keeps between forward passes.

A :class:`KVCache` is preallocated for a batch and a maximum length, appended
to by every cached forward pass of the backbone
(:meth:`tokenloom.model.Transformer.forward` with ``cache=``), rolled back by
:meth:`KVCache.truncate` (rejected speculative drafts, Jacobi iterations) —
per row if each image keeps its own accepted prefix — and narrowed by
:meth:`KVCache.select_rows` when images leave the batch. Generators get one
from ``model.new_cache(batch_size)``; only the backbone reads or writes it.
"""

from __future__ import annotations

import torch

from ..contract.errors import InputError


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


__all__ = ["KVCache"]
