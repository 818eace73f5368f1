"""``isc``: Inception Score (Salimans et al. 2016, "Improved Techniques for
Training GANs", https://arxiv.org/abs/1606.03498).

IS = exp(E_x KL(p(y|x) ‖ p(y))) over ``splits`` shuffled splits of the
generated images (mean and standard deviation across splits), computed by
``torch_fidelity.calculate_metrics`` on the extractor's class logits. It
needs an extractor with a classifier head: ``tokenloom-cnn`` (logits over the
built-in data sets' classes — so the score says how confidently and how
evenly generated images fall into *those* classes, bounded by their number)
or ``inception-v3-compat`` (the 1008 ImageNet logits of the papers). An
extractor without logits is a clear error, never a score on arbitrary
features. The number of splits and the shuffling seed are in the eval card.
"""

from __future__ import annotations

import attrs

import tokenloom
from tokenloom.fidelity import FidelityOptions, finite_or_none


class InceptionScore(tokenloom.Metric):
    requires = frozenset({"generated"})

    @attrs.frozen
    class Config(FidelityOptions):
        splits: int = attrs.field(default=10, validator=attrs.validators.ge(1))

    def compute(self, ctx: tokenloom.MetricContext) -> tokenloom.MetricResult:
        from tokenloom.fidelity import run_fidelity

        if ctx.generated is None:
            raise tokenloom.InputError("isc: the context has no generated images")
        result, card = run_fidelity(
            {"isc": {"isc_splits": self.config.splits}}, ctx.generated, None, self.config, ctx, metric="isc")
        return tokenloom.MetricResult({"isc": finite_or_none(result["inception_score_mean"]),
                                       "isc_std": finite_or_none(result["inception_score_std"])}, card)


@tokenloom.hookimpl
def register_metrics(register):
    register("isc", InceptionScore)
