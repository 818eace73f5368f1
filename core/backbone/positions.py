"""Input embeddings rotated by their own position — the spec option
``("rotate_ids", (id, ...))``: the input embedding of every token whose id
is listed is rotated, before the first block, by the 2-D RoPE of the position
it sits at (each head's slice of the vector by the same rotation the heads'
queries and keys get there); positions ``-1`` (no position) rotate by nothing.

This is RandAR's position instruction (Pang et al. 2025, reference code
ziqipang/RandAR, ``RandAR/model/randar_gpt.py``:
``get_position_instruction_tokens`` views the one learned
``pos_instruct_embeddings`` vector as ``[n_head, head_dim]`` and applies
``batch_apply_rotary_emb`` with the ``freqs_cis`` of the position the
instruction asks for), so the instruction carries its target in its input
vector as well as in attention: the ``random`` and ``random-parallel``
generators ask for it with ``rotate_instruction = true``. Needs
``[model] pos = "rope2d"`` (there is no rotation with learned positions).
"""

from __future__ import annotations

from typing import Any

import torch

from ..contract.errors import ConfigError


def rotate_ids_of(spec: Any, pos: str) -> tuple[int, ...] | None:
    """The spec's ``rotate_ids``, checked (ids of its vocabulary, 2-D RoPE
    positions); None when the spec does not ask for them."""
    raw = spec.option("rotate_ids")
    if raw is None:
        return None
    ids = tuple(raw) if isinstance(raw, (tuple, list)) else (raw,)
    if not ids or any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < spec.vocab_size for i in ids):
        raise ConfigError(f"model: spec option rotate_ids must be token ids in [0, {spec.vocab_size}), got {raw!r}")
    if spec.input_kind != "tokens":
        raise ConfigError("model: rotate_ids needs token inputs")
    if pos != "rope2d":
        raise ConfigError(f"model: the generator rotates input embeddings by their position (RandAR's "
                          f"rotate_instruction), which needs [model] pos = 'rope2d', got pos = {pos!r}")
    return ids


def rotate_inputs(x: torch.Tensor, ids: torch.Tensor, rope: torch.Tensor, rotate_ids: tuple[int, ...],
                  n_head: int) -> torch.Tensor:
    """``x`` (``[B, T, C]`` input embeddings) with the rows whose token id
    (``ids``, ``[B, T]``) is in ``rotate_ids`` rotated per head by ``rope``
    (the backbone's rotations, complex ``[B, T, 1, 1, hd/2]`` or ``[T, 1, 1, hd/2]``)."""
    hit = ids == rotate_ids[0]
    for i in rotate_ids[1:]:
        hit = hit | (ids == i)
    if not bool(hit.any()):
        return x
    B, T, C = x.shape
    xc = torch.view_as_complex(x.float().reshape(B, T, n_head, C // n_head // 2, 2).contiguous())
    rotated = torch.view_as_real(xc * rope.squeeze(-3)).reshape(B, T, C).to(x.dtype)  # (B, T, C)
    return torch.where(hit[..., None], rotated, x)


__all__ = ["rotate_ids_of", "rotate_inputs"]
