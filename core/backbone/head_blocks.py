"""Output heads that read the backbone at different depths — the spec option
``("head_blocks", (n_0, n_1, ...))``, one entry per output head.

Head ``k`` reads the hidden state after ``n_layer + n_k`` transformer blocks:
the backbone runs ``n_layer + max(n_k)`` blocks in one stack (every block
KV-cached like the others), and the extra blocks after the ``n_layer``-th
belong to the heads that read past them. Every head has its own final norm
(head 0 the backbone's ``ln_f``, head ``k ≥ 1`` its own LayerNorm) and its
own output layer.

This is NAR's structure (He et al. 2025, reference code ThisisBillhe/NAR,
``NAR-images/autoregressive/models/gpt.py``: ``Transformer.__init__`` builds
``n_layer + medusa_attention_num`` layers; ``forward`` taps the right head's
hidden state after layer ``n_layer`` (``norm``, ``output``) and the down
head's after the last (``medusa_norm``, ``medusa_output``)): the
``neighboring`` generator asks for ``head_blocks = (0, 1)``, the reference's
``medusa_attention_num = 1``. The reference's norms are RMSNorm and its right
output layer starts at zero (LlamaGen's init); tokenloom's are LayerNorm and
normal(0.02), as its other heads. Under ``[model] cond = "adaln"`` every
head's norm is affine-free and modulated by VAR's ``AdaLNBeforeHead``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..contract.errors import ConfigError


def head_blocks_of(spec: Any) -> tuple[int, ...] | None:
    """The spec's ``head_blocks`` (extra blocks before each head), checked
    against its heads; None when the spec does not ask for them."""
    raw = spec.option("head_blocks")
    if raw is None:
        return None
    try:
        blocks = tuple(int(n) for n in raw)
    except (TypeError, ValueError):
        raise ConfigError(f"model: spec option head_blocks must be a tuple of ints, got {raw!r}") from None
    if len(blocks) != len(spec.heads) or min(blocks) < 0 or any(int(n) != n for n in raw):
        raise ConfigError(f"model: head_blocks {raw!r} needs one count >= 0 per head ({len(spec.heads)} heads)")
    if spec.option("depth_head"):
        raise ConfigError("model: head_blocks and depth_head cannot be combined")
    return blocks


def head_norms(blocks: tuple[int, ...] | None, d: int) -> nn.ModuleList | None:
    """The final norms of heads 1, 2, ... (head 0 keeps ``ln_f``)."""
    return None if blocks is None else nn.ModuleList(nn.LayerNorm(d) for _ in blocks[1:])


def tapped_outputs(model: Any, taps: list[torch.Tensor], memory: int, last_only: bool,
                   return_hidden: bool, linear: Any, c_vec: torch.Tensor | None) -> Any:
    """The heads' logits from ``taps`` (``taps[j]``: the hidden states
    ``[B, M + T, C]`` after ``n_layer + j`` blocks): head ``k`` reads
    ``taps[head_blocks[k]]`` without its ``memory`` prefix positions, through
    its own norm (and AdaLN's head modulation when the model has it) and
    output layer. ``return_hidden``: head 0's normalised hidden states."""
    out = []
    for k, (n, head) in enumerate(zip(model.head_blocks, model.heads, strict=True)):
        h = taps[n][:, memory:]
        if last_only:
            h = h[:, -1:]
        ln = model.ln_f if k == 0 else model.head_lns[k - 1]
        h = torch.layer_norm(h, ln.normalized_shape, ln.weight, ln.bias, ln.eps)  # (B, T or 1, C)
        if model.adaln is not None:
            h = model.adaln.modulate_head(h, c_vec)
        if return_hidden:
            return h
        out.append(linear(h, head.weight))  # (B, T or 1, V)
    return out[0] if len(out) == 1 else tuple(out)


__all__ = ["head_blocks_of", "head_norms", "tapped_outputs"]
