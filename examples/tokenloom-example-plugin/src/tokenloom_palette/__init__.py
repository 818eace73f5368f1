"""``palette``: a k-means colour-palette tokenizer, as in iGPT (Chen et al.
2020, "Generative Pretraining from Pixels", which clusters RGB values into a
512-colour palette).

An example of a third-party tokenloom plugin: it lives in its own
distribution and registers through the ``tokenloom`` entry point group.

- ``fit`` runs k-means (k-means++ initialisation, Lloyd iterations, seeded) on
  the pixels of the (optionally pooled) training images;
- ``encode`` maps each pixel to its nearest palette colour; ``decode`` paints
  the palette colours (nearest-neighbour upsampling when ``pool`` > 1);
- ``code_embeddings()`` is the palette itself, ``[V, C]``.
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F

import tokenloom


class PaletteTokenizer(tokenloom.Tokenizer):
    @attrs.frozen
    class Config:
        colours: int = attrs.field(default=16, validator=[attrs.validators.ge(2), attrs.validators.le(4096)])
        pool: int = attrs.field(default=1, validator=attrs.validators.ge(1))
        iterations: int = attrs.field(default=20, validator=attrs.validators.ge(1))
        seed: int = 0

    def __init__(self, config: Config, *, image_shape):
        super().__init__(config, image_shape=image_shape)
        c, h, w = self.image_shape
        if h % config.pool or w % config.pool:
            raise tokenloom.ConfigError(f"pool = {config.pool} does not divide the image size {h}×{w}")
        self.grid = (h // config.pool, w // config.pool)
        self.layout = tokenloom.TokenLayout(scales=(self.grid,))
        self.vocab_size = config.colours
        # Before fitting: an evenly spread grey ramp, so the tokenizer works untrained.
        ramp = torch.linspace(-1, 1, config.colours).unsqueeze(1).repeat(1, c)
        self.register_buffer("palette", ramp)  # [V, C]

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        if self.config.pool > 1:
            images = F.avg_pool2d(images, self.config.pool)
        return images.permute(0, 2, 3, 1).reshape(-1, images.shape[1])  # [B*h*w, C]

    def fit(self, images, *, steps=None, progress=True):
        images = tokenloom.check_images(images, self.image_shape, where="palette.fit: images")
        x = self._pixels(images)
        g = torch.Generator().manual_seed(self.config.seed)
        k = self.config.colours
        # k-means++ initialisation
        centres = [x[torch.randint(len(x), (1,), generator=g)].squeeze(0)]
        for _ in range(1, k):
            d = torch.cdist(x, torch.stack(centres)).min(1).values ** 2
            if d.sum() <= 0:
                centres.append(x[torch.randint(len(x), (1,), generator=g)].squeeze(0))
                continue
            centres.append(x[torch.multinomial(d / d.sum(), 1, generator=g)].squeeze(0))
        c = torch.stack(centres)
        for _ in range(steps or self.config.iterations):  # Lloyd iterations
            assign = torch.cdist(x, c).argmin(1)
            sums = torch.zeros_like(c).index_add_(0, assign, x)
            counts = torch.bincount(assign, minlength=k).unsqueeze(1)
            c = torch.where(counts > 0, sums / counts.clamp(min=1), c)
        self.palette.copy_(c.clamp(-1, 1))
        used = torch.bincount(torch.cdist(x, self.palette).argmin(1), minlength=k)
        return {"utilisation": float((used > 0).float().mean())}

    def encode(self, images):
        images = self.check_images(images)
        x = self._pixels(images)
        return torch.cdist(x, self.palette).argmin(1).reshape(images.shape[0], -1)

    def decode(self, codes):
        codes = self.check_codes(codes)
        h, w = self.grid
        x = self.palette[codes].reshape(codes.shape[0], h, w, -1).permute(0, 3, 1, 2)
        if self.config.pool > 1:
            x = F.interpolate(x, scale_factor=self.config.pool, mode="nearest")
        return x.contiguous()

    def code_embeddings(self):
        return self.palette.detach().clone()


@tokenloom.hookimpl
def register_tokenizers(register):
    register("palette", PaletteTokenizer)
