"""``raster``: next-token prediction in raster order — LlamaGen (Sun et al.
2024, "Autoregressive Model Beats Diffusion: Llama for Scalable Image
Generation", https://arxiv.org/abs/2406.06525), with an option for RAR's
training schedule (Yu et al. 2024, "Randomized Autoregressive Visual
Generation", https://arxiv.org/abs/2411.00776).

**Training.** The sequence is ``[cls, x_0, ..., x_{L-2}]`` and the target at
index t is ``x_t`` (teacher forcing under a causal mask); the input at index
t + 1 sits at grid position t (2-D RoPE or learned positions), the class
token at none. With ``rar = true`` each sequence is instead permuted into a
random factorisation order π with probability r, where r is 1 until the
fraction ``rar_start`` of training and decays linearly to 0 at ``rar_end``
(RAR §3.2), and every input carries RAR's *target-aware* positional
embedding of the position it predicts next (π(t)), so the model always knows
which token it is asked for. After ``rar_end`` r = 0: the model is trained
as a plain raster-order model. The defaults are the reference's: RAR's
``configs/training/generator/rar.yaml`` (bytedance/1d-tokenizer) anneals
between steps 125,000 and 187,500 of 250,000 (``randomness_anneal_start`` /
``_end``, read by ``utils/train_utils.py:get_rar_random_ratio``), i.e.
``rar_start = 0.5``, ``rar_end = 0.75`` — pure random orders for the first
half, pure raster for the last quarter. (Until the issue-18 fix the defaults
were 0 and 1: an anneal over the whole run.)

**Decoding.** One forward pass per token with a KV cache: the class token
first, then each sampled token is appended — NFE = L. With classifier-free
guidance the conditional and null-class rows run in one batched pass.

**Likelihood.** Exact: one teacher-forced pass gives log p(x) = Σ_t log
p(x_t | x_<t, c).

**Continuous tokens** (a continuous tokenizer, e.g. ``kl``, with a ``diffusion``
or ``flow`` head; MAR's "AR + diffusion loss" in raster order, Li et al.
2024, https://arxiv.org/abs/2406.11838): the same order, one plugin — the
inputs are the previous latents as embeddings, the targets the latents
(scored by the head's loss on every position), and decoding takes one
backbone pass per token whose hidden state the head turns into the next
latent (its guidance and temperature from the chain): NFE = L, plus the
head's steps per token, counted apart. RAR's schedule works unchanged. The
likelihood is the head's when it has an exact one (diffusion and flow heads
have none: no held-out NLL is reported).
"""

from __future__ import annotations

import attrs
import torch

import tokenloom
from tokenloom.orders import (
    raster_decode,
    raster_log_likelihood,
    raster_spec,
    raster_training_batch,
    refuse_known,
)


def _fraction(_inst, attribute, value):
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"must be in [0, 1], got {value}")


class RasterGenerator(tokenloom.Generator):
    exact_likelihood = True
    continuous_ok = True

    @attrs.frozen
    class Config:
        rar: bool = False
        # RAR's reference: steps 125k–187.5k of 250k (rar.yaml randomness_anneal_start/_end)
        rar_start: float = attrs.field(default=0.5, validator=_fraction)
        rar_end: float = attrs.field(default=0.75, validator=_fraction)

        def __attrs_post_init__(self) -> None:
            if self.rar_end < self.rar_start:
                raise ValueError(f"rar_end ({self.rar_end}) must be >= rar_start ({self.rar_start})")

    def __init__(self, config: Config, *, tokenizer: tokenloom.Tokenizer):
        super().__init__(config, tokenizer=tokenizer)
        self.L = tokenizer.layout.length
        self.V = tokenizer.vocab_size
        self.D = int(tokenizer.token_dim) if getattr(tokenizer, "continuous", False) else 0  # latents: width D
        self._progress = 1.0  # RAR: fraction of training done (1.0: raster)

    def model_spec(self) -> tokenloom.ModelSpec:
        if not self.config.rar:
            return raster_spec(self.tokenizer)
        return attrs.evolve(raster_spec(self.tokenizer), train_order="raster-rar", extra=(("target_aware", True),))

    def expected_nfe(self) -> int:
        return self.L

    # -- training -------------------------------------------------------------

    def on_train_step(self, step: int, n_steps: int) -> None:
        self._progress = step / max(n_steps, 1)

    def permute_probability(self) -> float:
        """RAR's r at the current training progress: 1 before ``rar_start``,
        linear down to 0 at ``rar_end``."""
        cfg = self.config
        if not cfg.rar:
            return 0.0
        if self._progress <= cfg.rar_start:
            return 1.0
        if self._progress >= cfg.rar_end:
            return 0.0
        return 1.0 - (self._progress - cfg.rar_start) / (cfg.rar_end - cfg.rar_start)

    def training_batch(self, codes: torch.Tensor, cond: torch.Tensor) -> tokenloom.TrainBatch:
        where = "raster.training_batch: " + ("latents" if self.D else "codes")
        if self.D:
            codes = tokenloom.check_latents(codes, self.L, self.D, where=where)
        else:
            codes = tokenloom.check_codes(codes, self.L, self.V, where=where)
        B, L = codes.shape[:2]
        dev = codes.device
        order = torch.arange(L, device=dev).expand(B, L)  # (B, L) position decoded at step t
        r = self.permute_probability()
        if r > 0:
            perm = torch.rand(B, L).argsort(-1).to(dev)
            permute = (torch.rand(B) < r).to(dev)
            order = torch.where(permute[:, None], perm, order)
        batch = raster_training_batch(codes, cond, L, self.V, where=where, order=order, dim=self.D)
        if self.config.rar:
            batch.extra["target_positions"] = order  # RAR: the position each input predicts
        return batch

    # -- decoding -------------------------------------------------------------

    def generate(self, model, chain, cond, *, rng, known=None) -> torch.Tensor:
        refuse_known("raster", known)
        return raster_decode(model, chain, cond, rng, self.L, target_aware=self.config.rar)

    def log_likelihood(self, model, codes, cond) -> torch.Tensor:
        where = "raster.log_likelihood: " + ("latents" if self.D else "codes")
        return raster_log_likelihood(model, codes, cond, self.L, self.V, where=where, target_aware=self.config.rar)


@tokenloom.hookimpl
def register_generators(register):
    register("raster", RasterGenerator)
