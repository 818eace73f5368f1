"""``multiscale``: VAR's multi-scale residual quantisation (Tian et al. 2024,
"Visual Autoregressive Modeling: Scalable Image Generation via Next-Scale
Prediction", https://arxiv.org/abs/2404.02905, reference code
``models/quant.py``), with FlexVAR's non-residual scales as an option
("FlexVAR: Flexible Visual Autoregressive Modeling without Residual
Prediction", 2025).

The encoder's feature map ``f`` (``C × h × w``, ``h = H/downsample``) is
tokenised as ``K`` token maps of growing side ``scales`` (default
``(1, 2, 3, 4, 6, 8)`` on an 8×8 map: L = 130). For scale ``k`` (VAR, Alg. 1):

- ``r_k = area_downsample(f − f̂, s_k)``; ``idx_k = argmin_j ||r_k − e_j||``
  with **one codebook shared by all scales**;
- ``h_k = φ_k(bicubic_upsample(e[idx_k], h × w))`` with
  **φ(h) = 0.5·h + 0.5·conv3×3(h)**, the convs **shared by scale position**:
  ``n_phi`` = 4 convs, scale ``k`` uses the one whose tick in
  ``linspace(1/(3·n_phi), 1 − 1/(3·n_phi), n_phi)`` is nearest to
  ``k / (K − 1)``;
- ``f̂ ← f̂ + h_k`` (**f̂ accumulates**).

Loss per scale ``β·||sg(f̂) − f||² + ||f̂ − sg(f)||²`` (β = 0.25), averaged over
scales; the decoder sees ``f + sg(f̂ − f)``. ``decode`` sums ``h_k`` over all
scales, :meth:`MultiScaleTokenizer.scale_latents` returns the ``h_k``
separately (their sum is what is decoded), and :meth:`scale_inputs` gives
the next-scale order's teacher-forcing inputs (the core ``MultiScaleInputs``
protocol): for every scale after the first, the accumulated ``f̂`` of the
earlier scales area-downsampled to that scale, ``[B, L − s_0², C]``.

``residual = false`` (FlexVAR): every scale quantises ``area_downsample(f, s_k)``
itself, ``h_k = φ_k(upsample(e[idx_k]))`` *replaces* the earlier ones and the
image decodes from the last scale; the decoder is also trained to
reconstruct the image from each coarser ``h_k`` (averaged with the final
reconstruction loss) so every scale is an image of its own resolution —
our reading of FlexVAR's scale-wise training. Its ``scale_inputs`` are the
previous scale's ``h_k`` downsampled. The layout says ``residual = false``.

Our own quantiser (``vector-quantize-pytorch`` has no multi-scale residual
quantiser): core's :class:`tokenloom.quantize.VectorQuantizer` without
l2-normalisation (as VAR), plus the dead-code restart of ``vq`` (our
addition, ``restart_every`` = 0 switches it off). ``code_embeddings()`` is
the codebook ``[V, code_dim]``.
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import nn

import tokenloom
from tokenloom.autoencoder import AutoencoderConfig, AutoencoderTokenizer, QuantOut
from tokenloom.quantize import VectorQuantizer


def _scales_ok(_inst, attribute, value) -> None:
    if not value or any(int(s) < 1 for s in value) or list(value) != sorted(set(value)):
        raise ValueError(f"'scales' must be strictly increasing positive ints, got {list(value)}")


class Phi(nn.Module):
    """φ(h) = (1 − ratio)·h + ratio·conv3×3(h), ratio = 0.5 (VAR's ``Phi``)."""

    def __init__(self, dim: int, ratio: float = 0.5):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)
        self.ratio = ratio

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * (1 - self.ratio) + self.conv(h) * self.ratio


class MultiScaleTokenizer(AutoencoderTokenizer):
    @attrs.frozen
    class Config(AutoencoderConfig):
        scales: tuple[int, ...] = attrs.field(default=(1, 2, 3, 4, 6, 8), converter=tuple, validator=_scales_ok)
        residual: bool = True
        codebook_size: int = attrs.field(default=512, validator=[attrs.validators.ge(2), attrs.validators.le(65536)])
        code_dim: int = attrs.field(default=16, validator=attrs.validators.ge(1))
        beta: float = attrs.field(default=0.25, validator=attrs.validators.ge(0.0))
        n_phi: int = attrs.field(default=4, validator=attrs.validators.ge(1))
        phi_ratio: float = attrs.field(default=0.5, validator=[attrs.validators.ge(0.0), attrs.validators.le(1.0)])
        restart_every: int = attrs.field(default=50, validator=attrs.validators.ge(0))

    def __init__(self, config: Config, *, image_shape: tuple[int, int, int]):
        super().__init__(config, image_shape=image_shape, latent_channels=config.code_dim)
        h, w = self.grid
        if h != w:
            raise tokenloom.ConfigError(f"multiscale needs a square token grid, got {h}×{w}")
        if config.scales[-1] != h:
            raise tokenloom.ConfigError(
                f"scales: the last scale must equal the token grid side {h} (image side / downsample), "
                f"got {list(config.scales)}"
            )
        with self.seeded(1):
            self.quantizer = VectorQuantizer(config.codebook_size, config.code_dim, beta=config.beta,
                                             l2_norm=False, restart_every=config.restart_every)
            self.phis = nn.ModuleList(Phi(config.code_dim, config.phi_ratio) for _ in range(config.n_phi))
        self.layout = tokenloom.TokenLayout(scales=tuple((s, s) for s in config.scales), residual=config.residual)
        self.vocab_size = config.codebook_size
        self.embed_dim = config.code_dim

    # -- VAR's pieces ---------------------------------------------------------
    def phi_index(self, k: int) -> int:
        """Which shared φ scale ``k`` uses (nearest tick, as VAR's ``PhiPartiallyShared``)."""
        n, K = self.config.n_phi, len(self.config.scales)
        at = k / (K - 1) if K > 1 else 0.0
        ticks = torch.linspace(1 / 3 / n, 1 - 1 / 3 / n, n) if n > 1 else torch.tensor([0.5])
        return int((ticks - at).abs().argmin())

    def _up(self, e: torch.Tensor) -> torch.Tensor:  # (B, C, s, s) -> (B, C, h, w)
        h, w = self.grid
        return e if e.shape[-1] == w else F.interpolate(e, size=(h, w), mode="bicubic")

    def _h(self, k: int, e: torch.Tensor) -> torch.Tensor:
        return self.phis[self.phi_index(k)](self._up(e))

    @staticmethod
    def _down(f: torch.Tensor, s: int) -> torch.Tensor:
        return f if f.shape[-1] == s else F.interpolate(f, size=(s, s), mode="area")

    def quantize(self, f: torch.Tensor) -> QuantOut:  # f: (B, C, h, w)
        B, C = f.shape[:2]
        f_ng = f.detach()
        f_hat = torch.zeros_like(f)
        codes, aux = [], []
        loss = f.new_zeros(())
        K = len(self.config.scales)
        for k, s in enumerate(self.config.scales):
            target = self._down(f_ng - f_hat.detach(), s) if self.config.residual else self._down(f, s)
            flat = target.permute(0, 2, 3, 1).reshape(-1, C)  # (B·s·s, C)
            _zq, idx, vq_loss = self.quantizer(flat)
            codes.append(idx.reshape(B, s * s))
            e = self.quantizer.lookup(idx).reshape(B, s, s, C).permute(0, 3, 1, 2)  # (B, C, s, s), grads to codebook
            h = self._h(k, e)
            if self.config.residual:
                f_hat = f_hat + h
                if self.training:  # VAR: β·||sg(f̂) − f||² + ||f̂ − sg(f)||²
                    loss = loss + (self.config.beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, f_ng)) / K
            else:
                f_hat = h
                if self.training:
                    loss = loss + vq_loss / K
                    if k < K - 1:
                        aux.append(h)
        latent = (f_hat.detach() - f_ng) + f if self.training else f_hat  # straight-through
        stats = {"vq": float(loss.detach())} if self.training else {}
        return QuantOut(latent, torch.cat(codes, 1).long(), loss, stats, aux)

    def after_step(self, step: int, generator: torch.Generator) -> dict[str, float]:
        n = self.quantizer.restart_dead_codes(generator)
        return {"restarted": float(n)} if self.config.restart_every else {}

    # -- decoding and the next-scale inputs ------------------------------------
    def _split(self, codes: torch.Tensor) -> list[torch.Tensor]:
        B, C = codes.shape[0], self.config.code_dim
        out = []
        for sl, s in zip(self.layout.scale_slices(), self.config.scales):
            out.append(self.quantizer.lookup(codes[:, sl]).reshape(B, s, s, C).permute(0, 3, 1, 2))
        return out  # per scale (B, C, s, s)

    def scale_latents(self, codes: torch.Tensor) -> list[torch.Tensor]:
        """``h_k`` ``(B, C, h, w)`` of every scale. Residual: their sum is the
        decoded latent; non-residual: the last one is."""
        codes = self.check_codes(codes)
        return [self._h(k, e) for k, e in enumerate(self._split(codes))]

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        es = self._split(codes)
        if not self.config.residual:
            return self._h(len(es) - 1, es[-1])
        f_hat = torch.zeros_like(self._up(es[0]))
        for k, e in enumerate(es):
            f_hat = f_hat + self._h(k, e)
        return f_hat

    def scale_inputs(self, codes: torch.Tensor) -> torch.Tensor:
        """``[B, L − s_0², code_dim]``: for each scale after the first, the
        accumulated f̂ of the earlier scales (only the previous ``h_k`` when
        non-residual) area-downsampled to that scale, row-major."""
        codes = self.check_codes(codes)
        es = self._split(codes)
        B, C = codes.shape[0], self.config.code_dim
        f_hat = torch.zeros_like(self._up(es[0]))
        out = []
        for k in range(len(es) - 1):
            h = self._h(k, es[k])
            f_hat = f_hat + h if self.config.residual else h
            nxt = self._down(f_hat, self.config.scales[k + 1])  # (B, C, s, s)
            out.append(nxt.permute(0, 2, 3, 1).reshape(B, -1, C))
        return torch.cat(out, 1) if out else codes.new_zeros((B, 0, C), dtype=torch.float32)

    def code_embeddings(self) -> torch.Tensor:
        return self.quantizer.codebook().detach().float().clone()


@tokenloom.hookimpl
def register_tokenizers(register):
    register("multiscale", MultiScaleTokenizer)
