"""``pixel``: k-bit colour posterization, one token per pixel (the PixelCNN /
iGPT family: van den Oord et al. 2016, https://arxiv.org/abs/1601.06759;
Chen et al. 2020, "Generative Pretraining from Pixels").

Each channel value in [-1, 1] is rounded to one of ``2**bits`` levels.
``per_channel = false`` (default) packs a pixel's C levels into one token
(V = 2^(bits·C), one scale of h×w tokens); ``per_channel = true`` emits one
token per channel (V = 2^bits, residual ``depth`` = C in the layout, so the
flat order is row-major with channels depth-minor). ``pool`` > 1 average-pools
the image first (iGPT's reduced resolution) and decodes by nearest-neighbour
upsampling. Training-free; ``code_embeddings()`` are the decoded colours.
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F

import tokenloom


class PixelTokenizer(tokenloom.Tokenizer):
    cell_local = True

    @attrs.frozen
    class Config:
        bits: int = attrs.field(default=2, validator=[attrs.validators.ge(1), attrs.validators.le(8)])
        per_channel: bool = False
        pool: int = attrs.field(default=1, validator=attrs.validators.ge(1))

    def __init__(self, config: Config, *, image_shape: tuple[int, int, int]):
        super().__init__(config, image_shape=image_shape)
        c, h, w = self.image_shape
        if h % config.pool or w % config.pool:
            raise tokenloom.ConfigError(f"pool = {config.pool} does not divide the image size {h}×{w}")
        if not config.per_channel and config.bits * c > 16:
            raise tokenloom.ConfigError(
                f"bits·channels = {config.bits * c} gives a vocabulary of 2^{config.bits * c}; "
                "use per_channel = true or fewer bits"
            )
        self.levels = 2**config.bits
        self.grid = (h // config.pool, w // config.pool)
        depth = c if config.per_channel else 1
        self.layout = tokenloom.TokenLayout(scales=(self.grid,), depth=depth)
        self.vocab_size = self.levels if config.per_channel else self.levels**c
        # place values of the packed code: channel 0 is the most significant digit
        self.register_buffer("_place", self.levels ** torch.arange(c - 1, -1, -1), persistent=False)

    def _to_levels(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round((x + 1) / 2 * (self.levels - 1)).clamp_(0, self.levels - 1).long()

    def _from_levels(self, lv: torch.Tensor) -> torch.Tensor:
        return lv.float() / (self.levels - 1) * 2 - 1

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        images = self.check_images(images)
        if self.config.pool > 1:
            images = F.avg_pool2d(images, self.config.pool)
        lv = self._to_levels(images)  # [B, C, h, w]
        if self.config.per_channel:
            return lv.permute(0, 2, 3, 1).reshape(lv.shape[0], -1)  # row-major, channel minor
        return (lv * self._place.view(1, -1, 1, 1)).sum(1).reshape(lv.shape[0], -1)

    def _unpack(self, codes: torch.Tensor) -> torch.Tensor:
        """[B, L] codes -> [B, C, h, w] levels."""
        c = self.image_shape[0]
        h, w = self.grid
        if self.config.per_channel:
            return codes.reshape(-1, h, w, c).permute(0, 3, 1, 2)
        digits = (codes.view(-1, 1, h, w) // self._place.view(1, -1, 1, 1)) % self.levels
        return digits

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        codes = self.check_codes(codes)
        x = self._from_levels(self._unpack(codes))
        if self.config.pool > 1:
            x = F.interpolate(x, scale_factor=self.config.pool, mode="nearest")
        return x.contiguous()

    def code_embeddings(self) -> torch.Tensor:
        if self.config.per_channel:
            return self._from_levels(torch.arange(self.levels)).unsqueeze(1)  # [V, 1]
        c = self.image_shape[0]
        codes = torch.arange(self.vocab_size, device=self._place.device)
        digits = (codes[:, None] // self._place[None, :]) % self.levels  # [V, C]
        return self._from_levels(digits).reshape(self.vocab_size, c)


@tokenloom.hookimpl
def register_tokenizers(register):
    register("pixel", PixelTokenizer)
