"""Conditioning through adaptive LayerNorm — ``[model] cond = "adaln"``, as
VAR does it (Tian et al. 2024; reference code FoundationVision/VAR,
``models/basic_var.py``: ``AdaLNSelfAttn``, ``AdaLNBeforeHead``;
``models/var.py``: ``VAR.forward``, ``VAR.init_weights``).

With ``cond = "adaln"`` every block of the backbone is conditioned, not only
the sequence: from the condition vector ``c`` (``[B, C]``) each block ``i``
computes ``SiLU(c) W_i + b_i`` (``W_i``: ``[C, 6C]``, VAR's per-block
``ada_lin``, ``shared_aln = False`` as VAR's default), split into
``γ₁, γ₂, s₁, s₂, β₁, β₂`` (VAR's order), and runs::

    x = x + γ₁ · attn(LN(x) · (1 + s₁) + β₁)
    x = x + γ₂ · mlp(LN(x) · (1 + s₂) + β₂)

with ``LN`` a LayerNorm without affine weights (VAR's ``ln_wo_grad``). The
final norm is VAR's ``AdaLNBeforeHead``: ``LN(x) · (1 + s) + β`` from
``SiLU(c) W_h + b_h`` (``W_h``: ``[C, 2C]``). Initialisation as VAR's
``init_weights`` with its training defaults (``aln = 0.5``, ``alng = 1e-5``):
the weights are drawn as the backbone's other linears (normal, std 0.02),
then the scale/shift columns are multiplied by 0.5, the gate columns by
1e-5, and the biases are zero — every block starts close to the identity.

**The condition vector** ``c`` is the embedding the backbone puts at sequence
index 0 (the last position of the conditioner's prefix): for the ``class``
conditioner the class embedding, row ``n_classes`` the null class, exactly
VAR's ``cond_BD = class_emb(label)`` (and VAR's start token, which also stays:
VAR conditions both through the start token and through AdaLN). For a
conditioner with a prefix of several positions (e.g. ``text-encoder``) the
prefix is still fed in front of the sequence as before, and ``c`` is its
last position's embedding (prefix position embedding included); classifier-
free guidance's null rows get the null condition's vector, so guidance works
unchanged. The option is a backbone option: every generation order can use
it (the generator does not know).

**Kept from the reference**: the per-block 6-way modulation and its order,
the gate without ``+1``, the affine-free LayerNorms, the head's 2-way
modulation, the SiLU before the linears, the initialisation multipliers.
**Differs**: VAR's condition width D equals C here too, but its embeddings
are drawn with ``trunc_normal(std = √(1/3C))`` where tokenloom keeps its
normal(0.02); VAR's attention uses L2-normalised q/k (``attn_l2_norm``) and
drop-path, tokenloom's plain scaled dot-product and dropout; RQ-Transformer's
depth blocks (``depth_head``) are not modulated.

**Cost**: the modulation linears run once per row and forward pass, not per
token: :meth:`AdaLN.n_params` lets the backbone count them once per sequence
in ``flops_per_token`` (their ``6·N`` divided by the sequence length).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import PLAIN_LINEAR, PlainLinear, attend
from .kvcache import KVCache

#: VAR's ``init_weights`` multipliers at its training defaults (``utils/arg_util.py``: aln, alng)
INIT_ADALN = 0.5
INIT_ADALN_GAMMA = 1e-5


class AdaLN(nn.Module):
    """The AdaLN weights of a backbone of ``n_layer`` blocks of width ``d``:
    one ``Linear(d, 6d)`` per block (``blocks``) and one ``Linear(d, 2d)``
    before the output heads (``head``)."""

    def __init__(self, d: int, n_layer: int):
        super().__init__()
        self.d = d
        self.blocks = nn.ModuleList(nn.Linear(d, 6 * d) for _ in range(n_layer))
        self.head = nn.Linear(d, 2 * d)

    def reset_parameters(self) -> None:
        """VAR's ``init_weights`` on drawn weights: scale/shift columns × 0.5,
        gate columns × 1e-5, biases zero (the head's weight × 0.5)."""
        with torch.no_grad():
            for lin in self.blocks:
                lin.weight[2 * self.d:].mul_(INIT_ADALN)
                lin.weight[: 2 * self.d].mul_(INIT_ADALN_GAMMA)
                lin.bias.zero_()
            self.head.weight.mul_(INIT_ADALN)
            self.head.bias.zero_()

    def n_params(self) -> int:
        """The parameters that run once per row and pass (not per token)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, c: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """Per block, ``(γ₁, γ₂, s₁, s₂, β₁, β₂)``, each ``[B, 1, C]``, from the
        condition vectors ``c`` (``[B, C]``)."""
        s = F.silu(c)
        return [lin(s).view(-1, 1, 6, self.d).unbind(2) for lin in self.blocks]

    def modulate_head(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """VAR's ``AdaLNBeforeHead`` after its affine-free LayerNorm: the
        normalised final hidden states ``x`` (``[B, T, C]``) scaled and
        shifted by ``SiLU(c) W_h + b_h``."""
        scale, shift = self.head(F.silu(c)).view(-1, 1, 2, self.d).unbind(2)
        return x * (1 + scale.to(x.dtype)) + shift.to(x.dtype)


def adaln_block_forward(x: torch.Tensor, p: Any, mod: tuple[torch.Tensor, ...], n_head: int,
                        rope: torch.Tensor | None, mask: Any, cache: KVCache | None, layer: int,
                        dropout: float = 0.0, linear: PlainLinear = PLAIN_LINEAR) -> torch.Tensor:
    """One block of :func:`~tokenloom.backbone.model.block_forward`'s weights
    ``p`` (its LayerNorm weights None: affine-free) on ``x`` (``[B, T, C]``),
    modulated by ``mod`` (:meth:`AdaLN.forward`'s entry for this block) as
    VAR's ``AdaLNSelfAttn.forward``; the other arguments as ``block_forward``."""
    (ln_1_w, ln_1_b, qkv_w, qkv_b, attn_proj_w, attn_proj_b,
     ln_2_w, ln_2_b, fc_w, fc_b, mlp_proj_w, mlp_proj_b) = p
    gamma1, gamma2, scale1, scale2, shift1, shift2 = (m.to(x.dtype) for m in mod)  # (B, 1, C) each
    B, T, C = x.shape
    h = torch.layer_norm(x, (C,), ln_1_w, ln_1_b) * (1 + scale1) + shift1
    qkv = linear(h, qkv_w, qkv_b).view(B, T, 3, n_head, C // n_head)
    if rope is not None:  # q and k rotate (the complex multiply of rotate_pairs)
        qk = qkv[:, :, :2].float().unflatten(-1, (-1, 2)).contiguous()
        qk = torch.view_as_real(torch.view_as_complex(qk) * rope).flatten(-2).to(qkv.dtype)
        (q, k), v = qk.unbind(2), qkv[:, :, 2]
    else:
        q, k, v = qkv.unbind(2)  # (B, T, H, hd) each
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd)
    if cache is not None:
        k, v = cache.update(layer, k, v)
    y = attend(q, k, v, mask, dropout).transpose(1, 2).reshape(B, T, C)  # (B, T, C)
    y = linear(y, attn_proj_w, attn_proj_b)
    if dropout:
        y = F.dropout(y, dropout)
    x = x + y * gamma1
    h = torch.layer_norm(x, (C,), ln_2_w, ln_2_b) * (1 + scale2) + shift2
    h = linear(linear.gelu_tanh(h, fc_w, fc_b), mlp_proj_w, mlp_proj_b)
    if dropout:
        h = F.dropout(h, dropout)
    return x + h * gamma2


__all__ = ["INIT_ADALN", "INIT_ADALN_GAMMA", "AdaLN", "adaln_block_forward"]
