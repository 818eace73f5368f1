"""``fsq``: finite scalar quantisation (Mentzer et al. 2024, "Finite Scalar
Quantization: VQ-VAE Made Simple", https://arxiv.org/abs/2309.15505).

The encoder emits ``d = len(levels)`` channels per grid position; each
channel is bounded with ``tanh`` to ``L_i`` levels and rounded with a
straight-through gradient. The codebook is implicit — the product grid of
levels, ``V = Π L_i`` (default ``(8, 5, 5, 5)`` → 1000) — so there is no
codebook loss, no commitment loss and no codebook to collapse; the index is
the mixed-radix number of the per-channel levels (a bijection).

Quantiser: ``vector_quantize_pytorch.FSQ``, which follows the paper's
reference code (the half-level offset for even ``L_i``, ``round_ste``,
mixed-radix indices). One scale of ``H/downsample × W/downsample`` tokens;
``code_embeddings()`` is the implicit codebook ``[V, d]`` with entries in
[-1, 1].
"""

from __future__ import annotations

import attrs
import torch

import tokenloom
from tokenloom.autoencoder import AutoencoderConfig, AutoencoderTokenizer, QuantOut


def _levels_ok(_inst, attribute, value) -> None:
    if not value or any(int(v) < 3 for v in value):
        raise ValueError(f"'levels' must be a non-empty list of ints >= 3, got {list(value)}")
    v = 1
    for x in value:
        v *= int(x)
    if v > 2**20:
        raise ValueError(f"'levels' give a vocabulary of {v} > 2^20")


class FSQTokenizer(AutoencoderTokenizer):
    @attrs.frozen
    class Config(AutoencoderConfig):
        levels: tuple[int, ...] = attrs.field(default=(8, 5, 5, 5), converter=tuple, validator=_levels_ok)

    def __init__(self, config: Config, *, image_shape: tuple[int, int, int]):
        from vector_quantize_pytorch import FSQ

        d = len(config.levels)
        super().__init__(config, image_shape=image_shape, latent_channels=d)
        self.fsq = FSQ(levels=list(config.levels), dim=d)
        self.layout = tokenloom.TokenLayout(scales=(self.grid,))
        self.vocab_size = int(self.fsq.codebook_size)

    def quantize(self, z: torch.Tensor) -> QuantOut:  # z: (B, d, h, w)
        B, d, h, w = z.shape
        zq, idx = self.fsq(z.permute(0, 2, 3, 1).reshape(B, h * w, d))  # (B, N, d), (B, N)
        latent = zq.reshape(B, h, w, d).permute(0, 3, 1, 2)
        return QuantOut(latent, idx.reshape(B, -1).long(), z.new_zeros(()))

    def codes_to_vectors(self, idx: torch.Tensor) -> torch.Tensor:
        """Indices (any shape) -> code vectors (shape + ``(d,)``) in [-1, 1]."""
        return self.fsq.implicit_codebook[idx.long()]

    def vectors_to_codes(self, vectors: torch.Tensor) -> torch.Tensor:
        """Code vectors on the level grid -> their indices."""
        return self.fsq.codes_to_indices(vectors).long()

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        h, w = self.grid
        return self.codes_to_vectors(codes).reshape(-1, h, w, len(self.config.levels)).permute(0, 3, 1, 2)

    def code_embeddings(self) -> torch.Tensor:
        return self.fsq.implicit_codebook.detach().float().clone()


@tokenloom.hookimpl
def register_tokenizers(register):
    register("fsq", FSQTokenizer)
