"""``diffusion``: MAR's per-token diffusion loss (Li et al. 2024, "Autoregressive Image Generation
without Vector Quantization", https://arxiv.org/abs/2406.11838; code read for this port:
github.com/LTH14/mar, ``models/diffloss.py``, ``diffusion/gaussian_diffusion.py``,
``diffusion/respace.py``).

The backbone's hidden state ``z`` of a position conditions a small denoiser (MAR's
``SimpleMLPAdaLN``, :class:`tokenloom.blocks.denoiser.AdaLNMLP`) that models ``p(x | z)`` for the
continuous token ``x`` there.

**Training** (``loss``): DDPM noise prediction on a 1000-step cosine schedule — ``t`` uniform
in ``[0, 1000)``, ``x_t = sqrt(ᾱ_t)·x + sqrt(1 − ᾱ_t)·ε``, loss ``mean_D (ε − ε̂(x_t, t, z))²``
— on ``diffusion_batch_mul`` independent noise draws per token (MAR repeats every target and its
``z`` 4 times: ``diffusion_batch_mul = 4``); a token's loss is the mean over its draws.

**Sampling** (``sample``): ancestral DDPM sampling over ``sampling_steps`` timesteps of the
schedule, evenly respaced as MAR's ``timestep_respacing`` (MAR: 100 of 1000; the default here is
smaller for the CPU) — from ``x ~ N(0, I)``, each reverse step predicts ε, forms
``x̂_0 = (x − sqrt(1 − ᾱ)·ε̂)/sqrt(ᾱ)`` (not clipped: MAR's ``clip_denoised=False``) and the
posterior mean, and adds ``σ·ε'·temperature`` except at the last step — MAR's temperature scales
the noise of every reverse step (not the initial noise). Guidance (``cfg``) combines the
predicted noise of the conditional and null rows, ``ε̂ = ε_u + s·(ε_c − ε_u)``, both run on the
same ``x`` (MAR's ``forward_with_cfg``; its linear schedule over decoded tokens is the ``cfg``
sampler's ``schedule = "linear"`` read at each decoding step). Every noise draw comes from the
per-image RNG: image i depends on (seed, i) only.

**Kept** from MAR: the network (AdaLN residual MLP blocks, timestep embedding, zero-initialised
modulations and output), the cosine schedule with 1000 training steps, ε-prediction, the several
noise draws per token, the respaced sampler, the temperature on each step's noise, guidance on
ε with shared noise. **Differs**: MAR also learns the variance (its network outputs 2·D and its
loss adds the variational-bound term, ``learn_sigma``); this head predicts ε only and samples with
the fixed posterior variance β̃_t (DDPM's "fixed small"), so its loss is MAR's MSE term alone.
And ``clip_denoised`` (default on; MAR: off) clips ``x̂_0`` to the range of the training targets
(per channel, the largest ``|x|`` the head saw in training, kept in its checkpoint) — the
``clip_denoised`` of improved-diffusion, whose images lie in [-1, 1], for latents of unknown
range. Why: the cosine schedule ends at ᾱ ≈ 2·10⁻⁹, so the first respaced reverse step
multiplies the error of ε̂ by ``sqrt(ᾱ_prev / ᾱ_T)`` (≈ 350 at 100 steps, ≈ 650 at 50); MAR's
large denoiser predicts ε there to ~10⁻³, a small CPU head does not (measured: an ε error of
0.03 on a toy mixture sends unclipped samples to |x| ~ 10², clipped ones match the data).
Defaults are small for the CPU (``width`` 128, ``sampling_steps`` 20; MAR: 1024 and 100).
No exact likelihood: held-out NLL is not reported.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch

import tokenloom
from tokenloom.blocks.denoiser import AdaLNMLP, at_least_one, cosine_alphas_cumprod, space_timesteps


class DiffusionHead(tokenloom.Head):
    continuous = True
    exact_likelihood = False

    @attrs.frozen
    class Config:
        #: the denoiser's width W (MAR: diffloss_w = 1024) and residual blocks (MAR: diffloss_d = 3)
        width: int = attrs.field(default=128, validator=at_least_one)
        depth: int = attrs.field(default=3, validator=at_least_one)
        #: timesteps of the training schedule (MAR: 1000)
        num_timesteps: int = attrs.field(default=1000, validator=at_least_one)
        #: reverse steps when sampling, respaced over the schedule (MAR: 100)
        sampling_steps: int = attrs.field(default=20, validator=at_least_one)
        #: noise draws per token in training (MAR: diffusion_batch_mul = 4)
        diffusion_batch_mul: int = attrs.field(default=4, validator=at_least_one)
        #: clip x̂_0 to the training targets' range at sampling (MAR: False; see the module docstring)
        clip_denoised: bool = True
        #: options that change sampling only: in the samples' cache key, not the model's (a sweep
        #: of sampling_steps reuses the trained model; tokenloom.cache.head_keys)
        sampling_options: ClassVar[tuple[str, ...]] = ("sampling_steps", "clip_denoised")

        def __attrs_post_init__(self) -> None:
            if self.sampling_steps > self.num_timesteps:
                raise ValueError(f"sampling_steps ({self.sampling_steps}) must be <= num_timesteps "
                                 f"({self.num_timesteps})")

    def __init__(self, config: Config, *, hidden_dim: int, token_dim: int = 0, vocab_size: int = 0):
        super().__init__(config, hidden_dim=hidden_dim, token_dim=token_dim, vocab_size=vocab_size)
        self.net = AdaLNMLP(self.token_dim, config.width, self.hidden_dim, config.depth)
        abar = cosine_alphas_cumprod(config.num_timesteps)
        self.register_buffer("alphas_cumprod", abar.float(), persistent=False)
        # the respaced sampler (MAR's SpacedDiffusion): its kept timesteps and their schedule, float64
        kept = space_timesteps(config.num_timesteps, config.sampling_steps)
        a = abar[kept]
        prev = torch.cat([torch.ones(1, dtype=torch.float64), a[:-1]])
        betas = 1.0 - a / prev
        var = betas * (1.0 - prev) / (1.0 - a)  # β̃: the posterior variance
        log_var = torch.log(torch.cat([var[1:2], var[1:]])) if len(kept) > 1 else torch.zeros(1, dtype=torch.float64)
        self.register_buffer("timestep_map", torch.tensor(kept, dtype=torch.long), persistent=False)
        sched = torch.stack([
            torch.sqrt(1.0 / a), torch.sqrt(1.0 / a - 1.0),  # x̂_0 = sqrt(1/ᾱ)·x − sqrt(1/ᾱ − 1)·ε̂
            betas * torch.sqrt(prev) / (1.0 - a),  # posterior mean: coef1·x̂_0 + coef2·x
            (1.0 - prev) * torch.sqrt(1.0 - betas) / (1.0 - a),
            torch.exp(0.5 * log_var),  # σ
        ], 1)
        self.register_buffer("sampling_schedule", sched.float(), persistent=False)  # (K, 5)
        # the largest |target| per channel seen in training (0: none yet, no clipping): saved with the weights
        self.register_buffer("target_bound", torch.zeros(self.token_dim))
        self.train_evals = config.diffusion_batch_mul

    @property
    def steps(self) -> int:
        return int(self.config.sampling_steps)

    def eval_flops(self) -> int:
        return self.net.eval_flops()

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hidden = self.check_hidden(hidden)
        targets = self.check_targets(targets, hidden)
        lead = targets.shape[:-1]
        m = self.config.diffusion_batch_mul
        if self.training and targets.numel():
            with torch.no_grad():
                seen = targets.detach().reshape(-1, self.token_dim).abs().amax(0).float()
                if torch.distributed.is_available() and torch.distributed.is_initialized():
                    # DDP: every rank scores its rows of the global batch; the range is the whole batch's
                    torch.distributed.all_reduce(seen, op=torch.distributed.ReduceOp.MAX)
                self.target_bound.copy_(torch.maximum(self.target_bound, seen))
        x0 = targets.reshape(-1, self.token_dim).float().repeat(m, 1)  # (m N, D): MAR's diffusion_batch_mul
        z = hidden.reshape(-1, self.hidden_dim).repeat(m, 1)
        t = torch.randint(0, self.config.num_timesteps, (x0.shape[0],), device=x0.device)
        eps = torch.randn_like(x0)
        abar = self.alphas_cumprod[t][:, None]
        xt = abar.sqrt() * x0 + (1.0 - abar).sqrt() * eps
        mse = (self.net(xt.to(z.dtype), t, z).float() - eps).pow(2).mean(-1)  # (m N,)
        return mse.reshape(m, -1).mean(0).reshape(lead)

    def sample(self, hidden, *, rng, step, stream=0, temperature=1.0, guidance=1.0, uncond=None):
        hidden = self.check_hidden(hidden)
        uncond = self.check_uncond(uncond, hidden, guidance)
        if not temperature >= 0:
            raise tokenloom.InputError(f"DiffusionHead: temperature must be >= 0, got {temperature}")
        lead = hidden.shape[:-1]
        K, D = self.steps, self.token_dim
        noise = rng.normal(step, *lead[1:], K, D, stream=stream).to(hidden.device)  # (B, .., K, D)
        noise = noise.reshape(-1, K, D)  # (N, K, D): [:, 0] the start, [:, j] reverse step j's noise
        z = hidden.reshape(-1, self.hidden_dim)
        if uncond is not None:
            z = torch.cat([z, uncond.reshape(-1, self.hidden_dim)])
        N = noise.shape[0]
        x = noise[:, 0].float()
        bound = self.target_bound if self.config.clip_denoised and bool(self.target_bound.gt(0).all()) else None
        for j, k in enumerate(range(K - 1, -1, -1)):
            t = self.timestep_map[k].expand(z.shape[0])
            xin = x if uncond is None else torch.cat([x, x])
            eps = self.net(xin.to(z.dtype), t, z).float()
            if uncond is not None:
                eps = eps[N:] + guidance * (eps[:N] - eps[N:])
            s = self.sampling_schedule[k]
            x0 = s[0] * x - s[1] * eps
            if bound is not None:  # improved-diffusion's clip_denoised, to the training targets' range
                x0 = torch.maximum(torch.minimum(x0, bound), -bound)
            x = s[2] * x0 + s[3] * x
            if k > 0:
                x = x + s[4] * noise[:, j + 1] * temperature
        return x.reshape(*lead, D)


@tokenloom.hookimpl
def register_heads(register):
    register("diffusion", DiffusionHead)
