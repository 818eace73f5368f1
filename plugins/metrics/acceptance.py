"""``acceptance``: how many drafted tokens speculative decoding keeps —
the acceptance rate and mean accepted length of speculative sampling
(Leviathan et al. 2023, https://arxiv.org/abs/2211.17192; Chen et al. 2023,
https://arxiv.org/abs/2302.01318), of speculative Jacobi decoding (Teng et
al. 2024, https://arxiv.org/abs/2410.01699) and of the relaxed rules
LANTERN and GSD.

Read from ``ctx.stats`` as recorded by the speculative decoding loop:

- ``acceptance_rate``: accepted drafted tokens / drafted tokens, in [0, 1];
- ``mean_accepted_length``: tokens committed per verification step;
- ``speedup_nfe``: codes per image / target forward passes per image — the
  speed-up in forward passes over next-token decoding of the same model;
- ``speedup_wallclock``: plain next-token seconds per image / speculative
  seconds per image, when the run timed the baseline (``baseline = true``).

Runs without speculative decoding have none of these keys and report None. The
rate depends on the acceptance rule and its relaxation (the sampler chain),
so compare it between cells with the same draft model and chain.
"""

from __future__ import annotations

import math
from typing import Any

import attrs

import tokenloom


def _stat(stats: Any, key: str, upper: float | None) -> float | None:
    if stats is None or stats.get(key) is None:
        return None
    value = stats[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)) \
            or value < 0 or (upper is not None and value > upper):
        bound = f" in [0, {upper:g}]" if upper is not None else " >= 0"
        raise tokenloom.InputError(f"acceptance: ctx.stats[{key!r}] must be a finite number{bound}, got {value!r}")
    return float(value)


class Acceptance(tokenloom.Metric):
    requires = frozenset({"stats"})

    @attrs.frozen
    class Config:
        pass

    def __init__(self, config: Config):
        super().__init__(config)
        self._card: dict[str, Any] | None = None

    def compute(self, ctx: tokenloom.MetricContext) -> dict[str, float | None]:
        out = {"acceptance_rate": _stat(ctx.stats, "acceptance_rate", 1.0),
               "mean_accepted_length": _stat(ctx.stats, "mean_accepted_length", None),
               "speedup_nfe": _stat(ctx.stats, "speedup_nfe", None),
               "speedup_wallclock": _stat(ctx.stats, "speedup_wallclock", None)}
        self._card = {"metric": "acceptance", "source": "ctx.stats (the speculative decoding loop)",
                      "speculative": any(v is not None for v in out.values()), "device": str(ctx.device)}
        return out

    def eval_card(self) -> dict[str, Any]:
        return self._card or {"metric": "acceptance", "source": "ctx.stats (the speculative decoding loop)",
                              "computed": False}


@tokenloom.hookimpl
def register_metrics(register):
    register("acceptance", Acceptance)
