"""``rq``: residual quantisation with a shared codebook (RQ-VAE: Lee et al.
2022, "Autoregressive Image Generation using Residual Quantization",
https://arxiv.org/abs/2203.01941).

Each grid position is quantised ``depth`` times: code ``d`` quantises the
residual ``r_d = z − Σ_{i<d} e_{k_i}`` left by the codes before it, all
depths drawing from **one shared codebook**, and ``ẑ = Σ_d e_{k_d}`` goes to
the decoder (straight-through). As in RQ-VAE the codebook is updated by
exponential moving averages (decay 0.99) and the encoder carries a
commitment loss (β = 0.25) at every depth. The layout is one scale of
``H/downsample × W/downsample`` positions with residual ``depth`` D, so
``L = D·h·w`` and the flat order is row-major, depth-minor (the order
RQ-Transformer's depth head predicts). The default (``downsample`` = 8,
``depth`` = 4: 4×4×4 = 64 codes at 32 px) matches the ``vq`` default's 64
tokens with RQ-VAE's trade of spatial resolution for depth.

Quantiser: ``vector_quantize_pytorch.ResidualVQ(shared_codebook=True)``,
which implements RQ-VAE's Algorithm 1 with an EMA codebook (fed a flattened
``(B, h·w, D)`` sequence: its image-feature-map path fails with a shared
codebook in version 1.32). ``code_embeddings()`` is the shared codebook
``[V, code_dim]``. :meth:`RQTokenizer.decode_depth` decodes from the first
``d`` codes of each stack only (coarse-to-fine reconstructions).
"""

from __future__ import annotations

import attrs
import torch

import tokenloom
from tokenloom.autoencoder import AutoencoderConfig, AutoencoderTokenizer, QuantOut


class RQTokenizer(AutoencoderTokenizer):
    @attrs.frozen
    class Config(AutoencoderConfig):
        codebook_size: int = attrs.field(default=256, validator=[attrs.validators.ge(2), attrs.validators.le(65536)])
        depth: int = attrs.field(default=4, validator=[attrs.validators.ge(1), attrs.validators.le(64)])
        code_dim: int = attrs.field(default=16, validator=attrs.validators.ge(1))
        beta: float = attrs.field(default=0.25, validator=attrs.validators.ge(0.0))
        decay: float = attrs.field(default=0.99, validator=[attrs.validators.gt(0.0), attrs.validators.lt(1.0)])
        downsample: int = attrs.field(default=8, validator=attrs.validators.in_((1, 2, 4, 8)))

    def __init__(self, config: Config, *, image_shape: tuple[int, int, int]):
        from vector_quantize_pytorch import ResidualVQ

        super().__init__(config, image_shape=image_shape, latent_channels=config.code_dim)
        with self.seeded(1):
            self.rq = ResidualVQ(dim=config.code_dim, num_quantizers=config.depth, codebook_size=config.codebook_size,
                                 shared_codebook=True, commitment_weight=config.beta, decay=config.decay,
                                 kmeans_init=False, threshold_ema_dead_code=0)
        self.layout = tokenloom.TokenLayout(scales=(self.grid,), depth=config.depth)
        self.vocab_size = config.codebook_size

    def quantize(self, z: torch.Tensor) -> QuantOut:  # z: (B, D, h, w)
        B, D, h, w = z.shape
        seq = z.permute(0, 2, 3, 1).reshape(B, h * w, D)  # (B, N, D)
        zq, idx, commit = self.rq(seq)  # (B, N, D), (B, N, depth), (depth,)
        loss = commit.sum() if self.training else z.new_zeros(())
        latent = zq.reshape(B, h, w, D).permute(0, 3, 1, 2)
        return QuantOut(latent, idx.reshape(B, -1).long(), loss, {"commit": float(loss.detach())})

    def _stack(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.reshape(codes.shape[0], -1, self.config.depth)  # (B, N, depth)

    def _latent_from(self, idx: torch.Tensor) -> torch.Tensor:
        h, w = self.grid
        vecs = self.code_embeddings().to(self.encoder.net[0].weight)[idx]  # (B, N, d, D)
        return vecs.sum(2).reshape(idx.shape[0], h, w, -1).permute(0, 3, 1, 2)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        return self._latent_from(self._stack(codes))

    def decode_depth(self, codes: torch.Tensor, depth: int) -> torch.Tensor:
        """Decode from the first ``depth`` codes of every stack (the rest dropped)."""
        codes = self.check_codes(codes)
        if not 1 <= depth <= self.config.depth:
            raise tokenloom.InputError(f"decode_depth: depth must be in [1, {self.config.depth}], got {depth}")
        return self._per_image(lambda c: self.decoder(self._latent_from(self._stack(c)[:, :, :depth])).clamp(-1.0, 1.0),
                               codes)

    def code_embeddings(self) -> torch.Tensor:
        return self.rq.codebooks[0].detach().float().clone()  # [V, code_dim]


@tokenloom.hookimpl
def register_tokenizers(register):
    register("rq", RQTokenizer)
