"""``flow``: a flow-matching (rectified-flow) head — the per-token head of FlowAR (Ren et al.
2024, "FlowAR: Scale-wise Autoregressive Image Generation Meets Flow Matching",
https://arxiv.org/abs/2412.15205) and xAR (Ren et al. 2025, "Beyond Next-Token: Next-X
Prediction for Autoregressive Visual Generation", https://arxiv.org/abs/2502.20388).

Code read for this port: FlowAR's ``models/flowloss.py`` (``SILoss``: the SiT/REPA loss) and
``models/sampler.py`` (``euler_sampler``), in a public copy of the authors' repository
(``wangqiang9/FlowAR``; ``OliverRensu/FlowAR`` and xAR's code were not stored for this session).

**Training** (``loss``): the linear path ``x_t = (1 − t)·x + t·ε`` between the token ``x``
(t = 0) and noise ``ε ~ N(0, I)`` (t = 1), ``t ~ U(0, 1)`` (FlowAR's ``weighting="uniform"``),
and the velocity loss ``mean_D (v̂(x_t, t, z) − (ε − x))²`` — the velocity net is
:class:`tokenloom.blocks.denoiser.AdaLNMLP` conditioned on the backbone's hidden state ``z``
(MAR's denoiser; FlowAR's per-token flow model is likewise an AdaLN network conditioned on the
transformer's output). ``batch_mul`` noise draws per token (1: FlowAR; MAR's trick is available).

**Sampling** (``sample``): Euler steps of ``dx/dt = v̂`` from ``x ~ N(0, I)`` at t = 1 to t = 0 on
``steps`` intervals, either uniform (``time_grid = "uniform"``; FlowAR's grid at 50 steps) or
FlowAR's split grid (``"flowar"``: ``linspace(1, 0.3, S/2)`` then ``linspace(0.25, 0, S/2 + 1)``,
even S). Guidance (``cfg``) combines the velocities of the conditional and null rows,
``v = v_u + s·(v_c − v_u)``, on the same ``x`` (FlowAR's ``euler_sampler``). Differs from FlowAR:
``temperature`` scales the initial noise (FlowAR's deterministic sampler has no temperature);
``t`` enters the sinusoidal embedding as ``1000·t`` (the denoiser's timestep scale); no guidance
interval. All noise comes from the per-image RNG. No exact likelihood: held-out NLL is not
reported.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch

import tokenloom
from tokenloom.blocks.denoiser import AdaLNMLP, at_least_one


class FlowHead(tokenloom.Head):
    continuous = True
    exact_likelihood = False

    @attrs.frozen
    class Config:
        width: int = attrs.field(default=128, validator=at_least_one)
        depth: int = attrs.field(default=3, validator=at_least_one)
        #: Euler steps when sampling
        steps: int = attrs.field(default=10, validator=at_least_one)
        time_grid: str = attrs.field(default="uniform", validator=attrs.validators.in_(("uniform", "flowar")))
        #: noise draws per token in training
        batch_mul: int = attrs.field(default=1, validator=at_least_one)
        #: options that change sampling only: in the samples' cache key, not the model's
        sampling_options: ClassVar[tuple[str, ...]] = ("steps", "time_grid")

        def __attrs_post_init__(self) -> None:
            if self.time_grid == "flowar" and (self.steps < 2 or self.steps % 2):
                raise ValueError(f"time_grid = 'flowar' needs an even number of steps >= 2, got {self.steps}")

    def __init__(self, config: Config, *, hidden_dim: int, token_dim: int = 0, vocab_size: int = 0):
        super().__init__(config, hidden_dim=hidden_dim, token_dim=token_dim, vocab_size=vocab_size)
        self.net = AdaLNMLP(self.token_dim, config.width, self.hidden_dim, config.depth)
        S = config.steps
        if config.time_grid == "uniform":
            grid = torch.linspace(1.0, 0.0, S + 1, dtype=torch.float64)
        else:
            grid = torch.cat([torch.linspace(1.0, 0.3, S // 2, dtype=torch.float64),
                              torch.linspace(0.25, 0.0, S // 2 + 1, dtype=torch.float64)])
        self.register_buffer("time_steps", grid.float(), persistent=False)  # (S + 1,) from 1 to 0
        self.train_evals = config.batch_mul

    @property
    def steps(self) -> int:
        return int(self.config.steps)

    def eval_flops(self) -> int:
        return self.net.eval_flops()

    def velocity(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``v̂(x_t, t, z)``: ``[N, D]`` for tokens ``[N, D]``, times ``[N]`` in [0, 1], states ``[N, C]``."""
        return self.net(x.to(z.dtype), t * 1000.0, z).float()

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hidden = self.check_hidden(hidden)
        targets = self.check_targets(targets, hidden)
        lead = targets.shape[:-1]
        m = self.config.batch_mul
        x = targets.reshape(-1, self.token_dim).float().repeat(m, 1)
        z = hidden.reshape(-1, self.hidden_dim).repeat(m, 1)
        t = torch.rand(x.shape[0], device=x.device)
        eps = torch.randn_like(x)
        xt = (1.0 - t[:, None]) * x + t[:, None] * eps
        mse = (self.velocity(xt, t, z) - (eps - x)).pow(2).mean(-1)
        return mse.reshape(m, -1).mean(0).reshape(lead)

    def sample(self, hidden, *, rng, step, stream=0, temperature=1.0, guidance=1.0, uncond=None):
        hidden = self.check_hidden(hidden)
        uncond = self.check_uncond(uncond, hidden, guidance)
        if not temperature >= 0:
            raise tokenloom.InputError(f"FlowHead: temperature must be >= 0, got {temperature}")
        lead = hidden.shape[:-1]
        D = self.token_dim
        x = rng.normal(step, *lead[1:], D, stream=stream).to(hidden.device).reshape(-1, D) * temperature
        z = hidden.reshape(-1, self.hidden_dim)
        if uncond is not None:
            z = torch.cat([z, uncond.reshape(-1, self.hidden_dim)])
        N = x.shape[0]
        ts = self.time_steps
        for i in range(self.steps):
            t = ts[i].expand(z.shape[0])
            v = self.velocity(x if uncond is None else torch.cat([x, x]), t, z)
            if uncond is not None:
                v = v[N:] + guidance * (v[:N] - v[N:])
            x = x + (ts[i + 1] - ts[i]) * v
        return x.reshape(*lead, D)


@tokenloom.hookimpl
def register_heads(register):
    register("flow", FlowHead)
