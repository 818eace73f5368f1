"""``patch``: raw pixel patches as continuous tokens, training-free.

Each non-overlapping ``patch × patch`` patch of the image is one token: its
``C·p·p`` pixel values, in MAR's/FlowAR's ``patchify`` order (channel-major,
then the patch's rows, then its columns: ``nchpwq -> nhwcpq``). Tokens are laid
out on one grid of ``H/p × W/p`` cells, row-major (``cell_local``: a token is
its patch alone). ``decode`` is the exact inverse of ``encode`` (tokens ->
pixels, clamped to [-1, 1] so that any latents a head produces decode to an
image; the tokens of an image are already inside).

Kept from MAR/FlowAR: their ``patchify`` (which they apply to VAE latents,
here to pixels) and its order. It is the training-free counterpart of ``kl``:
a comparison of token kinds can separate what the KL autoencoder's
compression brings from what continuous modelling itself brings. Differs:
no normalisation of the values (they are already in [-1, 1]).
``code_embeddings()`` has no meaning (no vocabulary) and raises.
"""

from __future__ import annotations

import attrs
import torch

import tokenloom


class PatchTokenizer(tokenloom.Tokenizer):
    """Pixel patches as tokens (see the module docstring)."""

    continuous = True
    cell_local = True

    @attrs.frozen
    class Config:
        #: side p of a square patch, in pixels (must divide H and W)
        patch: int = attrs.field(default=2, validator=[attrs.validators.ge(1), attrs.validators.le(64)])

    def __init__(self, config: Config, *, image_shape: tuple[int, int, int]):
        super().__init__(config, image_shape=image_shape)
        c, h, w = self.image_shape
        p = config.patch
        if h % p or w % p:
            raise tokenloom.ConfigError(f"patch: patch = {p} does not divide the image size {h}×{w}")
        self.grid = (h // p, w // p)
        self.layout = tokenloom.TokenLayout(scales=(self.grid,))
        self.token_dim = c * p * p
        self.vocab_size = 0

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        x = self.check_images(images)
        B, C = x.shape[:2]
        (gh, gw), p = self.grid, self.config.patch
        x = x.reshape(B, C, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5)  # (B, gh, gw, C, p, p)
        return x.reshape(B, gh * gw, self.token_dim).contiguous()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = self.check_latents(latents)
        B, C = z.shape[0], self.image_shape[0]
        (gh, gw), p = self.grid, self.config.patch
        x = z.reshape(B, gh, gw, C, p, p).permute(0, 3, 1, 4, 2, 5)  # (B, C, gh, p, gw, p)
        return x.reshape(B, C, gh * p, gw * p).clamp(-1.0, 1.0).contiguous()

    def code_embeddings(self) -> torch.Tensor:
        raise tokenloom.ConfigError("patch has continuous tokens: there is no codebook "
                                    "(code_embeddings() applies to discrete tokenizers only)")


@tokenloom.hookimpl
def register_tokenizers(register):
    register("patch", PatchTokenizer)
