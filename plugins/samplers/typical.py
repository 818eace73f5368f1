"""``typical``: locally typical sampling (Meister et al. 2023, "Locally
Typical Sampling", https://arxiv.org/abs/2202.00666).

With p = softmax(logits) and the entropy H = -sum p log p, tokens are ranked
by how far their surprisal is from H, |-log p - H|; the smallest set in that
order whose mass reaches ``mass`` (the paper's tau) is kept: token j stays iff
the mass of tokens strictly closer to H is below ``mass``. The token closest
to H always stays. ``0 < mass <= 1``.

Reference: Hugging Face transformers' ``TypicalLogitsWarper``
(``generation/logits_process.py``), whose rule for ``mass < 1`` is the same
(it keeps the sorted prefix up to the first entry whose cumulative mass
reaches ``mass``, and every entry tied with that one). ``mass = 1`` keeps
every token, as transformers does (it adds no typical warper at
``typical_p = 1.0``); before this fix the entries whose preceding mass rounded
to 1.0 were dropped. Differs: only in that the mass is computed in float64.
"""

from __future__ import annotations

import attrs
import torch

import tokenloom
from tokenloom.sampling import filter_logits, mass_ranked_before


def _unit_interval(_inst, attribute, value):
    if not 0.0 < value <= 1.0:
        raise ValueError(f"must be in (0, 1], got {value}")


class Typical(tokenloom.Sampler):
    transform = "select"  # the most probable token may be atypical

    @attrs.frozen
    class Config:
        mass: float = attrs.field(default=0.9, validator=_unit_interval)

    def depends_on_step(self) -> bool:
        return False

    def process(self, logits: torch.Tensor, info: tokenloom.StepInfo) -> torch.Tensor:
        if self.config.mass >= 1.0:  # as transformers: no filter at typical_p = 1.0
            return logits
        logp = torch.log_softmax(logits.double(), dim=-1)
        finite = torch.isfinite(logits)
        p = logp.exp()
        entropy = -(torch.where(finite, p * logp, torch.zeros_like(p))).sum(-1, keepdim=True)
        score = torch.where(finite, (-logp - entropy).abs(), torch.full_like(p, float("inf")))
        before = mass_ranked_before(p, score)
        keep = (before < self.config.mass) & finite
        return filter_logits(logits, keep)


@tokenloom.hookimpl
def register_samplers(register):
    register("typical", Typical)
