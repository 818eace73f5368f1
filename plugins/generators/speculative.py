"""``speculative``: draft-model speculative decoding — Leviathan, Kalman &
Matias 2023, "Fast Inference from Transformers via Speculative Decoding",
https://arxiv.org/abs/2211.17192, and Chen et al. 2023, "Accelerating Large
Language Model Decoding with Speculative Sampling",
https://arxiv.org/abs/2302.01318 — on a raster (LlamaGen-style) target.

A smaller **draft model** — a second raster model with its own ``[model]``
size (``draft_n_layer``, ``draft_d_model``, ``draft_n_head``), trained by
the same pipeline on the same tokens with the same recipe — proposes
``gamma`` tokens one by one (``gamma`` cheap forward passes); the target
scores all of them in **one** forward pass. Drafts are judged left to right
with u < min(1, p(x)/q(x)), the first rejected one is redrawn from
norm(max(p − q, 0)), and when all ``gamma`` are accepted the target's next
distribution gives a bonus token: 1 to ``gamma + 1`` tokens per target pass,
and the output is distributed exactly as raster sampling from the target —
``p`` and ``q`` being the distributions after the run's sampler chain. An
acceptance rule in the chain (``lantern``, ``gsd``) replaces the exact one.
This is a *chain* of ``gamma`` drafts from a separately trained small model;
it is not LANTERN's setting: LANTERN's code (jadohu/LANTERN,
``models/ea_model_llamagen.py``, ``models/drafters/cnets_llamagen.py``;
``--model_type eagle``) drafts with an EAGLE-2 head — one decoder layer
reading the target's own hidden features — that proposes a dynamic *tree* of
candidates verified in one target pass, and measures its relaxed acceptance
against that EAGLE-2 baseline. Here LANTERN's rule is applied to chain drafts
(and to ``sjd``'s Jacobi drafts), so acceptance lengths and speed-ups are not
comparable with the paper's figures; tree drafting is not implemented.

Each image advances by its own accepted length (per-row KV-cache rollback
for both models, per-image randomness from the run's RowRNG at (round,
stream)), so image *i* never depends on its batch neighbours; finished
images leave the batch. The target's forward passes are counted by the
instrumented model the generator is handed; the draft's are reported as
``draft_nfe_per_image`` in :meth:`stats`.

**The draft model.** The pipeline asks :meth:`auxiliary_models` for the
models this order needs besides the target, trains each through the same
training path (this generator's teacher-forcing batches, the run's
``[train]`` settings, ``draft_steps`` steps if set), and hands them over
with :meth:`attach_models`; outside a pipeline, attach one yourself
(``gen.attach_models({"draft": model})``).
"""

from __future__ import annotations

from typing import Any

import attrs
import torch

import tokenloom
from tokenloom import speculative as spec
from tokenloom.config import ModelConfig


def _positive_or_none(_inst, attribute, value):
    if value is not None and value < 1:
        raise ValueError(f"must be >= 1, got {value}")


class SpeculativeGenerator(spec.SpeculativeOrder):
    """The raster target, its likelihood, the statistics and the timing come
    from :class:`tokenloom.speculative.SpeculativeOrder`; this is the draft
    model and the draft-then-verify loop."""

    name = "speculative"

    @attrs.frozen
    class Config:
        gamma: int = attrs.field(default=4, validator=attrs.validators.ge(1))
        draft_n_layer: int = attrs.field(default=1, validator=attrs.validators.ge(1))
        draft_d_model: int = attrs.field(default=64, validator=attrs.validators.ge(1))
        draft_n_head: int = attrs.field(default=2, validator=attrs.validators.ge(1))
        draft_steps: int | None = attrs.field(default=None, validator=_positive_or_none)
        baseline: bool = False  # also time plain next-token decoding: speedup_wallclock

        def __attrs_post_init__(self) -> None:
            if self.draft_d_model % self.draft_n_head:
                raise ValueError(f"draft_d_model ({self.draft_d_model}) must be divisible by "
                                 f"draft_n_head ({self.draft_n_head})")

    def __init__(self, config: Config, *, tokenizer: tokenloom.Tokenizer):
        super().__init__(config, tokenizer=tokenizer)
        self.draft: Any = None

    # -- the draft model -------------------------------------------------------

    def auxiliary_models(self, model: ModelConfig) -> dict[str, ModelConfig]:
        """The models this order needs besides the target, by name, with
        their ``[model]`` configs: one ``"draft"``, of the same spec and
        recipe as the target (the target's dropout and position kind, the
        draft's own size)."""
        c = self.config
        return {"draft": attrs.evolve(model, n_layer=c.draft_n_layer, d_model=c.draft_d_model,
                                      n_head=c.draft_n_head)}

    def auxiliary_train_steps(self, name: str, steps: int) -> int:
        """Training steps for auxiliary model ``name`` given the run's
        ``[train].steps``."""
        return self.config.draft_steps or steps

    def attach_models(self, models: dict[str, Any]) -> None:
        """Hand over the trained auxiliary models (instrumented backbones)."""
        if "draft" not in models:
            raise tokenloom.InputError(f"speculative: attach_models needs a 'draft' model, got {sorted(models)}")
        draft = models["draft"]
        if draft.spec.vocab_size != self.V or draft.spec.heads != (self.V,):
            raise tokenloom.InputError(
                f"speculative: the draft model's vocabulary {draft.spec.vocab_size} does not match the tokenizer's {self.V}")
        self.draft = draft

    # -- decoding --------------------------------------------------------------

    def decode(self, model, chain, cond, rng) -> torch.Tensor:
        if self.draft is None:
            raise tokenloom.InputError(
                "speculative: no draft model attached (the pipeline trains one from auxiliary_models(); "
                "outside a pipeline call attach_models({'draft': model}))")
        return self._decode(model, self.draft, chain, cond, rng)

    def _forward(self, model, cache, inputs, slots, cond_rows, guided: bool):
        """One pass of ``inputs`` ``[k, T]`` at sequence indices ``slots``;
        returns (cond logits, uncond logits or None), each ``[k, T, V]``."""
        positions = (slots - 1).clamp(max=self.L - 1)
        if guided:
            inputs, positions = inputs.repeat(2, 1), positions.repeat(2, 1)
        logits = model(inputs, cond_rows, cache=cache, positions=positions)
        k = slots.shape[0]
        return logits[:k], (logits[k:] if guided else None)

    def _decode(self, target, draft, chain: tokenloom.Chain, cond: torch.Tensor, rng: tokenloom.RNG) -> torch.Tensor:
        rule = spec.acceptance_rule(chain)
        L, V, dev, G = self.L, self.V, target.device, self.config.gamma
        B = cond.shape[0]
        cond = cond.to(dev).long()
        guided = chain.needs_uncond
        out = torch.zeros(B, L, dtype=torch.long, device=dev)
        rows_of = lambda c: torch.cat([c, torch.full_like(c, target.null_class)]) if guided else c

        idx = torch.arange(B, device=dev)
        codes = torch.zeros(B, L, dtype=torch.long, device=dev)
        n = torch.zeros(B, dtype=torch.long, device=dev)
        R = 2 * B if guided else B
        tcache = target.new_cache(R, L + G + 2)
        dcache = draft.new_cache(R, L + G + 2)
        rnd = 0
        while idx.numel():
            rnd += 1
            k = idx.numel()
            sub = rng.subset(idx.cpu()) if k != B else rng
            crow = rows_of(cond[idx])
            rows = torch.arange(k, device=dev)
            prev = codes[rows, (n - 1).clamp(min=0)]  # x_{n-1} (the class slot at n = 0)

            # draft gamma tokens, one pass each
            if rnd == 1:  # every row starts at the class token
                inputs, slots = prev[:, None], n[:, None]
            else:  # re-feed x_{n-2} so the draft cache also holds the last accepted draft
                dcache.truncate(torch.cat([n - 1, n - 1]) if guided else n - 1)
                inputs = torch.stack([codes[rows, (n - 2).clamp(min=0)], prev], 1)
                slots = torch.stack([n - 1, n], 1)
            noise = spec.Noise(sub, rnd, {"draft": (G, V), "accept": (G,), "next": (V,)}, dev)
            g_draft = noise.gumbel("draft")
            drafts = torch.zeros(k, G, dtype=torch.long, device=dev)
            q = torch.zeros(k, G, V, dtype=torch.float64, device=dev)
            for j in range(G):
                lc, lu = self._forward(draft, dcache, inputs, slots, crow, guided)
                processed = spec.process_window(chain, lc[:, -1:], (n + j)[:, None], L,
                                                lu[:, -1:] if lu is not None else None)  # (k, 1, V)
                q[:, j] = spec.to_probs(chain, processed)[:, 0]
                drafts[:, j] = spec.draw(chain, processed[:, 0], g_draft[:, j])
                inputs, slots = drafts[:, j : j + 1], (n + j + 1)[:, None]

            # the target scores [x_{n-1}, d_0 .. d_{G-1}] in one pass
            slots = n[:, None] + torch.arange(G + 1, device=dev)
            lc, lu = self._forward(target, tcache, torch.cat([prev[:, None], drafts], 1), slots, crow, guided)
            p = spec.to_probs(chain, spec.process_window(chain, lc, slots, L, lu))  # (k, G+1, V)

            n_valid = (L - n).clamp(max=G)
            a, nxt, rejected = spec.verify(rule, chain, p, q, drafts, n_valid, noise.uniform("accept"),
                                           noise.gumbel("next"))
            new_n = (n + a + 1).clamp(max=L)
            self._stats.record(accepted=a, rejected=rejected, committed=new_n - n, drafted=n_valid,
                               draft_passes=G)
            kr, kj = (torch.arange(G, device=dev)[None, :] < a[:, None]).nonzero(as_tuple=True)
            codes[kr, n[kr] + kj] = drafts[kr, kj]
            put = (n + a) < L
            codes[rows[put], (n + a)[put]] = nxt[put]
            n = new_n
            tcache.truncate(torch.cat([n, n]) if guided else n)

            done = n >= L
            if done.any():
                out[idx[done]] = codes[done]
                live = (~done).nonzero().flatten()
                idx, codes, n = idx[live], codes[live], n[live]
                if idx.numel():
                    keep = torch.cat([live, live + k]) if guided else live
                    tcache.select_rows(keep)
                    dcache.select_rows(keep)
        return out


@tokenloom.hookimpl
def register_generators(register):
    register("speculative", SpeculativeGenerator)
