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
later one.

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
"""

from __future__ import annotations

import attrs
import torch

import tokenloom
from tokenloom.orders import ScaleOrder, check_known, scales_of


class NextScaleGenerator(tokenloom.Generator):
    supports_known = True
    exact_likelihood = True

    @attrs.frozen
    class Config:
        pass

    def __init__(self, config: Config, *, tokenizer: tokenloom.Tokenizer):
        super().__init__(config, tokenizer=tokenizer)
        layout = scales_of(tokenizer, "next-scale", inputs=True)
        self.L, self.V = layout.length, tokenizer.vocab_size
        self.scales = ScaleOrder(layout, self.V, int(tokenizer.embed_dim), tokenizer.scale_inputs,
                                 train_order="next-scale", who="next-scale")

    def model_spec(self) -> tokenloom.ModelSpec:
        return self.scales.model_spec()

    def expected_nfe(self) -> int:
        return self.scales.K

    def training_batch(self, codes: torch.Tensor, cond: torch.Tensor) -> tokenloom.TrainBatch:
        codes = tokenloom.check_codes(codes, self.L, self.V, where="next-scale.training_batch: codes")
        return self.scales.training_batch(codes, cond)

    def generate(self, model, chain, cond, *, rng, known=None) -> torch.Tensor:
        given = None if known is None else check_known(known, cond.shape[0], self.L, self.V, model.device)
        return self.scales.generate(model, chain, cond, rng, known=given)

    def log_likelihood(self, model, codes, cond) -> torch.Tensor:
        codes = tokenloom.check_codes(codes, self.L, self.V, where="next-scale.log_likelihood: codes")
        return self.scales.log_likelihood(model, codes, cond)


@tokenloom.hookimpl
def register_generators(register):
    register("next-scale", NextScaleGenerator)
