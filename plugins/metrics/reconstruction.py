"""``reconstruction``: how faithfully the tokenizer's round trip
decode(encode(x)) reproduces real images — MSE, PSNR and rFID (the FID
between reconstructions and originals, as reported for VQGAN, Esser et al.
2021, https://arxiv.org/abs/2012.09841, and the tokenizers after it).

- ``mse``: mean squared error over all pixels and channels, on the [0, 1]
  scale (images in [-1, 1] are mapped by (x + 1) / 2);
- ``psnr``: the mean over images of 10·log10(1 / MSE_i) in dB on the same
  scale; a pixel-perfect image's MSE is floored at 1e-10 (100 dB) so the
  mean stays finite — the card says so;
- ``rfid``: FID of the reconstructions against the originals, computed by
  torch-fidelity with the same extractor options as ``fid`` (``rfid = false``
  skips it and reports None).

The reconstruction numbers bound what any generator can reach with this
tokenizer: a generated image is never better than its decoder.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import torch

import tokenloom
from tokenloom.fidelity import FidelityOptions, finite_or_none

MSE_FLOOR = 1e-10


class Reconstruction(tokenloom.Metric):
    requires = frozenset({"real", "reconstructed"})
    card_name = "reconstruction"

    @attrs.frozen
    class Config(FidelityOptions):
        rfid: bool = True

    def _static(self) -> dict[str, Any]:
        return {
            "mse": "mean over pixels and channels of ((x + 1)/2 - (y + 1)/2)^2",
            "psnr": f"mean over images of 10*log10(1/MSE_i) dB, MSE_i floored at {MSE_FLOOR:g}",
        }

    def compute(self, ctx: tokenloom.MetricContext) -> tokenloom.MetricResult:
        from tokenloom.fidelity import run_fidelity

        real, rec = ctx.real, ctx.reconstructed
        if real is None or rec is None:
            raise tokenloom.InputError("reconstruction: the context needs real and reconstructed images")
        if not (isinstance(real, torch.Tensor) and isinstance(rec, torch.Tensor)) or real.shape != rec.shape:
            raise tokenloom.InputError(
                f"reconstruction: real {tuple(getattr(real, 'shape', ()))} and reconstructed "
                f"{tuple(getattr(rec, 'shape', ()))} images must have the same shape [N, C, H, W]")
        if real.dim() != 4 or len(real) == 0:
            raise tokenloom.InputError(f"reconstruction: expected a non-empty [N, C, H, W] batch, got {tuple(real.shape)}")
        for name, t in (("real", real), ("reconstructed", rec)):
            tokenloom.check_images(t, tuple(t.shape[1:]), where=f"reconstruction: ctx.{name}")
        x = (real.detach().double().cpu() + 1) / 2  # (N, C, H, W) in [0, 1]
        y = (rec.detach().double().cpu() + 1) / 2
        per_image = ((x - y) ** 2).flatten(1).mean(1)  # (N,)
        mse = per_image.mean().item()
        psnr = (10 * torch.log10(1.0 / per_image.clamp_min(MSE_FLOOR))).mean().item()
        card = self.card(**self._static(), n=len(x), image_shape=list(real.shape[1:]))
        out: dict[str, float | None] = {"mse": mse, "psnr": psnr if math.isfinite(psnr) else None, "rfid": None}
        if self.config.rfid:
            result, fcard = run_fidelity({"fid": {}}, rec, real, self.config, ctx, metric="reconstruction",
                                         reference_name="real (originals of the reconstructions)")
            out["rfid"] = finite_or_none(result["frechet_inception_distance"])
            card["rfid"] = fcard
        return tokenloom.MetricResult(out, card)


@tokenloom.hookimpl
def register_metrics(register):
    register("reconstruction", Reconstruction)
