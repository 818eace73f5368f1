"""``precision-recall``: improved precision and recall (Kynkäänniemi et al.
2019, "Improved Precision and Recall Metric for Assessing Generative
Models", https://arxiv.org/abs/1904.06991).

Each set's manifold is the union of balls around its feature vectors with
radius the distance to the k-th nearest neighbour (``neighborhood``, k = 3).
Precision: the fraction of generated images inside the reference manifold
(fidelity); recall: the fraction of reference images inside the generated
manifold (coverage); F-score their harmonic mean. Computed by
``torch_fidelity.calculate_metrics``; the paper used VGG-16 features
(``extractor = "vgg16"`` with a local weights file), tokenloom defaults to
its offline ``tokenloom-cnn``, and the card says which. Both sets need more
than k samples; with few samples, both numbers are noisy.
"""

from __future__ import annotations

import attrs

import tokenloom
from tokenloom.fidelity import FidelityOptions, finite_or_none


class PrecisionRecall(tokenloom.Metric):
    requires = frozenset({"real", "generated"})

    @attrs.frozen
    class Config(FidelityOptions):
        neighborhood: int = attrs.field(default=3, validator=attrs.validators.ge(1))

    def compute(self, ctx: tokenloom.MetricContext) -> tokenloom.MetricResult:
        from tokenloom.fidelity import run_fidelity

        if ctx.generated is None:
            raise tokenloom.InputError("precision-recall: the context has no generated images")
        result, card = run_fidelity(
            {"prc": {"prc_neighborhood": self.config.neighborhood}}, ctx.generated, ctx.real, self.config, ctx,
            metric="precision-recall")
        values = {"precision": finite_or_none(result["precision"]), "recall": finite_or_none(result["recall"]),
                  "f_score": finite_or_none(result["f_score"])}
        return tokenloom.MetricResult(values, card)


@tokenloom.hookimpl
def register_metrics(register):
    register("precision-recall", PrecisionRecall)
