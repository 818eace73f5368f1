"""``random-parallel``: RandAR's parallel decoding (Pang et al. 2025,
"RandAR: Decoder-only Autoregressive Visual Generation in Random Orders",
https://arxiv.org/abs/2412.01827, §3.3 and the reference code).

**Training.** None of its own: ``model_spec()`` and ``training_batch()``
are exactly ``random``'s (a position-instruction token before every image
token, ``[cls, p_π0, x_π0, p_π1, x_π1, ...]``, random orders), so the
pipeline trains one model for both orders.

**Decoding.** A random order π per image (from the image's own random
stream). A step queries several positions at once: it feeds one
position-instruction token per position, and samples every queried token in
the same pass. How many tokens step s decodes follows RandAR's cosine
schedule over ``steps`` steps — after step s about
``(1 − cos(π/2 · (s+1)/steps)) · L + 1`` tokens are done (few tokens early,
many late; at least one per step). The next step feeds the sampled tokens
back *interleaved with their instructions*, ``[x_a, p_b, x_b, ..., p_k, x_k,
q_1, ..., q_m]`` (the first instruction ``p_a`` is kept from the step that
queried it), followed by the new queries, so the cache holds exactly the
training sequence ``… p_a, x_a, p_b, x_b …``. The reference code rewrites
the stale instruction entries in its KV cache; here the cache is
append-only and the stale entries are hidden by an explicit mask. One
deliberate difference: a query attends to the context and itself but not
to the other queries of its step (in the reference they attend causally to
one another), which is exactly the context the model was trained with.

NFE = ``steps`` (2 ≤ steps < L: the first step always decodes one token,
so one pass cannot finish an image; L/k passes on average for k tokens per
pass); ``steps ≥ L`` decodes one token per pass (sequential RandAR, the
``random`` order's decoding).
Classifier-free guidance rows share each pass.

No exact likelihood is reported for the parallel sampler (the model's
likelihood is ``random``'s).

**Guidance progress.** RandAR ramps its CFG scale by the fraction of tokens
decoded before the pass (``randar_gpt.py``, ``generate``:
``query_token_idx_cur_step / block_size``), not by the pass index; under the
cosine schedule the two differ a lot (few tokens in early passes). Since the
issue-18 fix ``progress = "decoded"`` (the default) hands the samplers
``StepInfo.fraction`` = tokens decoded so far / L, which is their
``progress``, so a ``linear`` CFG schedule is RandAR's ramp;
``progress = "pass"`` restores the ramp by pass (``step / (steps − 1)``).
``step`` stays the pass index and keys the draws either way. As in
``random``, ``rotate_instruction = true`` rotates the instruction embedding
itself by the RoPE of its target position, as RandAR's reference (off by
default; see there).
"""

from __future__ import annotations

import math

import attrs
import torch

import tokenloom
from tokenloom.orders import (
    MaskedCache,
    guidance_rows,
    instruction_sequence,
    instruction_spec,
    refuse_known,
    sample_codes,
)

_ORDER_STREAM = 11  # RowRNG stream of the per-image decoding order (as in `random`)


def cosine_schedule(L: int, steps: int) -> list[int]:
    """Tokens decoded per step under RandAR's cosine schedule (a port of
    ``calculate_num_query_tokens_for_parallel_decoding``): step 0 decodes
    one token; after step s, ``int((1 − cos(π/2·(s+1)/steps))·L + 1)``
    tokens are the target, at least one more per step, never past L."""
    sizes, done, k = [], 0, 1
    step = 0
    while done < L:
        sizes.append(k)
        done += k
        step += 1
        target = min(int((1.0 - math.cos(math.pi / 2.0 * (step + 1) / steps)) * L + 1), L)
        k = min(max(target - done, 1), L - done)
    return sizes


class RandomParallelGenerator(tokenloom.Generator):
    exact_likelihood = False

    @attrs.frozen
    class Config:
        steps: int = attrs.field(default=16, validator=attrs.validators.ge(2))
        #: what the samplers' progress measures: "decoded" (RandAR: tokens decoded / L) or "pass"
        progress: str = attrs.field(default="decoded", validator=attrs.validators.in_(("decoded", "pass")))
        #: rotate the position instruction's input embedding by the 2-D RoPE of the position it asks
        #: for, as RandAR's reference (get_position_instruction_tokens); needs [model] pos = "rope2d".
        #: Off by default (results of existing runs unchanged); part of the model spec, so set it
        #: alike on ``random`` and ``random-parallel`` to share one model
        rotate_instruction: bool = False

    def __init__(self, config: Config, *, tokenizer: tokenloom.Tokenizer):
        super().__init__(config, tokenizer=tokenizer)
        self.L = tokenizer.layout.length
        self.V = tokenizer.vocab_size
        self.instruction = self.V

    # -- the random-order model -----------------------------------------------

    def model_spec(self) -> tokenloom.ModelSpec:
        return instruction_spec(self.tokenizer, rotate=self.config.rotate_instruction)  # identical to random's: the model is shared

    def training_batch(self, codes: torch.Tensor, cond: torch.Tensor) -> tokenloom.TrainBatch:
        codes = tokenloom.check_codes(codes, self.L, self.V, where="random-parallel.training_batch: codes")
        order = torch.rand(codes.shape[0], self.L).argsort(-1).to(codes.device)  # the same draws as `random`
        batch = instruction_sequence(codes, order, self.instruction)
        batch.cond = cond.long()
        return batch

    # -- parallel decoding ------------------------------------------------------

    def step_sizes(self) -> list[int]:
        if self.config.steps >= self.L:
            return [1] * self.L  # one token per pass: sequential RandAR
        return cosine_schedule(self.L, self.config.steps)

    def expected_nfe(self) -> int:
        return len(self.step_sizes())

    def generate(self, model, chain, cond, *, rng, known=None) -> torch.Tensor:
        refuse_known("random-parallel", known, instead="'random' to inpaint")
        B, dev, L = cond.shape[0], model.device, self.L
        cond = cond.to(dev).long()
        rows, guided = guidance_rows(cond, chain, model)
        R, reps = rows.shape[0], (2 if guided else 1)
        order = rng.uniform(0, L, stream=_ORDER_STREAM).to(dev).argsort(-1)  # (B, L), as `random` draws it
        order_r = order.repeat(reps, 1)
        sizes = self.step_sizes()
        mc = MaskedCache(model, R, 1 + 2 * L + L)
        codes = torch.zeros(B, L, dtype=torch.long, device=dev)
        done = 0
        prev: list[int] = []  # cache slots of the last step's queries
        for step, k in enumerate(sizes):
            ids, pos, kinds = [], [], []
            if step == 0:
                ids.append(torch.zeros(R, dtype=torch.long, device=dev))
                pos.append(torch.full((R,), tokenloom.NO_POSITION, device=dev))
                kinds.append("cls")
            else:  # [x_a, p_b, x_b, ..., p_k, x_k]: the last step's tokens with their instructions
                first = done - len(prev)
                for j in range(len(prev)):
                    t = first + j
                    if j > 0:
                        ids.append(torch.full((R,), self.instruction, dtype=torch.long, device=dev))
                        pos.append(order_r[:, t])
                        kinds.append("p")
                    ids.append(codes.gather(1, order[:, t : t + 1])[:, 0].repeat(reps))
                    pos.append(order_r[:, t])
                    kinds.append("x")
                for slot in prev[1:]:
                    mc.invalidate(slot)  # stale instructions, re-fed above after their predecessors
            n_ctx = len(ids)
            for t in range(done, done + k):  # the queries of this step
                ids.append(torch.full((R,), self.instruction, dtype=torch.long, device=dev))
                pos.append(order_r[:, t])
                kinds.append("q")
            slots = mc.append([0] * len(ids))
            T, S = len(ids), len(mc)
            valid = torch.tensor(mc.valid, dtype=torch.bool, device=dev)
            mask = valid[None, :].repeat(T, 1)  # (T, S)
            new = torch.arange(S - T, S, device=dev)
            causal = new[None, :] <= new[:, None]  # among the inputs of this pass
            query = torch.tensor([c == "q" for c in kinds], device=dev)
            causal[:, query] &= torch.eye(T, dtype=torch.bool, device=dev)[:, query]  # queries: only themselves
            mask[:, S - T :] &= causal
            x = torch.stack(ids, 1)
            p = torch.stack(pos, 1)
            logits = model(x, rows, positions=p, attn_mask=mask, cache=mc.cache)[:, n_ctx:]  # (R, k, V)
            where = order[:, done : done + k]  # (B, k)
            if self.config.progress == "decoded":  # RandAR: the ramp by the fraction of tokens decoded
                info = tokenloom.StepInfo(step=step, n_steps=len(sizes), positions=where, fraction=done / L,
                                          uncond_logits=logits[B:] if guided else None)
                new_codes = chain.sample(logits[:B], info, rng)
            else:
                new_codes = sample_codes(chain, logits, rng, B=B, guided=guided, step=step, n_steps=len(sizes),
                                         positions=where)
            codes.scatter_(1, where, new_codes)
            prev = slots[n_ctx:]
            done += k
        return codes


@tokenloom.hookimpl
def register_generators(register):
    register("random-parallel", RandomParallelGenerator)
