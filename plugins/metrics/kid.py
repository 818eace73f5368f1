"""``kid``: Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying
MMD GANs", https://arxiv.org/abs/1801.01401).

The unbiased MMD² estimate with the cubic polynomial kernel
k(x, y) = (xᵀy / d + 1)³ between extractor features of generated and
reference images, averaged over ``subsets`` random subsets of
``subset_size`` samples each (mean and standard deviation), computed by
``torch_fidelity.calculate_metrics``. Unlike FID it is unbiased in the
number of samples, so it suits small runs; values slightly below 0 are valid
(near-identical distributions). ``subset_size`` unset means
min(1000, #generated, #reference), and the card records the value used; a
``subset_size`` larger than either set is a clear error.
"""

from __future__ import annotations

import attrs

import tokenloom
from tokenloom.fidelity import FidelityOptions, finite_or_none


def _optional_at_least_2(_inst, _attr, value):
    if value is not None and value < 2:
        raise ValueError(f"must be >= 2 (or unset for min(1000, #samples)), got {value}")


class KID(tokenloom.Metric):
    requires = frozenset({"real", "generated"})

    @attrs.frozen
    class Config(FidelityOptions):
        subsets: int = attrs.field(default=100, validator=attrs.validators.ge(1))
        subset_size: int | None = attrs.field(default=None, validator=_optional_at_least_2)

    def compute(self, ctx: tokenloom.MetricContext) -> tokenloom.MetricResult:
        from tokenloom.fidelity import run_fidelity

        if ctx.generated is None:
            raise tokenloom.InputError("kid: the context has no generated images")
        extra = {"kid_subsets": self.config.subsets, "kid_subset_size": self.config.subset_size}
        result, card = run_fidelity({"kid": extra}, ctx.generated, ctx.real, self.config, ctx, metric="kid")
        return tokenloom.MetricResult({"kid": finite_or_none(result["kernel_inception_distance_mean"]),
                                       "kid_std": finite_or_none(result["kernel_inception_distance_std"])}, card)


@tokenloom.hookimpl
def register_metrics(register):
    register("kid", KID)
