"""``kl``: a convolutional VAE with a KL term, the continuous tokenizer of
latent diffusion and MAR (Kingma & Welling 2014, https://arxiv.org/abs/1312.6114;
Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
Models", https://arxiv.org/abs/2112.10752, reference ``AutoencoderKL`` and
``DiagonalGaussianDistribution``; Li et al. 2024, "Autoregressive Image
Generation without Vector Quantization" (MAR), https://arxiv.org/abs/2406.11838,
reference ``models/vae.py``), with FlowAR's continuous multi-scale layout as
an option (Ren et al. 2024, "FlowAR: Scale-wise Autoregressive Image
Generation Meets Flow Matching", https://arxiv.org/abs/2412.15205).

Kept from the references:

- the encoder predicts a **diagonal Gaussian posterior**: ``2·token_dim``
  channels split into mean and log-variance, the log-variance **clamped to
  [-30, 20]** (LDM's ``DiagonalGaussianDistribution``);
- training decodes a **reparameterised draw** ``mean + std·ε`` and adds the
  **KL to N(0, I)**, ``0.5·Σ(mean² + var − 1 − logvar)`` summed over the
  latent of each image, weighted by ``kl_weight``;
- ``encode`` returns the **posterior mean** (LDM's ``mode()``): tokens are
  deterministic; the draw is only a training device;
- the tokens are **multiplied by a fitted scale factor** (``scale_latents``,
  on by default): after the fit, ``1 / std`` of the posterior means of (up to
  256 of) the training images, as LDM's ``scale_by_std`` computes from its
  first batch (MAR uses the fixed 0.2325 of its KL-16 model); ``decode``
  divides by it. So the tokens a head models have unit spread.

The KL weight: LDM weights the KL by 1e-6 against a reconstruction loss
**summed** over the pixels of each image. Our trainer's reconstruction loss is
the **mean** squared error over pixel values (the learning rates of every
tokenizer are set for it), so the KL term is divided by the same count,
``C·H·W``: ``loss = MSE + kl_weight · KL_image / (C·H·W)``, and
``kl_weight`` keeps LDM's meaning (and its default, 1e-6). The sum makes the
weight per latent value follow the compression (LDM f8c4: 48 pixel values
per latent value; ``kl`` at 16 px, downsample 4, ``token_dim`` 4: 12). As in
LDM, the term is a light regulariser that costs no reconstruction. Measured
at 16 px ``shapes`` (downsample 2, ``token_dim`` 4, 1200 steps, 200
held-out images): ``kl_weight`` 1e-6 gives 37.65 dB and reconstructions
1.000 oracle-valid (tokens with added noise of std 0.3: 31.2 dB, 0.955);
1e-4 the same within noise; 1e-2 a smoother latent space at some PSNR
(35.9 dB, 0.995; with noise 0.3: 33.4 dB, 0.98).

Differs: the encoder/decoder is core's small conv net (no attention blocks,
no 1×1 ``quant_conv``: the encoder's last 1×1 conv already outputs the
moments); the loss is MSE (no perceptual or adversarial loss, no learned
output log-variance) — offline, on a CPU. MAR's training also encodes a
fresh posterior *draw* of each image every epoch; tokenloom's tokens are the
mean (the contract: a tokenizer's codes are deterministic).

``scales`` (e.g. ``[1, 2, 4]``, the last equal to the latent grid side):
FlowAR's **non-residual** multi-scale layout. Scale ``k`` is the (scaled)
latent **area-downsampled** to ``s_k × s_k`` (the finest scale is the latent
itself); the flat order is scale-major, row-major, each token ``D`` wide.
``decode`` takes all scales and decodes the finest. :meth:`scale_inputs`
(the core ``MultiScaleInputs`` protocol, for the next-scale order) is FlowAR's
teacher-forcing input: scale ``k − 1`` **bicubic-upsampled to the full latent
grid, then area-downsampled** to scale ``k``'s grid (FlowAR's
``interpolate(interpolate(x, (H, W), 'bicubic'), (s, s), 'area')``, the same
at sampling time), ``[B, L − s_0², D]``. One scale factor for all scales
(FlowAR uses the VAE's).
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F

import tokenloom
from tokenloom.autoencoder import AutoencoderConfig, ContinuousAutoencoderTokenizer, QuantOut

#: LDM's clamp of the posterior log-variance.
LOGVAR_RANGE = (-30.0, 20.0)
#: Training images the scale factor is measured on (the first ones).
SCALE_IMAGES = 256


def _scales_ok(_inst, attribute, value) -> None:
    if value is None:
        return
    if not value or any(int(s) < 1 for s in value) or list(value) != sorted(set(value)):
        raise ValueError(f"'scales' must be strictly increasing positive ints, got {list(value)}")


def _scales_converter(value):
    return None if value is None else tuple(int(s) for s in value)


class KLTokenizer(ContinuousAutoencoderTokenizer):
    """The KL autoencoder (see the module docstring)."""

    @attrs.frozen
    class Config(AutoencoderConfig):
        #: D: latent channels = width of a token
        token_dim: int = attrs.field(default=4, validator=[attrs.validators.ge(1), attrs.validators.le(256)])
        #: weight of the KL term against the reconstruction loss, both summed per image (LDM's 1e-6)
        kl_weight: float = attrs.field(default=1e-6, validator=attrs.validators.ge(0.0))
        #: multiply the tokens by 1 / std of the training images' posterior means (LDM, MAR)
        scale_latents: bool = True
        #: FlowAR's multi-scale layout: grid sides coarse -> fine, the last = the latent grid side
        scales: tuple[int, ...] | None = attrs.field(default=None, converter=_scales_converter,
                                                     validator=_scales_ok)

    def __init__(self, config: Config, *, image_shape: tuple[int, int, int]):
        D = config.token_dim
        super().__init__(config, image_shape=image_shape, latent_channels=2 * D, token_dim=D,
                         decoder_channels=D)
        h, w = self.grid
        if config.scales is None:
            self.layout = tokenloom.TokenLayout(scales=(self.grid,))
        else:
            if h != w:
                raise tokenloom.ConfigError(f"kl: scales need a square latent grid, got {h}×{w}")
            if config.scales[-1] != h:
                raise tokenloom.ConfigError(
                    f"kl: scales: the last scale must equal the latent grid side {h} (image side / "
                    f"downsample), got {list(config.scales)}")
            self.layout = tokenloom.TokenLayout(scales=tuple((s, s) for s in config.scales), residual=False)
        self.embed_dim = D  # MultiScaleInputs: width of a scale input
        #: the fitted scale factor (1 until fitted; saved with the weights)
        self.register_buffer("latent_scale", torch.ones(()))

    # -- the posterior ----------------------------------------------------------
    def posterior(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder output ``(B, 2D, h, w)`` -> ``(mean, logvar)``, each ``(B, D, h, w)``."""
        mean, logvar = z.chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def _tokens(self, latent: torch.Tensor) -> torch.Tensor:
        """Scaled latent ``(B, D, h, w)`` -> tokens ``[B, L, D]`` in the layout's flat order."""
        B, D = latent.shape[:2]
        parts = []
        for s_h, s_w in self.layout.scales:
            x = latent if (s_h, s_w) == tuple(latent.shape[-2:]) else F.interpolate(latent, size=(s_h, s_w),
                                                                                   mode="area")
            parts.append(x.permute(0, 2, 3, 1).reshape(B, s_h * s_w, D))
        return torch.cat(parts, 1) if len(parts) > 1 else parts[0]

    def quantize(self, z: torch.Tensor) -> QuantOut:  # z: (B, 2D, h, w)
        mean, logvar = self.posterior(z)
        codes = self._tokens(mean * self.latent_scale)
        if not self.training:
            return QuantOut(mean, codes, mean.new_zeros(()))
        std = torch.exp(0.5 * logvar)
        sample = mean + std * torch.randn_like(mean)  # the training draw (global RNG, seeded by the fit)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1).mean()  # per image
        pixels = float(self.image_shape[0] * self.image_shape[1] * self.image_shape[2])
        loss = self.config.kl_weight * kl / pixels
        return QuantOut(sample, codes, loss, {"kl": float(kl.detach()), "std": float(std.detach().mean())})

    def dequantize(self, latents: torch.Tensor) -> torch.Tensor:
        h, w = self.grid
        finest = latents[:, self.layout.scale_slices()[-1]]  # (B, h·w, D)
        return finest.reshape(-1, h, w, self.token_dim).permute(0, 3, 1, 2) / self.latent_scale

    # -- fitting ---------------------------------------------------------------
    def fit(self, images: torch.Tensor, *, steps: int | None = None, progress: bool = True,
            checkpoint=None, checkpoint_every: int = 100) -> dict[str, float]:
        """Train (see :class:`~tokenloom.autoencoder.AutoencoderTokenizer`), then fit the
        scale factor on the first :data:`SCALE_IMAGES` training images."""
        with torch.no_grad():
            self.latent_scale.fill_(1.0)
        stats = super().fit(images, steps=steps, progress=progress, checkpoint=checkpoint,
                            checkpoint_every=checkpoint_every)
        if self.config.scale_latents:
            self.eval()
            with torch.no_grad():
                x = self.check_images(images[:SCALE_IMAGES])
                means = self._per_image(lambda b: self.posterior(self.encoder(b))[0], x)
                std = float(means.double().std()) if means.numel() > 1 else 0.0
                if std > 1e-8:
                    self.latent_scale.fill_(1.0 / std)
        stats = dict(stats)
        stats["latent_scale"] = float(self.latent_scale)
        return stats

    # -- the next-scale inputs (tokenloom.MultiScaleInputs) -----------------------
    def scale_inputs(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B, L − s_0², D]``: for each scale after the first, the previous
        scale bicubic-upsampled to the latent grid and area-downsampled to this
        scale's grid (FlowAR), row-major. A single-scale layout gives ``[B, 0, D]``."""
        latents = self.check_tokens(latents, where=f"{type(self).__name__}.scale_inputs")
        B, D = latents.shape[0], self.token_dim
        h, w = self.grid
        scales, slices = self.layout.scales, self.layout.scale_slices()
        out = []
        for k in range(1, len(scales)):
            s_h, s_w = scales[k - 1]
            prev = latents[:, slices[k - 1]].reshape(B, s_h, s_w, D).permute(0, 3, 1, 2)
            up = prev if (s_h, s_w) == (h, w) else F.interpolate(prev, size=(h, w), mode="bicubic")
            nxt = up if tuple(scales[k]) == (h, w) else F.interpolate(up, size=tuple(scales[k]), mode="area")
            out.append(nxt.permute(0, 2, 3, 1).reshape(B, -1, D))
        return torch.cat(out, 1) if out else latents.new_zeros((B, 0, D))


@tokenloom.hookimpl
def register_tokenizers(register):
    register("kl", KLTokenizer)
