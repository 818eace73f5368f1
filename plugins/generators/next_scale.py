"""``next-scale``: next-scale prediction — VAR (Tian et al. 2024, "Visual
Autoregressive Modeling: Scalable Image Generation via Next-Scale
Prediction", https://arxiv.org/abs/2404.02905, reference code
``models/var.py``).

Needs a multi-scale tokenizer that provides VAR's teacher-forcing inputs
through the core :class:`tokenloom.MultiScaleInputs` protocol (``multiscale``;
``residual = false`` gives FlexVAR's non-residual scales).

**Training.** The sequence holds every scale's tokens, coarse to fine
(``T = L``, e.g. 1 + 4 + 9 + 16 + 36 + 64 = 130 for scales 1…8). The input
at each position of scale k is the tokenizer's ``scale_inputs``: the
accumulated reconstruction f̂ of scales < k (upsampled through the
tokenizer's own φ path, then area-downsampled to scale k's grid), a
``code_dim`` vector fed through the backbone's input projection; the first
scale's slots are VAR's start tokens (the class embedding at index 0).
Each position predicts its own code (all of scale k in parallel), under the
**block-causal mask**: a scale sees every earlier scale and itself, never a
later one. To run it as VAR's backbone: ``[model] cond = "adaln"`` (VAR's
AdaLN in every block, from the class embedding) and ``pos = "learned"`` (an
embedding per position plus the per-scale one: VAR's ``pos_1LC`` +
``lvl_embed``); the defaults are the class token alone and 2-D RoPE.

**Decoding.** One forward pass per scale with the **KV cache** of the
earlier scales: sample scale k, recompute f̂ through the tokenizer, feed
scale k + 1. NFE = number of scales. Classifier-free guidance rows share
each pass; ``StepInfo.scale`` tells samplers the scale (``cfg`` with
``schedule = "linear"`` is VAR's ramp over scales).

**Zero-shot inpainting/outpainting** (VAR §6): ``known`` codes are
teacher-forced at every scale — after each pass the known positions of
that scale are overwritten, so later scales see them.

**Likelihood.** Exact: one teacher-forced pass gives log p(x) = Σ_k log
p(scale k | scales < k) (tokens of a scale are conditionally independent
given the earlier scales, so the product is a normalised distribution).

**Continuous tokens — FlowAR** (Ren et al. 2024, "FlowAR: Scale-wise
Autoregressive Image Generation Meets Flow Matching",
https://arxiv.org/abs/2412.15205). The same order, one plugin: with a
continuous multi-scale tokenizer (``kl`` with ``scales``: each scale is the
VAE latent area-downsampled to its grid, non-residual, as FlowAR builds its
scales from any VAE) the teacher-forcing input of scale k is the
tokenizer's ``scale_inputs(latents)`` — the upsampled scale k − 1 — and the
backbone's hidden state at each position of scale k conditions the run's
head (``[head] name = "flow"``: flow matching, Euler steps), which draws
that position's latent. Decoding is one backbone pass per scale (NFE = K,
the same formula as VAR; head steps are counted apart by core), guidance
rows share each pass and ``cfg``'s scale and schedule apply to the head's
velocity (``StepInfo.scale``: the linear ramp over scales). ``known``
latents are teacher-forced as codes are. Differences from the reference
(``OliverRensu/FlowAR``; the repository is not stored here, so this
follows the paper and ``LITERATURE.md``): FlowAR's flow head is a small
transformer over a whole scale, modulated by the backbone output through
spatially adaptive layer norm; here the head is per token (the tokens of a
scale are conditionally independent given the backbone's hidden states, as
in VAR), and the backbone is the shared tokenloom transformer. No exact
likelihood (the flow head has none): ``log_likelihood`` refuses.
"""

from __future__ import annotations

import attrs
import torch

import tokenloom
from tokenloom.orders import ScaleOrder, check_known, check_known_latents, scales_of


class NextScaleGenerator(tokenloom.Generator):
    supports_known = True
    exact_likelihood = True
    continuous_ok = True  # FlowAR: continuous multi-scale tokens with a flow (or diffusion) head

    @attrs.frozen
    class Config:
        pass

    def __init__(self, config: Config, *, tokenizer: tokenloom.Tokenizer):
        super().__init__(config, tokenizer=tokenizer)
        layout = scales_of(tokenizer, "next-scale", inputs=True)
        self.continuous = bool(getattr(tokenizer, "continuous", False))
        self.L, self.V = layout.length, tokenizer.vocab_size
        self.token_dim = int(tokenizer.token_dim) if self.continuous else 0
        if self.continuous:
            self.exact_likelihood = False  # a flow head gives no exact likelihood
        self.scales = ScaleOrder(layout, self.V, int(tokenizer.embed_dim), tokenizer.scale_inputs,
                                 train_order="next-scale", who="next-scale", token_dim=self.token_dim)

    def model_spec(self) -> tokenloom.ModelSpec:
        return self.scales.model_spec()

    def expected_nfe(self) -> int:
        return self.scales.K

    def _tokens(self, tokens: torch.Tensor, where: str) -> torch.Tensor:
        if self.continuous:
            return tokenloom.check_latents(tokens, self.L, self.token_dim, where=f"{where}: latents")
        return tokenloom.check_codes(tokens, self.L, self.V, where=f"{where}: codes")

    def training_batch(self, codes: torch.Tensor, cond: torch.Tensor) -> tokenloom.TrainBatch:
        return self.scales.training_batch(self._tokens(codes, "next-scale.training_batch"), cond)

    def generate(self, model, chain, cond, *, rng, known=None) -> torch.Tensor:
        given = None
        if known is not None:
            B = cond.shape[0]
            if self.continuous:
                given = check_known_latents(known, B, self.L, self.token_dim, model.device)
            else:
                given = check_known(known, B, self.L, self.V, model.device)
        return self.scales.generate(model, chain, cond, rng, known=given)

    def log_likelihood(self, model, codes, cond) -> torch.Tensor:
        if self.continuous:
            raise tokenloom.ConfigError("next-scale with continuous tokens has no exact likelihood "
                                        "(the flow/diffusion head has none)")
        codes = tokenloom.check_codes(codes, self.L, self.V, where="next-scale.log_likelihood: codes")
        return self.scales.log_likelihood(model, codes, cond)


@tokenloom.hookimpl
def register_generators(register):
    register("next-scale", NextScaleGenerator)
