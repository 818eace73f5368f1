"""``cfg``: classifier-free guidance on logits (Ho & Salimans 2022,
"Classifier-Free Diffusion Guidance", https://arxiv.org/abs/2207.12598; for
autoregressive image models as in LlamaGen and VAR).

``guided = u + s · (c − u)`` with c the conditional and u the unconditional
(null-class) logits of the same step; the generator computes both in one
batched forward pass because this processor sets ``needs_uncond``.
s = 1 returns the conditional logits, s = 0 the unconditional ones.

Schedules of s over decoding progress p = step / (n_steps − 1):

- ``constant``: s;
- ``linear``: 1 + (s − 1)·p — no guidance at the first step, full at the
  last (VAR's ramp ``(1 + t)c − t·u`` with t growing over scales);
- ``interval``: s for p in [``start``, ``end``], 1 elsewhere (Kynkäänniemi
  et al. 2024, "Applying Guidance in a Limited Interval Improves Sample and
  Distribution Quality", https://arxiv.org/abs/2404.07724).

**Conventions.** ``scale`` is the guidance s itself (LlamaGen's
``cfg_scale``: ``u + s·(c − u)``), unless ``convention = "var"``: then
``scale`` is VAR's ``cfg`` t, and the guidance is 1 + t, as VAR writes it —
``(1 + t)·c − t·u`` with ``t = cfg · si / (K − 1)`` at scale si of K
(FoundationVision/VAR, ``models/var.py``, ``autoregressive_infer_cfg``; HMAR
and RAR keep that form). So VAR's ``cfg = 1.5`` is ``scale = 2.5,
schedule = "linear"`` here, or ``scale = 1.5, schedule = "linear",
convention = "var"``; copied as ``scale = 1.5`` alone it under-guides (s =
1.5, constant). With ``convention = "var"`` every schedule maps s = 1 +
(t at that step): ``constant`` 1 + t, ``linear`` 1 + t·p (VAR's ramp),
``interval`` 1 + t inside the interval.

**Continuous tokens** (a ``diffusion`` or ``flow`` head): the same scale and schedule guide the
head's prediction at every step of its own loop (MAR: the denoiser's ε), not logits.

Entries the conditional logits exclude (-inf) stay excluded; where only the
unconditional logits are -inf the conditional value is kept (the difference
is undefined there). Put ``cfg`` first in a chain (guidance → temperature →
top-k → ...).
"""

from __future__ import annotations

import attrs
import torch

import tokenloom


def _fraction(_inst, attribute, value):
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"must be in [0, 1], got {value}")


class CFG(tokenloom.Sampler):
    needs_uncond = True
    transform = "guide"
    continuous_ok = True

    @attrs.frozen
    class Config:
        scale: float = attrs.field(default=2.0, validator=attrs.validators.ge(0.0))
        schedule: str = attrs.field(default="constant",
                                    validator=attrs.validators.in_(("constant", "linear", "interval")))
        start: float = attrs.field(default=0.0, validator=_fraction)
        end: float = attrs.field(default=1.0, validator=_fraction)
        #: "s": scale is the guidance s (LlamaGen); "var": scale is VAR's cfg t, the guidance is 1 + t
        convention: str = attrs.field(default="s", validator=attrs.validators.in_(("s", "var")))

        def __attrs_post_init__(self) -> None:
            if self.end < self.start:
                raise ValueError(f"end ({self.end}) must be >= start ({self.start})")

    def depends_on_step(self) -> bool:
        return self.config.schedule != "constant"

    def scale_at(self, info: tokenloom.StepInfo) -> float:
        cfg, p = self.config, info.progress
        if cfg.convention == "var":  # VAR: (1 + t)·c − t·u, t = cfg·ratio
            t = cfg.scale * (p if cfg.schedule == "linear" else 1.0)
            if cfg.schedule == "interval" and not cfg.start <= p <= cfg.end:
                t = 0.0
            return 1.0 + t
        if cfg.schedule == "linear":
            return 1.0 + (cfg.scale - 1.0) * p
        if cfg.schedule == "interval":
            return cfg.scale if cfg.start <= p <= cfg.end else 1.0
        return cfg.scale

    def continuous_setting(self, info: tokenloom.StepInfo) -> dict[str, float]:
        """A continuous head (diffusion, flow) guides its own prediction with the scale at this
        step, ``u + s·(c − u)`` on the denoiser's ε or the flow's velocity (MAR's
        ``forward_with_cfg``); MAR's linear schedule over decoded tokens is ``schedule =
        "linear"`` with the order's ``info.fraction``."""
        return {"guidance": self.scale_at(info)}

    def process(self, logits: torch.Tensor, info: tokenloom.StepInfo) -> torch.Tensor:
        u = info.uncond_logits
        if u is None:
            raise tokenloom.InputError(
                f"cfg at step {info.step}: no unconditional logits (the generator must run the null-class "
                "rows when the chain needs_uncond)"
            )
        if u.shape != logits.shape:
            raise tokenloom.InputError(
                f"cfg at step {info.step}: uncond_logits {tuple(u.shape)} do not match logits {tuple(logits.shape)}"
            )
        s = self.scale_at(info)
        u = u.to(logits.dtype)
        both = torch.isfinite(logits) & torch.isfinite(u)
        # s·c + (1 − s)·u  ==  u + s·(c − u), exact at s = 1 (c) and s = 0 (u)
        guided = torch.where(both, s * logits + (1.0 - s) * torch.where(both, u, logits), logits)
        return guided


@tokenloom.hookimpl
def register_samplers(register):
    register("cfg", CFG)
