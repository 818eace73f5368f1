"""``top-p``: nucleus sampling (Holtzman et al. 2020, "The Curious Case of
Neural Text Degeneration", https://arxiv.org/abs/1904.09751).

Keeps the smallest set of most probable tokens whose total probability
reaches ``p``: token j stays iff the mass of tokens strictly more probable
than j is below p. Ties at the boundary are all kept (the set does not depend
on how ties happen to be ordered), the most probable token always stays, and
the kept mass is >= p. ``0 < p <= 1``.
"""

from __future__ import annotations

import attrs
import torch

import tokenloom
from tokenloom.sampling import filter_logits, mass_ranked_before


def _unit_interval(_inst, attribute, value):
    if not 0.0 < value <= 1.0:
        raise ValueError(f"must be in (0, 1], got {value}")


class TopP(tokenloom.Sampler):
    @attrs.frozen
    class Config:
        p: float = attrs.field(default=0.9, validator=_unit_interval)

    def depends_on_step(self) -> bool:
        return False

    def process(self, logits: torch.Tensor, info: tokenloom.StepInfo) -> torch.Tensor:
        probs = torch.softmax(logits.double(), dim=-1)
        before = mass_ranked_before(probs, -probs)
        keep = (before < self.config.p) & torch.isfinite(logits)
        return filter_logits(logits, keep)


@tokenloom.hookimpl
def register_samplers(register):
    register("top-p", TopP)
