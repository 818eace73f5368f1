"""A small convolutional encoder/decoder shared by the learned tokenizers.

The VQGAN/LlamaGen layout scaled down for a CPU: a stem conv, then per
resolution level one residual block followed by a stride-2 convolution, a
residual block at the latent resolution and a 1×1 projection to the latent
width. The decoder mirrors it with nearest-neighbour upsampling. ``downsample``
is 2, 4, 8 or 16; the first level has ``channels`` feature maps, deeper levels
twice that.

    enc = Encoder(3, 8, downsample=4, channels=32)   # (B, 3, 32, 32) -> (B, 8, 8, 8)
    dec = Decoder(8, 3, downsample=4, channels=32)   # (B, 8, 8, 8)  -> (B, 3, 32, 32)

The decoder's output is unbounded (training takes the loss on it, so the
saturated ±1 pixels of ``shapes`` stay reachable); tokenizers clamp it to
[-1, 1] when decoding.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

DOWNSAMPLE_FACTORS: tuple[int, ...] = (1, 2, 4, 8, 16)


def _groups(c: int) -> int:
    return math.gcd(8, c)


class ResBlock(nn.Module):
    """``x + conv(silu(norm(conv(silu(norm(x))))))`` at constant width."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(channels), channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(channels), channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


def _widths(downsample: int, channels: int) -> list[int]:
    if downsample not in DOWNSAMPLE_FACTORS:
        raise ValueError(f"downsample must be one of {DOWNSAMPLE_FACTORS}, got {downsample}")
    n = int(math.log2(downsample))
    return [channels * (1 if i == 0 else 2) for i in range(n + 1)]  # width at each resolution level


class Encoder(nn.Module):
    """``(B, in_channels, H, W) -> (B, out_channels, H/downsample, W/downsample)``."""

    def __init__(self, in_channels: int, out_channels: int, *, downsample: int = 4, channels: int = 32):
        super().__init__()
        widths = _widths(downsample, channels)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1)]
        for a, b in itertools.pairwise(widths):
            layers += [ResBlock(a), nn.Conv2d(a, b, 4, stride=2, padding=1)]
        layers += [ResBlock(widths[-1]), nn.GroupNorm(_groups(widths[-1]), widths[-1]), nn.SiLU(),
                   nn.Conv2d(widths[-1], out_channels, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """``(B, in_channels, h, w) -> (B, out_channels, h*downsample, w*downsample)``, unbounded."""

    def __init__(self, in_channels: int, out_channels: int, *, downsample: int = 4, channels: int = 32):
        super().__init__()
        widths = _widths(downsample, channels)[::-1]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1), ResBlock(widths[0])]
        for a, b in itertools.pairwise(widths):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(a, b, 3, padding=1), ResBlock(b)]
        layers += [nn.GroupNorm(_groups(widths[-1]), widths[-1]), nn.SiLU(),
                   nn.Conv2d(widths[-1], out_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class PatchEncoder(nn.Module):
    """``(B, in_channels, H, W) -> (B, out_channels, H/downsample, W/downsample)`` in which
    every output vector is a function of its own ``downsample × downsample`` pixel patch
    only: a patchify convolution (kernel = stride = ``downsample``, as a ViT's patch
    embedding) and two 1×1 convolutions, no normalisation across positions. Width
    ``4·channels``."""

    def __init__(self, in_channels: int, out_channels: int, *, downsample: int = 4, channels: int = 32):
        super().__init__()
        _widths(downsample, channels)  # the same check of downsample
        w = 4 * channels
        self.net = nn.Sequential(nn.Conv2d(in_channels, w, downsample, stride=downsample), nn.SiLU(),
                                 nn.Conv2d(w, w, 1), nn.SiLU(), nn.Conv2d(w, out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PatchDecoder(nn.Module):
    """``(B, in_channels, h, w) -> (B, out_channels, h*downsample, w*downsample)``, unbounded,
    every ``downsample × downsample`` output patch a function of its own input vector only
    (two 1×1 convolutions, then a transposed convolution with kernel = stride = ``downsample``)."""

    def __init__(self, in_channels: int, out_channels: int, *, downsample: int = 4, channels: int = 32):
        super().__init__()
        _widths(downsample, channels)
        w = 4 * channels
        self.net = nn.Sequential(nn.Conv2d(in_channels, w, 1), nn.SiLU(), nn.Conv2d(w, w, 1), nn.SiLU(),
                                 nn.ConvTranspose2d(w, out_channels, downsample, stride=downsample))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


#: ``encoder`` option of the learned tokenizers -> (encoder, decoder) classes
ARCHITECTURES: dict[str, tuple[type[nn.Module], type[nn.Module]]] = {
    "conv": (Encoder, Decoder),
    "patchwise": (PatchEncoder, PatchDecoder),
}

__all__ = ["ARCHITECTURES", "DOWNSAMPLE_FACTORS", "Decoder", "Encoder", "PatchDecoder", "PatchEncoder", "ResBlock"]
