"""``min-p``: keep tokens whose probability is at least ``min_p`` times that
of the most probable token (Nguyen et al. 2024, "Turning Up the Heat: Min-p
Sampling for Creative and Coherent LLM Outputs", https://arxiv.org/abs/2407.01082).

``0 <= min_p <= 1``; 0 keeps every finite entry, 1 keeps the maximal ones.
"""

from __future__ import annotations

import attrs
import torch

import tokenloom
from tokenloom.sampling import filter_logits


def _unit_interval(_inst, attribute, value):
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"must be in [0, 1], got {value}")


class MinP(tokenloom.Sampler):
    @attrs.frozen
    class Config:
        min_p: float = attrs.field(default=0.05, validator=_unit_interval)

    def depends_on_step(self) -> bool:
        return False

    def process(self, logits: torch.Tensor, info: tokenloom.StepInfo) -> torch.Tensor:
        probs = torch.softmax(logits.double(), dim=-1)
        threshold = self.config.min_p * probs.max(dim=-1, keepdim=True).values
        keep = (probs >= threshold) & torch.isfinite(logits)
        return filter_logits(logits, keep)


@tokenloom.hookimpl
def register_samplers(register):
    register("min-p", MinP)
