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

import attrs

import tokenloom


class Acceptance(tokenloom.Metric):
    requires = frozenset({"stats"})
    card_name = "acceptance"

    @attrs.frozen
    class Config:
        pass

    def compute(self, ctx: tokenloom.MetricContext) -> tokenloom.MetricResult:
        out = {"acceptance_rate": tokenloom.read_stat(ctx.stats, "acceptance_rate", metric="acceptance", upper=1.0),
               "mean_accepted_length": tokenloom.read_stat(ctx.stats, "mean_accepted_length", metric="acceptance"),
               "speedup_nfe": tokenloom.read_stat(ctx.stats, "speedup_nfe", metric="acceptance"),
               "speedup_wallclock": tokenloom.read_stat(ctx.stats, "speedup_wallclock", metric="acceptance")}
        return tokenloom.MetricResult(out, self.card(
            source="ctx.stats (the speculative decoding loop)",
            speculative=any(v is not None for v in out.values()), device=str(ctx.device)))


@tokenloom.hookimpl
def register_metrics(register):
    register("acceptance", Acceptance)
