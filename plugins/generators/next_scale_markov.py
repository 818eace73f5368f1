"""``next-scale-markov``: Markovian next-scale prediction with masked
generation inside each scale — HMAR (Kumbong et al. 2025, "HMAR: Efficient
Hierarchical Masked Auto-Regressive Image Generation",
https://arxiv.org/abs/2506.04421).

Needs a multi-scale tokenizer with VAR's teacher-forcing inputs (the core
:class:`tokenloom.MultiScaleInputs` protocol: ``multiscale``).

HMAR's changes to VAR, and what is kept of the authors' released code
(NVlabs/HMAR, ``models/hmar.py``: ``HMAR.generate``, ``get_mask_logits``;
``utils/sampling_arg_util.py``: ``mask_schedule``):

- **Markov over scales** (kept). Scale k is predicted from the
  reconstruction of scales < k alone — the tokenizer's accumulated f̂,
  downsampled to scale k's grid, which already summarises every earlier
  scale — not from the earlier scales' tokens: p(x) = Π_k p(r_k | f̂_{<k}).
  The attention mask is **block-diagonal**: a scale's tokens attend to their
  own scale's inputs (and the class token, which carries the class condition
  to every scale), never to another scale.
- **Masked refinement inside some scales** (kept). Scale k is first sampled
  whole in one next-scale pass (every token hidden, as VAR); then, on the
  scales the schedule masks, the least probable of the sampled tokens are
  hidden again and re-predicted from the rest over further passes. The
  schedule is ``tokens_per_step``: per scale, how many tokens each pass
  settles (the first entry: the next-scale pass). The default is the
  reference's released schedule, ``[[1], [1, 3], [1, 1, 2, 5], [16], ...]``
  on VAR's 10 scales — only the second and third scales are refined (in 2
  and 4 passes), every other scale takes one pass: NFE = K + 4 against VAR's
  K. On other scale sets the reference's split is applied by fraction (scale
  1: 1/4 then 3/4; scale 2: 1/9, 1/9, 2/9, 5/9 of its tokens, rounded; the
  rest one pass). ``steps = n`` instead gives every scale ``min(n, n_k)``
  MaskGIT cosine passes (the schedule before the issue-18 fix: 21 passes
  against VAR's 6 on the default tokenizer).
- **Re-masking by plain probability** (kept, ``remask = "probability"``):
  after each pass the hidden tokens with the lowest probability of their
  sampled code are hidden again, no noise added (the reference ranks
  ``softmax(logits)[sampled]``). ``remask = "gumbel"`` ranks MaskGIT's
  ``log p + τ·(1 − r)·Gumbel`` instead (``choice_temperature`` τ; the
  behaviour before the fix).
- **A separate mask head** (kept, ``mask_head = true``): the next-scale
  pass reads output head 0, the refinement passes head 1 (the spec declares
  two heads). As in the reference, the mask path has its own copy of the
  last blocks, its own output norm and its own output layer (``hmar.py``:
  ``base_blocks``, then ``ns_blocks`` + ``ns_head_nm`` + ``ns_head`` for
  next-scale and ``mask_blocks`` + ``mask_head_nm`` + ``mask_head`` for the
  mask path): the backbone's spec option ``("head_branch", (0,
  mask_blocks))``. The reference copies the last ``n_layers_train = 8``
  blocks at every depth (8 of 16 at d16, 8 of 30 at d30); tokenloom's
  backbones are a few blocks deep, so ``mask_blocks`` is a fraction of
  ``n_layer`` (default 0.5, d16's; at least one block); ``mask_blocks = 0``
  shares every block between the heads (two linear heads on one hidden
  state and norm, the behaviour before this was completed). Differs: the
  reference fine-tunes the mask path in a second stage with the base model
  frozen (``finetune.py``); here both paths are trained together in one run
  — even batch rows train head 0 as plain Markov next-scale prediction
  (every token hidden), odd rows train head 1 on a MaskGIT mask per scale
  (r ~ U(0,1), ⌈cos(π/2·r)·n_k⌉ ≥ 1 of its n_k tokens hidden, loss on
  them); the shared blocks learn from both, each path's own blocks from its
  rows. Every pass runs both paths (the model computes every head), so a
  pass costs the shared blocks plus both copies. ``mask_head = false``: one
  head for both, every row trained on a MaskGIT mask (as before the fix).

Each input is the concatenation ``[f̂ feature, embedding of the code if
revealed else 0, revealed flag]`` (the code embedding is the tokenizer's
codebook; the reference adds a learned mask embedding instead of the flag).

Differs from the reference, by design of the toolkit: the class condition is
a class token by default (VAR and HMAR condition every block through AdaLN:
``[model] cond = "adaln"`` adds it, the mask path's own blocks included); the
refinement passes run the chain's guidance like any pass, where the
reference guides them with scale ``cfg · 1e-6`` (practically unguided);
sampling (top-k/top-p) is the chain's.

**Decoding.** Per scale: recompute f̂ of the scales so far through the
tokenizer, then the passes, each one forward pass over ``[class token,
scale k]`` (no KV cache — nothing else is attended). NFE = Σ_k (passes of
scale k).

No exact likelihood is reported (masked prediction inside a scale).
"""

from __future__ import annotations

import math

import attrs
import torch

import tokenloom
from tokenloom.orders import guidance_rows, refuse_known, scales_of

_CONFIDENCE_STREAM = 1  # RowRNG stream of the confidence noise (as `masked`)
NEXT_SCALE, MASK = 0, 1  # output heads with mask_head = true

# HMAR's released schedule, as fractions of a scale's tokens settled per pass, for the scales it refines
# (utils/sampling_arg_util.py: mask_schedule = [[1], [1, 3], [1, 1, 2, 5], [16], ...] on scales 1, 2, 3, 4, ...)
REFERENCE_SPLITS = {1: (1, 3), 2: (1, 1, 2, 5)}


def _optional_ge1(_inst, attribute, value):
    if value is not None and value < 1:
        raise ValueError(f"must be >= 1 or unset, got {value}")


def reference_split(n: int, parts: tuple[int, ...]) -> list[int]:
    """``n`` tokens split in the proportions ``parts`` (rounded cumulative
    boundaries, every pass settling at least one token; fewer passes when
    ``n`` is smaller than their number)."""
    total, acc, bounds = sum(parts), 0, []
    for w in parts:
        acc += w
        b = min(n, max(round(n * acc / total), (bounds[-1] + 1) if bounds else 1))
        if not bounds or b > bounds[-1]:
            bounds.append(b)
    bounds[-1] = n
    return [b - a for a, b in zip([0, *bounds[:-1]], bounds)]


def cosine_split(n: int, steps: int) -> list[int]:
    """Tokens settled per pass by ``min(steps, n)`` MaskGIT cosine passes:
    after pass t, ``max(1, min(h − 1, ⌊n·cos(π/2·(t+1)/S)⌋))`` stay hidden
    (none after the last)."""
    S, hidden, out = min(steps, n), n, []
    for t in range(S):
        keep = max(1, min(hidden - 1, math.floor(n * math.cos(math.pi / 2 * (t + 1) / S)))) if t < S - 1 else 0
        keep = min(keep, hidden)
        out.append(hidden - keep)
        hidden = keep
    return out


class NextScaleMarkovGenerator(tokenloom.Generator):
    exact_likelihood = False

    @attrs.frozen
    class Config:
        #: per scale, the tokens each pass settles (first: the next-scale pass); () = HMAR's released
        #: schedule (scales 1 and 2 refined in 2 and 4 passes, the rest one pass), unless ``steps`` is set
        tokens_per_step: tuple[tuple[int, ...], ...] = ()
        #: MaskGIT cosine passes on every scale instead (min(steps, n_k)); unset = the schedule above
        steps: int | None = attrs.field(default=None, validator=_optional_ge1)
        #: how the tokens to hide again are chosen: "probability" (HMAR's code: lowest p of the sampled
        #: code, no noise) or "gumbel" (MaskGIT: log p + choice_temperature·(1 − r)·Gumbel)
        remask: str = attrs.field(default="probability", validator=attrs.validators.in_(("probability", "gumbel")))
        choice_temperature: float = attrs.field(default=4.5, validator=attrs.validators.ge(0.0))
        #: a separate output head for the refinement passes (HMAR's mask head); false: one shared head
        mask_head: bool = True
        #: with mask_head: the fraction of the backbone's blocks the mask path has its own copy of
        #: (HMAR: the last n_layers_train = 8 blocks, 8 of 16 at d16; 0.5 here, at least one block);
        #: 0: the two heads share every block (before issue 18's completion)
        mask_blocks: float = attrs.field(default=0.5, validator=[attrs.validators.ge(0.0), attrs.validators.le(1.0)])

        def __attrs_post_init__(self) -> None:
            if self.steps is not None and self.tokens_per_step:
                raise ValueError("give tokens_per_step or steps, not both")

    def __init__(self, config: Config, *, tokenizer: tokenloom.Tokenizer):
        super().__init__(config, tokenizer=tokenizer)
        layout = scales_of(tokenizer, "next-scale-markov", inputs=True, depth_one=True)
        self.L, self.V = layout.length, tokenizer.vocab_size
        self.sizes = [h * w for h, w in layout.scales]
        self.offsets = [sum(self.sizes[:k]) for k in range(len(self.sizes))]
        self.D = int(tokenizer.embed_dim)
        self.E = int(tokenizer.code_embeddings().shape[1])
        block = torch.repeat_interleave(torch.arange(len(self.sizes)), torch.tensor(self.sizes))
        self.block = torch.cat([torch.full((1,), -1), block])  # (L + 1,) the class token: block -1
        self.schedule = self._schedule()

    def _schedule(self) -> list[list[int]]:
        cfg = self.config
        if cfg.tokens_per_step:
            sched = [list(map(int, s)) for s in cfg.tokens_per_step]
            if len(sched) != len(self.sizes):
                raise tokenloom.ConfigError(
                    f"next-scale-markov: tokens_per_step has {len(sched)} scales, the tokenizer {len(self.sizes)}")
            for k, (s, n) in enumerate(zip(sched, self.sizes)):
                if not s or min(s) < 1 or sum(s) != n:
                    raise tokenloom.ConfigError(
                        f"next-scale-markov: tokens_per_step[{k}] = {s} must be counts >= 1 summing to the "
                        f"scale's {n} tokens")
            return sched
        if cfg.steps is not None:
            return [cosine_split(n, cfg.steps) for n in self.sizes]
        return [reference_split(n, REFERENCE_SPLITS[k]) if k in REFERENCE_SPLITS else [n]
                for k, n in enumerate(self.sizes)]

    def model_spec(self) -> tokenloom.ModelSpec:
        return tokenloom.ModelSpec(
            seq_len=self.L + 1,
            vocab_size=self.V,
            heads=(self.V, self.V) if self.config.mask_head else (self.V,),
            train_order="next-scale-markov",
            input_kind="embeddings",
            input_dim=self.D + self.E + 1,
            attention="custom",
            cache_ops=frozenset(),
            layout=self.tokenizer.layout,
            extra=(("head_branch", (0, float(self.config.mask_blocks))),)
            if self.config.mask_head and self.config.mask_blocks > 0 else (),
        )

    def steps_per_scale(self) -> list[int]:
        return [len(s) for s in self.schedule]

    def expected_nfe(self) -> int:
        return sum(self.steps_per_scale())

    @staticmethod
    def gamma(r):
        return torch.cos(math.pi / 2 * r) if isinstance(r, torch.Tensor) else math.cos(math.pi / 2 * r)

    def attention_mask(self, device) -> torch.Tensor:
        """``[L + 1, L + 1]``: block-diagonal over scales, every token also
        sees the class token; the class token sees itself."""
        b = self.block.to(device)
        return (b[:, None] == b[None, :]) | (b[None, :] == -1)

    def _inputs(self, feats: torch.Tensor, codes: torch.Tensor, revealed: torch.Tensor) -> torch.Tensor:
        """``[B, n, D + E + 1]`` from f̂ features ``[B, n, D]``, codes and the revealed mask ``[B, n]``."""
        emb = self.tokenizer.code_embeddings().detach().float().to(feats.device)[codes]  # (B, n, E)
        r = revealed.to(feats.dtype)[..., None]
        return torch.cat([feats, emb * r, r], -1)

    def _features(self, codes: torch.Tensor) -> torch.Tensor:
        """``[B, L, D]``: f̂ of the earlier scales at every position (zeros on the first scale)."""
        with torch.no_grad():
            later = self.tokenizer.scale_inputs(codes).detach().float()
        return torch.cat([later.new_zeros(codes.shape[0], self.sizes[0], self.D), later], 1)

    def training_batch(self, codes: torch.Tensor, cond: torch.Tensor) -> tokenloom.TrainBatch:
        codes = tokenloom.check_codes(codes, self.L, self.V, where="next-scale-markov.training_batch: codes")
        B, dev = codes.shape[0], codes.device
        hidden = []
        for n in self.sizes:  # a MaskGIT mask per scale and image
            r = torch.rand(B)
            n_mask = torch.ceil(self.gamma(r) * n).clamp(1, n).long()
            rank = torch.rand(B, n).argsort(-1).argsort(-1)
            hidden.append(rank < n_mask[:, None])
        hidden = torch.cat(hidden, 1).to(dev)  # (B, L)
        if self.config.mask_head:  # even rows: plain next-scale prediction (head 0); odd rows: the mask head
            next_scale = (torch.arange(B, device=dev) % 2 == 0)[:, None]
            hidden = hidden | next_scale
        x = self._inputs(self._features(codes), codes, ~hidden)
        inputs = torch.cat([x.new_zeros(B, 1, x.shape[-1]), x], 1)
        targets = torch.cat([torch.zeros_like(codes[:, :1]), codes], 1)
        loss_mask = torch.cat([torch.zeros_like(hidden[:, :1]), hidden], 1)
        if self.config.mask_head:
            targets = targets[..., None].expand(B, self.L + 1, 2).contiguous()
            loss_mask = torch.stack([loss_mask & next_scale, loss_mask & ~next_scale], -1)
        return tokenloom.TrainBatch(inputs=inputs, targets=targets, loss_mask=loss_mask, cond=cond.long(),
                                    positions=torch.arange(-1, self.L, device=dev),
                                    attn_mask=self.attention_mask(dev))

    def generate(self, model, chain, cond, *, rng, known=None) -> torch.Tensor:
        refuse_known("next-scale-markov", known, instead="'next-scale' or 'masked'")
        B, dev = cond.shape[0], model.device
        cond = cond.to(dev).long()
        rows, guided = guidance_rows(cond, chain, model)
        reps = 2 if guided else 1
        codes = torch.zeros(B, self.L, dtype=torch.long, device=dev)
        n_steps = self.expected_nfe()
        step = 0
        tau, gumbel = self.config.choice_temperature, self.config.remask == "gumbel"
        for k, (a, n) in enumerate(zip(self.offsets, self.sizes)):
            feats = self._features(codes)[:, a : a + n].to(dev)  # f̂ of scales < k at scale k
            pos = torch.cat([torch.full((1,), tokenloom.NO_POSITION, device=dev), torch.arange(a, a + n, device=dev)])
            mask = torch.ones(n + 1, n + 1, dtype=torch.bool, device=dev)
            mask[0, 1:] = False  # the class token sees itself only
            cur = torch.zeros(B, n, dtype=torch.long, device=dev)
            hidden = torch.ones(B, n, dtype=torch.bool, device=dev)
            settle = self.schedule[k]
            S = len(settle)
            for t in range(S):
                x = self._inputs(feats, cur, ~hidden)
                x = torch.cat([x.new_zeros(B, 1, x.shape[-1]), x], 1).repeat(reps, 1, 1)
                out = model(x, rows, positions=pos, attn_mask=mask)
                if self.config.mask_head:  # the next-scale pass reads head 0, the refinements the mask head
                    out = out[NEXT_SCALE if t == 0 else MASK]
                logits = out[:, 1:]  # (rows, n, V)
                info = tokenloom.StepInfo(step=step, n_steps=n_steps, positions=torch.arange(a, a + n, device=dev)
                                          .expand(B, n), scale=k, n_scales=len(self.sizes),
                                          uncond_logits=logits[B:] if guided else None)
                processed = chain(logits[:B], info)  # (B, n, V)
                sampled = chain.draw(processed, rng, step)  # (B, n)
                logp = torch.log_softmax(processed.float(), -1).gather(-1, sampled[..., None])[..., 0]
                keep = torch.full((B,), sum(settle[t + 1 :]), dtype=torch.long, device=dev)  # still hidden after
                confidence = logp
                if gumbel and t < S - 1:
                    noise = rng.gumbel(step, n, stream=_CONFIDENCE_STREAM).to(dev)
                    confidence = logp + tau * (1.0 - (t + 1) / S) * noise
                confidence = torch.where(hidden, confidence, torch.full_like(confidence, float("inf")))
                rank = confidence.argsort(dim=-1, stable=True).argsort(-1)  # 0 = least confident
                still = rank < keep[:, None]
                cur = torch.where(hidden & ~still, sampled, cur)
                hidden = still
                step += 1
            codes[:, a : a + n] = cur
        return codes


@tokenloom.hookimpl
def register_generators(register):
    register("next-scale-markov", NextScaleMarkovGenerator)
