"""``exact``: the acceptance rule of speculative sampling (Leviathan, Kalman &
Matias 2023, "Fast Inference from Transformers via Speculative Decoding",
https://arxiv.org/abs/2211.17192; Chen et al. 2023).

A drafted token x~q is accepted when u < min(1, p(x)/q(x)); on rejection
the replacement is drawn from norm(max(p − q, 0)). Together they make the
output distributed exactly as p — here p and q are the *processed*
distributions (after the sampler chain), so exactness holds for what the user
asked for. The default rule of `speculative` and `sjd`: the formula lives once,
in core's :class:`tokenloom.sampling.ExactRule` (what a chain without an
acceptance rule uses); this plugin gives it its name.
"""

from __future__ import annotations

import tokenloom
from tokenloom.sampling import ExactRule


class Exact(ExactRule):
    """Core's exact rule, registered as the sampler ``exact``."""


@tokenloom.hookimpl
def register_samplers(register):
    register("exact", Exact)
