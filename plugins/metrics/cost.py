"""``cost``: what a run spent, as measured by core's instrumented backbone —
the cost axis of every quality-versus-speed comparison (number of function
evaluations as in the parallel-decoding papers, e.g. MaskGIT, Chang et al.
2022, https://arxiv.org/abs/2202.04200; latency and throughput as in VAR,
Tian et al. 2024, https://arxiv.org/abs/2404.02905).

Read from ``ctx.stats`` (never measured or estimated here; plugins do not
report their own cost):

- ``nfe``: forward passes of the backbone per generated batch;
- ``seconds_per_image``: wall-clock generation time per image;
- ``tokens_per_second``: generated tokens per second;
- ``peak_memory_bytes``: peak accelerator (or process) memory while generating;
- ``kv_cache_bytes``: size of the key/value cache at its largest;
- ``train_tokens`` / ``train_flops``: tokens seen and FLOPs spent training
  the backbone (its head included);
- a continuous head (diffusion, flow), counted apart from the backbone:
  ``head_steps`` (sequential head steps per generated batch, as ``nfe``),
  ``head_steps_per_token``, ``head_flops_per_image`` (sampling) and
  ``train_head_flops`` (the head's share of ``train_flops``), and beside them
  ``backbone_flops_per_image`` (2 × non-embedding weights per token scored)
  — None for the categorical head.

A key the run did not record is reported as None, never invented. Time and
memory depend on the device, so the card records it: compare them only
between cells whose cards match.
"""

from __future__ import annotations

import attrs

import tokenloom

KEYS: dict[str, str] = {
    "nfe": "backbone forward passes per generated batch",
    "seconds_per_image": "wall-clock generation seconds per image",
    "tokens_per_second": "generated tokens per second",
    "peak_memory_bytes": "peak memory while generating (bytes)",
    "kv_cache_bytes": "largest key/value cache (bytes)",
    "train_tokens": "tokens seen while training the backbone",
    "train_flops": "FLOPs spent training the backbone",
    "head_steps": "continuous head steps per generated batch (apart from nfe)",
    "head_steps_per_token": "continuous head evaluations per sampled token",
    "head_flops_per_image": "FLOPs of the continuous head per generated image",
    "train_head_flops": "FLOPs of the continuous head in training (part of train_flops)",
    "backbone_flops_per_image": "backbone forward FLOPs per generated image (runs with a continuous head)",
}


class Cost(tokenloom.Metric):
    requires = frozenset({"stats"})
    card_name = "cost"

    @attrs.frozen
    class Config:
        pass

    def compute(self, ctx: tokenloom.MetricContext) -> tokenloom.MetricResult:
        out = {k: tokenloom.read_stat(ctx.stats, k, metric="cost") for k in KEYS}
        return tokenloom.MetricResult(out, self.card(
            source="ctx.stats (core's instrumented backbone)", keys=KEYS, device=str(ctx.device),
            recorded=sorted(k for k, v in out.items() if v is not None)))


@tokenloom.hookimpl
def register_metrics(register):
    register("cost", Cost)
