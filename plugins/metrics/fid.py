"""``fid``: Fréchet Inception Distance (Heusel et al. 2017, "GANs Trained by
a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium",
https://arxiv.org/abs/1706.08500).

FID = ‖μ_g − μ_r‖² + Tr(Σ_g + Σ_r − 2 (Σ_g Σ_r)^½) between Gaussians fitted to
extractor features of generated and reference images, computed by
``torch_fidelity.calculate_metrics`` (never re-implemented here). The
extractor, its weights hash, the reference set and its size, the number of
generated samples and every torch-fidelity option go into the eval card
(see :mod:`tokenloom.fidelity`). The reference is the run's real images, or
``reference_stats``: an ``.npz`` with ``mu`` and ``sigma`` as the ADM
evaluation suite ships them (those are Inception pool3 statistics, so they
need ``extractor = "inception-v3-compat"``). FID is biased in the number of
samples: compare numbers only at equal sample counts (the card records them).
"""

from __future__ import annotations

import attrs

import tokenloom
from tokenloom.fidelity import FidelityOptions, finite_or_none


class FID(tokenloom.Metric):
    requires = frozenset({"real", "generated"})

    @attrs.frozen
    class Config(FidelityOptions):
        reference_stats: str | None = None

    def __init__(self, config: Config):
        super().__init__(config)
        if config.reference_stats is not None:
            self.requires = frozenset({"generated"})

    def compute(self, ctx: tokenloom.MetricContext) -> tokenloom.MetricResult:
        from tokenloom.fidelity import run_fidelity

        if ctx.generated is None:
            raise tokenloom.InputError("fid: the context has no generated images")
        result, card = run_fidelity(
            {"fid": {}}, ctx.generated, ctx.real, self.config, ctx, metric="fid",
            reference_stats=self.config.reference_stats,
        )
        return tokenloom.MetricResult({"fid": finite_or_none(result["frechet_inception_distance"])}, card)


@tokenloom.hookimpl
def register_metrics(register):
    register("fid", FID)
