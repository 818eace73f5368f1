"""``temperature``: divide logits by t (Ackley, Hinton & Sejnowski 1985;
the standard softmax temperature).

``t`` > 0; t = 1 is the identity, t -> 0 approaches ``greedy``. Optional
linear schedule over decoding steps: with ``end`` set, the temperature moves
linearly from ``t`` at the first step to ``end`` at the last
(``info.progress``), as used by MaskGIT-style and multi-scale decoders.

With a continuous head (``diffusion``, ``flow``) t scales the head's sampling noise instead
(MAR's temperature).
"""

from __future__ import annotations

import attrs
import torch

import tokenloom


def _positive(_inst, attribute, value):
    if value is not None and not value > 0:
        raise ValueError(f"must be > 0 (use the 'greedy' sampler for t -> 0), got {value}")


class Temperature(tokenloom.Sampler):
    transform = "rescale"
    continuous_ok = True

    @attrs.frozen
    class Config:
        t: float = attrs.field(default=1.0, validator=_positive)
        end: float | None = attrs.field(default=None, validator=_positive)

    def depends_on_step(self) -> bool:
        return self.config.end is not None

    def temperature(self, info: tokenloom.StepInfo) -> float:
        cfg = self.config
        if cfg.end is None:
            return cfg.t
        return cfg.t + (cfg.end - cfg.t) * info.progress

    def continuous_setting(self, info: tokenloom.StepInfo) -> dict[str, float]:
        """A continuous head scales its noise by t (MAR's temperature: the noise of every reverse
        diffusion step; the flow head: its initial noise)."""
        return {"temperature": self.temperature(info)}

    def process(self, logits: torch.Tensor, info: tokenloom.StepInfo) -> torch.Tensor:
        t = self.temperature(info)
        return logits.clone() if t == 1.0 else logits / t


@tokenloom.hookimpl
def register_samplers(register):
    register("temperature", Temperature)
