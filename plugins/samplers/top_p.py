"""``top-p``: nucleus sampling (Holtzman et al. 2020, "The Curious Case of
Neural Text Degeneration", https://arxiv.org/abs/1904.09751).

Keeps the smallest set of most probable tokens whose total probability
reaches ``p``. The rule is Hugging Face transformers' ``TopPLogitsWarper``
(``generation/logits_process.py``): token j is removed iff the mass of the
tokens at most as probable as j (j included), summed from the least probable
up, is ``<= 1 - p`` — the same set as "the mass strictly more probable than j
is below p", but without the rounding of ``1 - tail`` near 1 that used to drop
a tail of tiny probabilities. ``p = 1`` keeps every token (transformers adds no
top-p warper at ``top_p = 1.0``; before this fix the entries whose preceding
mass rounded to 1.0 were dropped). Kept from the reference: the most probable
token always stays and the kept mass is >= p. Differs: ties at the boundary
are all kept (the set does not depend on how ties happen to be ordered;
transformers keeps whichever of the tied tokens its sort puts last), and the
mass is computed in float64. ``0 < p <= 1``.
"""

from __future__ import annotations

import attrs
import torch

import tokenloom
from tokenloom.sampling import filter_logits, mass_ranked_from


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
        if self.config.p >= 1.0:  # as transformers: no filter at top_p = 1.0
            return logits
        probs = torch.softmax(logits.double(), dim=-1)
        tail = mass_ranked_from(probs, -probs)  # mass at most as probable, least probable first
        keep = (tail > 1.0 - self.config.p) & torch.isfinite(logits)
        return filter_logits(logits, keep)


@tokenloom.hookimpl
def register_samplers(register):
    register("top-p", TopP)
