"""The small per-token network of the continuous heads (``diffusion``, ``flow``).

:class:`AdaLNMLP` is MAR's ``SimpleMLPAdaLN`` (Li et al. 2024, "Autoregressive Image Generation
without Vector Quantization", https://arxiv.org/abs/2406.11838; code: github.com/LTH14/mar,
``models/diffloss.py``): the noisy token ``x`` (width D) is projected to the network width W, a
stack of residual blocks modulates it with adaptive LayerNorm (shift, scale, gate) conditioned on
``y = time_embed(t) + cond_embed(z)`` — ``z`` the backbone's hidden state, ``t`` the noise level —
and an AdaLN final layer maps it back to D. Kept from the reference: the sinusoidal timestep
embedding of 256 frequencies (``max_period`` 10000, cos then sin) through a two-layer SiLU MLP, the
``LayerNorm(eps=1e-6)`` + Linear-SiLU-Linear residual block with gated AdaLN, the DiT final layer,
and the initialisation (Xavier-uniform linears with zero biases, N(0, 0.02) timestep MLP, zeroed
AdaLN modulations and output layer, so the untrained network predicts 0). Differs: the output is
D wide (MAR predicts 2·D for its learned variance; see the ``diffusion`` head).

:func:`cosine_alphas_cumprod` is the cosine noise schedule (Nichol & Dhariwal 2021, as in MAR's
``diffusion/gaussian_diffusion.py``: ``betas_for_alpha_bar`` with ``cos((t + 0.008) / 1.008 ·
π/2)²`` and betas clipped at 0.999); :func:`space_timesteps` is MAR's (improved-diffusion's)
even respacing of the sampling steps.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

#: Frequencies of the sinusoidal timestep embedding (MAR's ``frequency_embedding_size``).
FREQUENCIES = 256


def timestep_embedding(t: torch.Tensor, dim: int = FREQUENCIES, max_period: float = 10000.0) -> torch.Tensor:
    """``[N, dim]`` sinusoidal embeddings of the (possibly fractional) times ``t`` (``[N]``):
    ``cos(t·f_i)`` then ``sin(t·f_i)``, ``f_i = max_period^(-i / (dim/2))`` (GLIDE's, MAR's)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], -1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], -1)
    return emb


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class ResBlock(nn.Module):
    """``x + gate · mlp(modulate(LN(x), shift, scale))`` with (shift, scale, gate) from ``y``."""

    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(_modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    """DiT's final layer: ``linear(modulate(LN(x), shift, scale))``, LN without affine."""

    def __init__(self, width: int, out: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class AdaLNMLP(nn.Module):
    """MAR's ``SimpleMLPAdaLN``: ``net(x [N, D], t [N], z [N, C]) -> [N, out]``.

    ``width`` W and ``depth`` (residual blocks) are the head's ``width``/``depth`` config keys
    (MAR: ``diffloss_w`` 1024, ``diffloss_d`` 3). ``t`` is the noise level as the head defines it
    (diffusion: the integer timestep of the 1000-step schedule; flow: t·1000 for t in [0, 1])."""

    def __init__(self, token_dim: int, width: int, cond_dim: int, depth: int, out_dim: int | None = None):
        super().__init__()
        self.token_dim, self.width, self.depth = token_dim, width, depth
        self.out_dim = out_dim or token_dim
        self.time_embed = nn.Sequential(nn.Linear(FREQUENCIES, width), nn.SiLU(), nn.Linear(width, width))
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(token_dim, width)
        self.res_blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final_layer = FinalLayer(width, self.out_dim)
        self._init()

    def _init(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed[0].weight, std=0.02)
        nn.init.normal_(self.time_embed[2].weight, std=0.02)
        for block in self.res_blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for lin in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = self.input_proj(x)
        y = self.time_embed(timestep_embedding(t).to(h.dtype)) + self.cond_embed(z)
        for block in self.res_blocks:
            h = block(h, y)
        return self.final_layer(h, y)

    def eval_flops(self) -> int:
        """FLOPs of one evaluation for one token: 2 per multiply-add of every linear layer."""
        return 2 * sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))


def at_least_one(_inst: Any, attribute: Any, value: Any) -> None:
    """attrs validator of the heads' counts (width, depth, steps, draws): an int >= 1 (not a bool)."""
    if isinstance(value, bool) or value < 1:
        raise ValueError(f"must be >= 1, got {value}")


def cosine_alphas_cumprod(n: int, max_beta: float = 0.999) -> torch.Tensor:
    """``FloatTensor64[n]``: ᾱ_t of the cosine schedule with ``n`` steps — betas ``1 −
    ᾱ(t+1)/ᾱ(t)`` for ``ᾱ(s) = cos((s/n + 0.008)/1.008 · π/2)²``, clipped at ``max_beta``, then
    their cumulative product (MAR's ``get_named_beta_schedule("cosine", n)``)."""
    def abar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)],
                         dtype=torch.float64)
    return torch.cumprod(1.0 - betas, 0)


def space_timesteps(n: int, k: int) -> list[int]:
    """The ``k`` timesteps of an ``n``-step schedule kept for sampling, evenly spaced from 0 to
    n − 1 (improved-diffusion's ``space_timesteps(n, [k])``, MAR's ``timestep_respacing``):
    ``round(i · (n − 1)/(k − 1))``; ``k = 1`` keeps step 0."""
    if k < 1 or k > n:
        raise ValueError(f"cannot keep {k} of {n} timesteps")
    if k == 1:
        return [0]
    stride = (n - 1) / (k - 1)
    return sorted({round(i * stride) for i in range(k)})


__all__ = ["FREQUENCIES", "AdaLNMLP", "FinalLayer", "ResBlock", "at_least_one", "cosine_alphas_cumprod", "space_timesteps",
           "timestep_embedding"]
