"""``vq``: a VQ-VAE / VQGAN codebook tokenizer in LlamaGen's recipe
(van den Oord et al. 2017, https://arxiv.org/abs/1711.00937; Esser et al.
2021, https://arxiv.org/abs/2012.09841; Sun et al. 2024, "Autoregressive
Model Beats Diffusion: Llama for Scalable Image Generation",
https://arxiv.org/abs/2406.06525).

LlamaGen's decisive choices, kept here: the encoder output is projected to a
**low-dimensional code space** (``code_dim`` = 8) and both the vectors and the
codebook are **l2-normalised** before the nearest-neighbour lookup; the
codebook is learned by its own loss ``||z_q − sg(z)||²`` with a **commitment
loss β = 0.25**; gradients pass the quantiser **straight through**. Differs:
LlamaGen also l2-normalises the stored codebook at initialisation —
``l2_init = true`` (off by default: at this toolkit's budgets it
reconstructs worse, see :class:`tokenloom.quantize.VectorQuantizer`). Added option: **dead-code restart** (``restart_every`` steps without use moves a
code onto a recent encoder output; 0 switches it off).

The quantiser is our own (:class:`tokenloom.quantize.VectorQuantizer`):
``vector-quantize-pytorch`` 1.32 refuses an l2-normalised (cosine) codebook
learned by gradient, which is LlamaGen's. The encoder/decoder is core's small
conv net; no perceptual or adversarial loss (offline, CPU) — the
reconstruction loss is MSE. One scale of ``H/downsample × W/downsample``
tokens; ``code_embeddings()`` is the normalised codebook ``[V, code_dim]``.
"""

from __future__ import annotations

import attrs
import torch

import tokenloom
from tokenloom.autoencoder import AutoencoderConfig, AutoencoderTokenizer, QuantOut
from tokenloom.quantize import VectorQuantizer


class VQTokenizer(AutoencoderTokenizer):
    @attrs.frozen
    class Config(AutoencoderConfig):
        codebook_size: int = attrs.field(default=512, validator=[attrs.validators.ge(2), attrs.validators.le(65536)])
        code_dim: int = attrs.field(default=8, validator=attrs.validators.ge(1))
        beta: float = attrs.field(default=0.25, validator=attrs.validators.ge(0.0))
        l2_norm: bool = True
        restart_every: int = attrs.field(default=50, validator=attrs.validators.ge(0))
        #: l2-normalise the stored codebook at initialisation, as LlamaGen's VectorQuantizer (with l2_norm)
        l2_init: bool = False

    def __init__(self, config: Config, *, image_shape: tuple[int, int, int]):
        super().__init__(config, image_shape=image_shape, latent_channels=config.code_dim)
        with self.seeded(1):
            self.quantizer = VectorQuantizer(config.codebook_size, config.code_dim, beta=config.beta,
                                             l2_norm=config.l2_norm, restart_every=config.restart_every,
                                             l2_init=config.l2_init)
        self.layout = tokenloom.TokenLayout(scales=(self.grid,))
        self.vocab_size = config.codebook_size

    def quantize(self, z: torch.Tensor) -> QuantOut:  # z: (B, D, h, w)
        B, D, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, D)  # (B·h·w, D)
        zq, idx, loss = self.quantizer(flat)
        latent = zq.reshape(B, h, w, D).permute(0, 3, 1, 2)
        return QuantOut(latent, idx.reshape(B, h * w), loss, {"vq": float(loss.detach())})

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        h, w = self.grid
        return self.quantizer.lookup(codes).reshape(-1, h, w, self.config.code_dim).permute(0, 3, 1, 2)

    def after_step(self, step: int, generator: torch.Generator) -> dict[str, float]:
        n = self.quantizer.restart_dead_codes(generator)
        return {"restarted": float(n)} if self.config.restart_every else {}

    def code_embeddings(self) -> torch.Tensor:
        return self.quantizer.codebook().detach().float().clone()


@tokenloom.hookimpl
def register_tokenizers(register):
    register("vq", VQTokenizer)
