"""``greedy``: always take the most probable token (argmax).

Keeps only the first maximal entry of each row (every other entry becomes
``-inf``) and marks the chain greedy, so core's final draw is an argmax.
The limit of ``temperature`` as t -> 0.
"""

from __future__ import annotations

import attrs
import torch

import tokenloom
from tokenloom.sampling import filter_logits


class Greedy(tokenloom.Sampler):
    greedy = True

    @attrs.frozen
    class Config:
        pass

    def depends_on_step(self) -> bool:
        return False

    def process(self, logits: torch.Tensor, info: tokenloom.StepInfo) -> torch.Tensor:
        keep = torch.zeros_like(logits, dtype=torch.bool)
        keep.scatter_(-1, logits.argmax(-1, keepdim=True), True)
        return filter_logits(logits, keep)


@tokenloom.hookimpl
def register_samplers(register):
    register("greedy", Greedy)
