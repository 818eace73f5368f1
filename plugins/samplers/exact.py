"""``exact``: the acceptance rule of speculative sampling (Leviathan, Kalman &
Matias 2023, "Fast Inference from Transformers via Speculative Decoding",
https://arxiv.org/abs/2211.17192; Chen et al. 2023).

A drafted token x~q is accepted when u < min(1, p(x)/q(x)); on rejection
the replacement is drawn from norm(max(p − q, 0)). Together they make the
output distributed exactly as p — here p and q are the *processed*
distributions (after the sampler chain), so exactness holds for what the user
asked for. The default rule of `speculative` and `sjd`.
"""

from __future__ import annotations

import attrs
import torch

import tokenloom
from tokenloom.sampling import speculative_residual


class Exact(tokenloom.AcceptanceRule):
    @attrs.frozen
    class Config:
        pass

    def accept(self, p: torch.Tensor, q: torch.Tensor, drafted: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        px = p.gather(-1, drafted[:, None]).squeeze(-1).double()
        qx = q.gather(-1, drafted[:, None]).squeeze(-1).double()
        return u.double() * qx < px  # u < min(1, p/q), without dividing by q

    def residual(self, p: torch.Tensor, q: torch.Tensor, drafted: torch.Tensor | None = None) -> torch.Tensor:
        return speculative_residual(p, q)


@tokenloom.hookimpl
def register_samplers(register):
    register("exact", Exact)
