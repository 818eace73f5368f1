"""Output heads with transformer blocks of their own — two spec options, one
entry per output head:

- ``("head_blocks", (n_0, n_1, ...))`` — head ``k`` reads the hidden state
  after ``n_layer + n_k`` blocks: the backbone runs ``n_layer + max(n_k)``
  blocks in one stack, and the blocks after the ``n_layer``-th belong to the
  heads that read past them. NAR's structure (He et al. 2025, reference code
  ThisisBillhe/NAR, ``NAR-images/autoregressive/models/gpt.py``:
  ``Transformer.__init__`` builds ``n_layer + medusa_attention_num`` layers;
  ``forward`` taps the right head's hidden state after layer ``n_layer``
  (``norm``, ``output``) and the down head's after the last
  (``medusa_norm``, ``medusa_output``)): ``neighboring`` asks for
  ``(0, 1)``, the reference's ``medusa_attention_num = 1``.
- ``("head_branch", (k_0, k_1, ...))`` — head ``k`` has its own copy of the
  last ``k_k`` blocks: it reads the shared stack after ``n_layer − k_k``
  blocks, then runs its own ``k_k`` blocks (a branch beside the stack's last
  ones). An entry may be an int (blocks) or a float in ``[0, 1]`` (that
  fraction of ``n_layer``, rounded, at least one block when above 0). HMAR's
  mask path (Kumbong et al. 2025, reference code NVlabs/HMAR,
  ``models/hmar.py``: ``base_blocks`` of ``depth − n_layers_train``, then
  ``ns_blocks`` / ``mask_blocks`` of ``n_layers_train`` each, 8 of 16):
  ``next-scale-markov`` asks for ``(0, 0.5)``. Head 0 must be 0 (it reads the
  stack; branching the first head as well is the same model with a shallower
  stack).

Either way every head has its own final norm (head 0 the backbone's
``ln_f``, head ``k ≥ 1`` its own LayerNorm) and output layer, and the heads'
own blocks are KV-cached like the stack's (cache layers after the stack's).
The reference's norms are RMSNorm (NAR) and its right output layer starts at
zero (LlamaGen's init); tokenloom's are LayerNorm and normal(0.02), as its
other heads. Under ``[model] cond = "adaln"`` the heads' own blocks are
modulated like the others and every head's norm is affine-free and
modulated by VAR's ``AdaLNBeforeHead``. Training runs every head's blocks on
every row, and ``flops_per_token`` counts them all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from ..contract.errors import ConfigError


class HeadPaths(NamedTuple):
    """Where each head reads: after ``starts[k]`` blocks of the stack, then
    ``own[k]`` blocks of its own; ``extra``: blocks the stack has beyond
    ``n_layer`` (``head_blocks``)."""

    starts: tuple[int, ...]
    own: tuple[int, ...]
    extra: int

    @property
    def taps(self) -> frozenset[int]:
        """The stack depths some head reads."""
        return frozenset(self.starts)


def _counts(spec: Any, name: str) -> tuple[Any, ...] | None:
    raw = spec.option(name)
    if raw is None:
        return None
    if not isinstance(raw, (tuple, list)) or len(raw) != len(spec.heads) or any(
            isinstance(n, bool) or not isinstance(n, (int, float)) or n < 0 for n in raw):
        raise ConfigError(f"model: spec option {name} {raw!r} needs one count >= 0 per head "
                          f"({len(spec.heads)} heads)")
    return tuple(raw)


def head_paths_of(spec: Any, n_layer: int) -> HeadPaths | None:
    """The spec's ``head_blocks`` / ``head_branch``, checked against its heads
    and the backbone's ``n_layer``; None when it asks for neither."""
    blocks, branch = _counts(spec, "head_blocks"), _counts(spec, "head_branch")
    if blocks is None and branch is None:
        return None
    if blocks is not None and branch is not None:
        raise ConfigError("model: head_blocks and head_branch cannot be combined")
    if spec.option("depth_head"):
        raise ConfigError("model: per-head blocks (head_blocks, head_branch) and depth_head cannot be combined")
    if blocks is not None:
        if any(not isinstance(n, int) for n in blocks):
            raise ConfigError(f"model: head_blocks {blocks!r} must be whole numbers of blocks")
        return HeadPaths(tuple(n_layer + n for n in blocks), (0,) * len(blocks), max(blocks))
    own = []
    for k in branch:
        if isinstance(k, float):
            if k > 1:
                raise ConfigError(f"model: head_branch fraction {k} must lie in [0, 1]")
            k = max(1, round(k * n_layer)) if k > 0 else 0
        if k > n_layer:
            raise ConfigError(f"model: head_branch {branch!r}: a head cannot copy more than the {n_layer} blocks")
        own.append(int(k))
    if own[0]:
        raise ConfigError(f"model: head_branch {branch!r}: head 0 reads the stack (its entry must be 0)")
    return HeadPaths(tuple(n_layer - k for k in own), tuple(own), 0)


def head_norms(paths: HeadPaths | None, d: int) -> nn.ModuleList | None:
    """The final norms of heads 1, 2, ... (head 0 keeps ``ln_f``)."""
    return None if paths is None else nn.ModuleList(nn.LayerNorm(d) for _ in paths.starts[1:])


def branch_blocks(paths: HeadPaths | None, make_block: Callable[[], nn.Module]) -> nn.ModuleList | None:
    """Per head, its own blocks (``head_branch``; None without any)."""
    if paths is None or not any(paths.own):
        return None
    return nn.ModuleList(nn.ModuleList(make_block() for _ in range(k)) for k in paths.own)


def head_hiddens(model: Any, taps: dict[int, torch.Tensor],
                 run: Callable[[torch.Tensor, Any, int], torch.Tensor]) -> list[torch.Tensor]:
    """Per head, its last hidden states ``[B, M + T, C]``: ``taps[starts[k]]``
    (depth -> the hidden states after that many blocks of the stack) through
    the head's own blocks (``run(x, weights, layer)``, ``layer`` numbering the
    KV cache's and AdaLN's layers, after the stack's). Run in the same pass as
    the stack, before the cache advances."""
    paths = model.head_blocks
    out, layer = [], len(model.blocks)
    for k in range(len(model.heads)):
        h = taps[paths.starts[k]]
        if paths.own[k]:
            for block in model.branch_blocks[k]:
                h = run(h, block.params(), layer)
                layer += 1
        out.append(h)
    return out


def head_outputs(model: Any, hiddens: list[torch.Tensor], memory: int, last_only: bool,
                 return_hidden: bool, linear: Any, c_vec: torch.Tensor | None) -> Any:
    """The heads' logits from :func:`head_hiddens`: each without its ``memory``
    prefix positions, through its own norm (and AdaLN's head modulation when
    the model has it) and output layer. ``return_hidden``: head 0's
    normalised hidden states."""
    out = []
    for k, (h, head) in enumerate(zip(hiddens, model.heads, strict=True)):
        h = h[:, memory:]
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


__all__ = ["HeadPaths", "branch_blocks", "head_hiddens", "head_norms", "head_outputs", "head_paths_of"]
