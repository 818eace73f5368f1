"""``next-scale-markov``: Markovian next-scale prediction with masked
generation inside each scale — HMAR (Kumbong et al. 2025, "HMAR: Efficient
Hierarchical Masked Auto-Regressive Image Generation",
https://arxiv.org/abs/2506.04421).

Needs a multi-scale tokenizer with VAR's teacher-forcing inputs (the core
:class:`tokenloom.MultiScaleInputs` protocol: ``multiscale``).

HMAR's two changes to VAR, both kept here:

- **Markov over scales.** Scale k is predicted from the reconstruction of
  scales < k alone — the tokenizer's accumulated f̂, downsampled to scale
  k's grid, which already summarises every earlier scale — not from the
  earlier scales' tokens: p(x) = Π_k p(r_k | f̂_{<k}). The attention mask is
  **block-diagonal**: a scale's tokens attend to their own scale's inputs
  (and the class token, which carries the class condition to every scale;
  VAR and HMAR condition every block through AdaLN instead), never to
  another scale.
- **Masked multi-step generation inside a scale.** Each input is the
  concatenation ``[f̂ feature, embedding of the code if revealed else 0,
  revealed flag]`` (the code embedding is the tokenizer's codebook). In
  training, every scale of every image gets its own MaskGIT mask: r ~ U(0,1),
  ⌈cos(π/2·r)·n_k⌉ ≥ 1 of its n_k tokens are hidden and the loss is taken on
  them; with every token hidden this is plain (Markov) next-scale
  prediction. In decoding, scale k is generated in ``min(steps, n_k)``
  MaskGIT steps (cosine schedule, confidence log p + τ·(1 − r)·Gumbel),
  so the number of steps changes without retraining.

**Decoding.** Per scale: recompute f̂ of the scales so far through the
tokenizer, then the masked steps, each one forward pass over ``[class
token, scale k]`` (no KV cache — nothing else is attended). NFE =
Σ_k min(steps, n_k) (``steps = 1``: one pass per scale, as VAR).

No exact likelihood is reported (masked prediction inside a scale).
"""

from __future__ import annotations

import math

import attrs
import torch

import tokenloom
from tokenloom.orders import guidance_rows, scales_of
from tokenloom.sampling import SamplerChain

_CONFIDENCE_STREAM = 1  # RowRNG stream of the confidence noise (as `masked`)


class NextScaleMarkovGenerator(tokenloom.Generator):
    exact_likelihood = False

    @attrs.frozen
    class Config:
        steps: int = attrs.field(default=4, validator=attrs.validators.ge(1))
        choice_temperature: float = attrs.field(default=4.5, validator=attrs.validators.ge(0.0))

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

    def model_spec(self) -> tokenloom.ModelSpec:
        return tokenloom.ModelSpec(
            seq_len=self.L + 1,
            vocab_size=self.V,
            heads=(self.V,),
            train_order="next-scale-markov",
            input_kind="embeddings",
            input_dim=self.D + self.E + 1,
            attention="custom",
            cache_ops=frozenset(),
            layout=self.tokenizer.layout,
        )

    def steps_per_scale(self) -> list[int]:
        return [min(self.config.steps, n) for n in self.sizes]

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
        x = self._inputs(self._features(codes), codes, ~hidden)
        inputs = torch.cat([x.new_zeros(B, 1, x.shape[-1]), x], 1)
        targets = torch.cat([torch.zeros_like(codes[:, :1]), codes], 1)
        loss_mask = torch.cat([torch.zeros_like(hidden[:, :1]), hidden], 1)
        return tokenloom.TrainBatch(inputs=inputs, targets=targets, loss_mask=loss_mask, cond=cond.long(),
                                    positions=torch.arange(-1, self.L, device=dev),
                                    attn_mask=self.attention_mask(dev))

    def generate(self, model, sampler, cond, *, rng, known=None) -> torch.Tensor:
        if known is not None:
            raise tokenloom.InputError("next-scale-markov does not support known= (use 'next-scale' or 'masked')")
        sampler = sampler if isinstance(sampler, SamplerChain) else SamplerChain(sampler)
        B, dev = cond.shape[0], model.device
        cond = cond.to(dev).long()
        rows, guided = guidance_rows(cond, sampler, model)
        reps = 2 if guided else 1
        codes = torch.zeros(B, self.L, dtype=torch.long, device=dev)
        n_steps = self.expected_nfe()
        step = 0
        tau = self.config.choice_temperature
        for k, (a, n) in enumerate(zip(self.offsets, self.sizes)):
            feats = self._features(codes)[:, a : a + n].to(dev)  # f̂ of scales < k at scale k
            pos = torch.cat([torch.full((1,), tokenloom.NO_POSITION, device=dev), torch.arange(a, a + n, device=dev)])
            mask = torch.ones(n + 1, n + 1, dtype=torch.bool, device=dev)
            mask[0, 1:] = False  # the class token sees itself only
            cur = torch.zeros(B, n, dtype=torch.long, device=dev)
            hidden = torch.ones(B, n, dtype=torch.bool, device=dev)
            S = self.steps_per_scale()[k]
            for t in range(S):
                x = self._inputs(feats, cur, ~hidden)
                x = torch.cat([x.new_zeros(B, 1, x.shape[-1]), x], 1).repeat(reps, 1, 1)
                logits = model(x, rows, positions=pos, attn_mask=mask)[:, 1:]  # (rows, n, V)
                info = tokenloom.StepInfo(step=step, n_steps=n_steps, positions=torch.arange(a, a + n, device=dev)
                                          .expand(B, n), scale=k, n_scales=len(self.sizes),
                                          uncond_logits=logits[B:] if guided else None)
                processed = sampler(logits[:B], info)  # (B, n, V)
                sampled = sampler.draw(processed, rng, step)  # (B, n)
                logp = torch.log_softmax(processed.float(), -1).gather(-1, sampled[..., None])[..., 0]
                r = (t + 1) / S
                n_hidden = hidden.sum(1)
                if t < S - 1:  # MaskGIT: reveal at least one, keep at least one hidden for later
                    keep = torch.full_like(n_hidden, math.floor(n * self.gamma(r)))
                    keep = torch.maximum(torch.ones_like(keep), torch.minimum(n_hidden - 1, keep))
                else:
                    keep = torch.zeros_like(n_hidden)
                keep = torch.minimum(keep, n_hidden)
                noise = rng.gumbel(step, n, stream=_CONFIDENCE_STREAM).to(dev)
                confidence = logp + tau * (1.0 - r) * noise
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
