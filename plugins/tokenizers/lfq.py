"""``lfq``: lookup-free (binary) quantisation (MAGVIT-v2: Yu et al. 2024,
"Language Model Beats Diffusion — Tokenizer is Key to Visual Generation",
https://arxiv.org/abs/2310.05737; binary spherical variant BSQ: Zhao et al.
2024, https://arxiv.org/abs/2406.07548).

The encoder emits ``K`` channels per grid position; each is quantised to its
sign, ``q_i = sign(z_i) ∈ {−1, +1}``, with a straight-through gradient, and the
token is the binary number of the bits (``Σ 2^(K−1−i)·[z_i > 0]``), so
``V = 2^K`` with no codebook lookup. Training adds MAGVIT-v2's entropy loss —
the mean per-position entropy of the soft assignment over all ``2^K`` codes
minus ``diversity_gamma`` times the entropy of the batch-averaged assignment
(confident tokens, all codes used) — weighted 0.1, and a commitment loss
weighted 0.25 (Open-MAGVIT2's settings). ``spherical = true`` l2-normalises
``z`` and the codes first (BSQ), per group of bits.

The entropy terms need a softmax over all 2^K codes per position, the bulk of
a training step on a CPU. ``entropy_groups`` = g splits the K bits into g
independent sub-codebooks of K/g bits and computes the entropy terms per
group (default 2 groups of 5 bits: 2·32 instead of 1024 outputs per
position); the token is still the K-bit number and ``V = 2^K``.
``entropy_groups = 1`` is the paper's equation over all 2^K codes.

Quantiser: ``vector_quantize_pytorch.LFQ`` (``num_codebooks`` = g), which
implements these equations. One scale of ``H/downsample × W/downsample``
tokens; ``code_embeddings()`` is the implicit ±1 codebook ``[V, K]``
(unit-norm per group when spherical).
"""

from __future__ import annotations

import attrs
import torch

import tokenloom
from tokenloom.autoencoder import AutoencoderConfig, AutoencoderTokenizer, QuantOut


class LFQTokenizer(AutoencoderTokenizer):
    @attrs.frozen
    class Config(AutoencoderConfig):
        bits: int = attrs.field(default=10, validator=[attrs.validators.ge(1), attrs.validators.le(18)])
        entropy_weight: float = attrs.field(default=0.1, validator=attrs.validators.ge(0.0))
        commitment_weight: float = attrs.field(default=0.25, validator=attrs.validators.ge(0.0))
        diversity_gamma: float = attrs.field(default=1.0, validator=attrs.validators.ge(0.0))
        spherical: bool = False
        entropy_groups: int = attrs.field(default=2, validator=attrs.validators.ge(1))

    def __init__(self, config: Config, *, image_shape: tuple[int, int, int]):
        from vector_quantize_pytorch import LFQ

        K, g = config.bits, config.entropy_groups
        if K % g:
            raise tokenloom.ConfigError(f"entropy_groups = {g} must divide bits = {K}")
        super().__init__(config, image_shape=image_shape, latent_channels=K)
        self.lfq = LFQ(dim=K, codebook_size=2 ** (K // g), num_codebooks=g, keep_num_codebooks_dim=True,
                       entropy_loss_weight=config.entropy_weight, commitment_loss_weight=config.commitment_weight,
                       diversity_gamma=config.diversity_gamma, spherical=config.spherical)
        self.register_buffer("_weights", 2 ** torch.arange(K - 1, -1, -1), persistent=False)
        # group c's id (its K/g bits, first most significant) sits at bits (g-1-c)·K/g of the K-bit number
        self.register_buffer("_group_weights", 2 ** (K // g * torch.arange(g - 1, -1, -1)), persistent=False)
        self.layout = tokenloom.TokenLayout(scales=(self.grid,))
        self.vocab_size = 2**config.bits

    def quantize(self, z: torch.Tensor) -> QuantOut:  # z: (B, K, h, w)
        B, K, h, w = z.shape
        zq, ids, aux = self.lfq(z.permute(0, 2, 3, 1).reshape(B, h * w, K))  # (B, N, K), (B, N, g), ()
        latent = zq.reshape(B, h, w, K).permute(0, 3, 1, 2)
        loss = aux if self.training else z.new_zeros(())
        # the K-bit number (bit 0 most significant) from the layer's per-group ids: sign(z_i) > 0 is bit i
        codes = (ids.long() * self._group_weights).sum(-1).reshape(B, -1)
        return QuantOut(latent, codes, loss, {"aux": float(loss.detach())})

    def codes_to_vectors(self, idx: torch.Tensor) -> torch.Tensor:
        """Indices (any shape) -> code vectors (shape + ``(K,)``): ±1, or
        unit-norm per group of bits when spherical."""
        bits = (idx.long()[..., None] // self._weights) % 2
        v = bits.float() * 2 - 1
        if self.config.spherical:
            g = self.config.entropy_groups
            v = torch.nn.functional.normalize(v.reshape(*v.shape[:-1], g, -1), dim=-1).reshape(v.shape)
        return v

    def vectors_to_codes(self, vectors: torch.Tensor) -> torch.Tensor:
        """Vectors -> the index of their sign pattern."""
        return ((vectors > 0).long() * self._weights).sum(-1)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        h, w = self.grid
        return self.codes_to_vectors(codes).reshape(-1, h, w, self.config.bits).permute(0, 3, 1, 2)

    def code_embeddings(self) -> torch.Tensor:
        return self.codes_to_vectors(torch.arange(self.vocab_size)).detach().float().clone()


@tokenloom.hookimpl
def register_tokenizers(register):
    register("lfq", LFQTokenizer)
