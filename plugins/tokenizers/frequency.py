"""``frequency``: a training-free Haar-wavelet tokenizer whose bands are
ordered coarse → fine (the wavelet/frequency tokenizers behind next-frequency
generation: "Wavelets Are All You Need for Autoregressive Image Generation"
(2024) and "NFIG: Autoregressive Image Generation with Next-Frequency
Prediction" (2025); the transform is Haar's, 1910).

The image goes through ``levels`` steps of the orthonormal 2-D Haar
transform (per channel; each step maps a 2×2 block ``a b / c d`` to
``LL = (a+b+c+d)/2``, ``LH = (a−b+c−d)/2``, ``HL = (a+b−c−d)/2``,
``HH = (a−b−c+d)/2``). The bands, in the token order, are ``LL_J`` then
``LH_j, HL_j, HH_j`` for ``j = J … 1`` (low → high frequency); the
``drop_levels`` finest detail levels are discarded (reconstructed as zero),
which trades detail for sequence length. The layout has **one scale per
band**, residual (the bands' inverse transforms add up to the image).

Quantisation: a level-``j`` coefficient is divided by its largest possible
magnitude ``2^j`` (images in [-1, 1]) to ``u ∈ [-1, 1]``; detail bands are
companded ``v = sign(u)·|u|^gamma`` (small details get finer steps), then
``v`` is rounded to one of ``bins`` evenly spaced values (odd ``bins`` keep
an exact zero). A token packs the C channels' bin indices of one coefficient
position (``V = bins^C``, channel 0 most significant). Because the transform
is orthonormal, the image error is exactly the coefficient error (Parseval):
decoding is exact up to quantisation and the dropped levels.

Our own implementation (``vector-quantize-pytorch`` has no transform
coders). Training-free: ``fit`` returns ``{}``. Block-DCT is not
implemented. ``code_embeddings()`` is each token's per-channel
(companded) value ``[V, C]`` in [-1, 1].
"""

from __future__ import annotations

import attrs
import torch

import tokenloom


def haar_forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One orthonormal 2-D Haar step: ``(B, C, H, W)`` -> LL, LH, HL, HH ``(B, C, H/2, W/2)``."""
    a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]
    c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    return (a + b + c + d) / 2, (a - b + c - d) / 2, (a + b - c - d) / 2, (a - b - c + d) / 2


def haar_inverse(ll: torch.Tensor, lh: torch.Tensor, hl: torch.Tensor, hh: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`haar_forward`."""
    B, C, h, w = ll.shape
    x = ll.new_empty(B, C, 2 * h, 2 * w)
    x[..., 0::2, 0::2] = (ll + lh + hl + hh) / 2
    x[..., 0::2, 1::2] = (ll - lh + hl - hh) / 2
    x[..., 1::2, 0::2] = (ll + lh - hl - hh) / 2
    x[..., 1::2, 1::2] = (ll - lh - hl + hh) / 2
    return x


class FrequencyTokenizer(tokenloom.Tokenizer):
    @attrs.frozen
    class Config:
        levels: int = attrs.field(default=3, validator=[attrs.validators.ge(1), attrs.validators.le(8)])
        drop_levels: int = attrs.field(default=1, validator=attrs.validators.ge(0))
        bins: int = attrs.field(default=9, validator=[attrs.validators.ge(2), attrs.validators.le(256)])
        gamma: float = attrs.field(default=0.5, validator=[attrs.validators.gt(0.0), attrs.validators.le(1.0)])

    def __init__(self, config: Config, *, image_shape: tuple[int, int, int]):
        super().__init__(config, image_shape=image_shape)
        c, h, w = self.image_shape
        J = config.levels
        if h % 2**J or w % 2**J:
            raise tokenloom.ConfigError(f"levels = {J} needs an image size divisible by {2**J}, got {h}×{w}")
        if config.drop_levels >= J:
            raise tokenloom.ConfigError(f"drop_levels = {config.drop_levels} must be below levels = {J}")
        if config.bins**c > 2**24:
            raise tokenloom.ConfigError(f"bins^channels = {config.bins}^{c} is too large a vocabulary")
        # bands in token order: (level j, kind) with kind 0 = LL, 1 = LH, 2 = HL, 3 = HH
        self.bands: list[tuple[int, int]] = [(J, 0)]
        for j in range(J, config.drop_levels, -1):
            self.bands += [(j, 1), (j, 2), (j, 3)]
        self.layout = tokenloom.TokenLayout(scales=tuple((h >> j, w >> j) for j, _ in self.bands), residual=True)
        self.vocab_size = config.bins**c
        self.register_buffer("_place", config.bins ** torch.arange(c - 1, -1, -1), persistent=False)

    # -- transform ---------------------------------------------------------------
    def analyse(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Image ``(B, C, H, W)`` -> the kept bands in token order, each ``(B, C, h_j, w_j)``
        (raw orthonormal coefficients)."""
        details: dict[int, tuple[torch.Tensor, ...]] = {}
        ll = x
        for j in range(1, self.config.levels + 1):
            ll, lh, hl, hh = haar_forward(ll)
            details[j] = (lh, hl, hh)
        return [ll if kind == 0 else details[j][kind - 1] for j, kind in self.bands]

    def synthesise(self, bands: list[torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`analyse` (dropped levels as zero), unclamped."""
        ll = bands[0]
        it = iter(bands[1:])
        for j in range(self.config.levels, 0, -1):
            if j > self.config.drop_levels:
                lh, hl, hh = next(it), next(it), next(it)
            else:
                lh = hl = hh = torch.zeros_like(ll)
            ll = haar_inverse(ll, lh, hl, hh)
        return ll

    # -- quantiser ---------------------------------------------------------------
    def _to_bins(self, coef: torch.Tensor, j: int, detail: bool) -> torch.Tensor:
        u = (coef / 2**j).clamp(-1, 1)
        v = u.sign() * u.abs().pow(self.config.gamma) if detail else u
        return torch.round((v + 1) / 2 * (self.config.bins - 1)).clamp(0, self.config.bins - 1).long()

    def _from_bins(self, b: torch.Tensor, j: int, detail: bool) -> torch.Tensor:
        v = b.float() / (self.config.bins - 1) * 2 - 1
        u = v.sign() * v.abs().pow(1.0 / self.config.gamma) if detail else v
        return u * 2**j

    def quantise_bands(self, bands: list[torch.Tensor]) -> list[torch.Tensor]:
        """Coefficients -> bin indices ``(B, C, h_j, w_j)`` per band."""
        return [self._to_bins(x, j, kind > 0) for x, (j, kind) in zip(bands, self.bands)]

    def dequantise_bands(self, bins: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self._from_bins(b, j, kind > 0) for b, (j, kind) in zip(bins, self.bands)]

    # -- the contract ---------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        images = self.check_images(images)
        B = images.shape[0]
        out = [(b * self._place.view(1, -1, 1, 1)).sum(1).reshape(B, -1) for b in self.quantise_bands(self.analyse(images))]
        return torch.cat(out, 1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        codes = self.check_codes(codes)
        B = codes.shape[0]
        bins = []
        for sl, (h, w) in zip(self.layout.scale_slices(), self.layout.scales):
            digits = (codes[:, sl].view(B, 1, h, w) // self._place.view(1, -1, 1, 1)) % self.config.bins
            bins.append(digits)
        return self.synthesise(self.dequantise_bands(bins)).clamp(-1.0, 1.0).float()

    def code_embeddings(self) -> torch.Tensor:
        codes = torch.arange(self.vocab_size, device=self._place.device)
        digits = (codes[:, None] // self._place[None, :]) % self.config.bins  # [V, C]
        return (digits.float() / (self.config.bins - 1) * 2 - 1).reshape(self.vocab_size, -1)


@tokenloom.hookimpl
def register_tokenizers(register):
    register("frequency", FrequencyTokenizer)
