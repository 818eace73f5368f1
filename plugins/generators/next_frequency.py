"""``next-frequency``: next-frequency prediction — NFIG (Huang et al. 2025,
"NFIG: Autoregressive Image Generation with Next-Frequency Prediction",
https://arxiv.org/abs/2503.07076), with the training-free ``frequency``
(Haar wavelet) tokenizer, whose layout has one scale per frequency band,
low → high.

NFIG generates the low-frequency band first (global structure with few
tokens) and adds higher-frequency bands one at a time, with VAR's
next-scale machinery. Here:

**Training.** The sequence holds every band's tokens, low to high
(``T = L``). The input at each position of band b is the image
reconstructed from bands < b — ``tokenizer.decode`` of the codes with
every band ≥ b set to the tokenizer's zero code (the code whose value is
exactly zero; for a wavelet tokenizer decoding then is the inverse
transform of the coarser bands) — area-downsampled to band b's grid: a
C-vector per position, the pixel-space counterpart of VAR's f̂. The first
band's slots are start tokens (the class embedding at index 0). Every
position predicts its own code under the block-causal mask over bands.

**Decoding.** One pass per band with a KV cache: NFE = number of bands
(7 for the default 32 px ``frequency`` layout). Classifier-free guidance
rows share each pass; ``StepInfo.scale`` is the band.

**Likelihood.** Exact (as VAR's): Σ_b log p(band b | bands < b).

Composition: needs a residual multi-scale layout and a tokenizer with a
zero code (``frequency`` with an odd number of ``bins``).
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F

import tokenloom
from tokenloom.orders import ScaleOrder, refuse_known


class NextFrequencyGenerator(tokenloom.Generator):
    exact_likelihood = True

    @attrs.frozen
    class Config:
        pass

    def __init__(self, config: Config, *, tokenizer: tokenloom.Tokenizer):
        super().__init__(config, tokenizer=tokenizer)
        layout = tokenizer.layout
        if layout.n_scales < 2:
            raise tokenloom.ConfigError(
                f"next-frequency needs a tokenizer with several frequency bands, but {type(tokenizer).__name__} "
                f"has a single scale {list(layout.scales)} (use tokenizer 'frequency')")
        if not layout.residual:
            raise tokenloom.ConfigError("next-frequency needs bands that add up (a residual layout)")
        emb = tokenizer.code_embeddings().detach()
        norms = emb.float().norm(dim=-1)
        if float(norms.min()) != 0.0:
            raise tokenloom.ConfigError(
                f"next-frequency needs a zero code (a coefficient of exactly zero) to decode coarser bands alone; "
                f"tokenizer {type(tokenizer).__name__} has none (for 'frequency', use an odd number of bins)")
        self.zero = int(norms.argmin())
        self.L, self.V = layout.length, tokenizer.vocab_size
        self.C = int(tokenizer.image_shape[0])
        self.bands = ScaleOrder(layout, self.V, self.C, self.band_inputs, train_order="next-frequency",
                                who="next-frequency", scale_fn=self.band_input)

    def band_input(self, codes: torch.Tensor, b: int) -> torch.Tensor:
        """``[B, n_b, C]``: the image decoded from the bands before band
        ``b`` (the others set to the zero code), area-downsampled to band
        ``b``'s grid, row-major."""
        partial = codes.clone()
        partial[:, self.tokenizer.layout.scale_slices()[b].start :] = self.zero
        img = self.tokenizer.decode(partial)  # (B, C, H, W)
        h, w = self.tokenizer.layout.scales[b]
        return F.interpolate(img, size=(h, w), mode="area").flatten(2).transpose(1, 2)  # (B, h·w, C)

    def band_inputs(self, codes: torch.Tensor) -> torch.Tensor:
        """``[B, L − n_0, C]``: :meth:`band_input` of every band after the first."""
        return torch.cat([self.band_input(codes, b) for b in range(1, self.tokenizer.layout.n_scales)], 1)

    # Deliberately the same delegations as next-scale's: both orders are core's ScaleOrder (VAR's
    # next-scale prediction), over spatial scales there and frequency bands here.
    def model_spec(self) -> tokenloom.ModelSpec:
        return self.bands.model_spec()

    def expected_nfe(self) -> int:
        return self.bands.K

    def training_batch(self, codes: torch.Tensor, cond: torch.Tensor) -> tokenloom.TrainBatch:
        codes = tokenloom.check_codes(codes, self.L, self.V, where="next-frequency.training_batch: codes")
        return self.bands.training_batch(codes, cond)

    def generate(self, model, chain, cond, *, rng, known=None) -> torch.Tensor:
        refuse_known("next-frequency", known, instead="'next-scale' or 'masked'")
        return self.bands.generate(model, chain, cond, rng)

    def log_likelihood(self, model, codes, cond) -> torch.Tensor:
        codes = tokenloom.check_codes(codes, self.L, self.V, where="next-frequency.log_likelihood: codes")
        return self.bands.log_likelihood(model, codes, cond)


@tokenloom.hookimpl
def register_generators(register):
    register("next-frequency", NextFrequencyGenerator)
