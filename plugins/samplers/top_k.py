"""``top-k``: keep the k largest logits of each row (Fan, Lewis & Dauphin
2018, "Hierarchical Neural Story Generation").

Entries tied with the k-th largest value are kept too, so a row keeps at
least k finite entries (when it has them) and more only on ties. k >= V keeps
everything.
"""

from __future__ import annotations

import attrs
import torch

import tokenloom
from tokenloom.sampling import filter_logits


class TopK(tokenloom.Sampler):
    @attrs.frozen
    class Config:
        k: int = attrs.field(default=50, validator=attrs.validators.ge(1))

    def depends_on_step(self) -> bool:
        return False

    def process(self, logits: torch.Tensor, info: tokenloom.StepInfo) -> torch.Tensor:
        k = min(self.config.k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        return filter_logits(logits, logits >= kth)


@tokenloom.hookimpl
def register_samplers(register):
    register("top-k", TopK)
