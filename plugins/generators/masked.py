"""``masked``: MaskGIT — bidirectional masked-token prediction decoded in T
parallel steps (Chang et al. 2022, "MaskGIT: Masked Generative Image
Transformer", https://arxiv.org/abs/2202.04200; the recipe of Muse and
Meissonic).

**Training.** For each image draw r ~ U(0, 1) and mask ⌈γ(r)·L⌉ random
tokens, γ(r) = cos(π/2 · r) (the cosine schedule, MaskGIT §3.2); masked
tokens are replaced by a MASK token (id ``V``). A bidirectional transformer
sees ``[cls, x̃_0, ..., x̃_{L-1}]`` and the loss is the cross-entropy at the
masked positions only.

**Decoding** (MaskGIT §3.2, Algorithm 1). Start with every unknown token
masked. At step t = 0..T-1 (r = (t + 1)/T): one forward pass predicts every
position; a token is sampled at each masked position through the sampler
chain; its confidence is log p(x̂) + τ·(1 − r)·g with Gumbel noise g and
τ = ``choice_temperature`` (4.5); of the N unknown tokens,
n = ⌊N·cos(π/2 · r)⌋ (at least one, at most N_masked − 1 before the last
step) with the lowest confidence are masked again and the rest are final —
every position is finalised exactly once. NFE = T.

**Zero-shot inpainting/outpainting**: ``known`` tokens are in place from
the start and never masked; the schedule runs over the unknown ones.

No exact likelihood: masked prediction gives no tractable log p(x), so the
order reports none rather than a misleading number.
"""

from __future__ import annotations

import math

import attrs
import torch

import tokenloom

_CONFIDENCE_STREAM = 1  # RowRNG stream of the confidence Gumbel noise


class MaskedGenerator(tokenloom.Generator):
    supports_known = True
    exact_likelihood = False

    @attrs.frozen
    class Config:
        steps: int = attrs.field(default=8, validator=attrs.validators.ge(1))
        choice_temperature: float = attrs.field(default=4.5, validator=attrs.validators.ge(0.0))

    def __init__(self, config: Config, *, tokenizer: tokenloom.Tokenizer):
        super().__init__(config, tokenizer=tokenizer)
        self.L = tokenizer.layout.length
        self.V = tokenizer.vocab_size
        self.mask_id = self.V

    def model_spec(self) -> tokenloom.ModelSpec:
        return tokenloom.ModelSpec(
            seq_len=self.L + 1,
            vocab_size=self.V + 1,
            n_extra_tokens=1,
            heads=(self.V,),
            train_order="masked",
            attention="bidirectional",
            cache_ops=frozenset(),
            layout=self.tokenizer.layout,
        )

    def expected_nfe(self) -> int:
        return self.config.steps

    @staticmethod
    def gamma(r: torch.Tensor | float):
        """The cosine mask schedule γ(r) = cos(π/2 · r): fraction masked."""
        return torch.cos(math.pi / 2 * r) if isinstance(r, torch.Tensor) else math.cos(math.pi / 2 * r)

    def _positions(self, dev) -> torch.Tensor:
        return torch.arange(-1, self.L, device=dev)  # [cls, 0, ..., L-1]

    def training_batch(self, codes: torch.Tensor, cond: torch.Tensor) -> tokenloom.TrainBatch:
        codes = tokenloom.check_codes(codes, self.L, self.V, where="masked.training_batch: codes")
        B, L = codes.shape
        dev = codes.device
        r = torch.rand(B)
        n_mask = torch.ceil(self.gamma(r) * L).clamp(1, L).long().to(dev)  # (B,)
        rank = torch.rand(B, L).argsort(-1).argsort(-1).to(dev)  # a random rank per position
        mask = rank < n_mask[:, None]  # (B, L)
        x = torch.where(mask, torch.full_like(codes, self.mask_id), codes)
        inputs = torch.cat([torch.zeros_like(x[:, :1]), x], 1)
        targets = torch.cat([torch.zeros_like(codes[:, :1]), codes], 1)
        loss_mask = torch.cat([torch.zeros_like(mask[:, :1]), mask], 1)
        return tokenloom.TrainBatch(inputs=inputs, targets=targets, loss_mask=loss_mask, cond=cond.long(),
                                    positions=self._positions(dev))

    def generate(self, model, chain, cond, *, rng, known=None) -> torch.Tensor:
        B, dev, L, T = cond.shape[0], model.device, self.L, self.config.steps
        cond = cond.to(dev).long()
        x = torch.full((B, L), self.mask_id, dtype=torch.long, device=dev)
        if known is not None:
            kcodes = tokenloom.check_codes(known.codes, L, self.V, where="known.codes").to(dev)
            kmask = known.mask
            if not isinstance(kmask, torch.Tensor) or kmask.dtype != torch.bool or tuple(kmask.shape) != (B, L):
                raise tokenloom.InputError(f"known.mask: expected a BoolTensor [{B}, {L}]")
            kmask = kmask.to(dev)
            x = torch.where(kmask, kcodes, x)
        masked = x == self.mask_id  # (B, L) not yet final
        n_unknown = masked.sum(1)  # (B,) N: the schedule runs over these
        guided = chain.needs_uncond
        rows = torch.cat([cond, torch.full_like(cond, model.null_class)]) if guided else cond
        positions = self._positions(dev)
        for t in range(T):
            inputs = torch.cat([torch.zeros_like(x[:, :1]), x], 1)
            inputs = inputs.repeat(2, 1) if guided else inputs
            logits = model(inputs, rows, positions=positions)[:, 1:]  # (rows, L, V)
            info = tokenloom.StepInfo(step=t, n_steps=T, positions=torch.arange(L, device=dev).expand(B, L),
                                      uncond_logits=logits[B:] if guided else None)
            processed = chain(logits[:B], info)  # (B, L, V)
            sampled = chain.draw(processed, rng, t)  # (B, L)
            logp = torch.log_softmax(processed.float(), -1).gather(-1, sampled[..., None])[..., 0]
            r = (t + 1) / T
            n_masked = masked.sum(1)
            keep_masked = torch.floor(n_unknown.double() * self.gamma(r)).long()
            if t < T - 1:  # MaskGIT: reveal at least one, keep at least one for later
                keep_masked = torch.maximum(torch.ones_like(keep_masked), torch.minimum(n_masked - 1, keep_masked))
            else:
                keep_masked = torch.zeros_like(keep_masked)
            keep_masked = torch.minimum(keep_masked, n_masked)
            noise = rng.gumbel(t, L, stream=_CONFIDENCE_STREAM).to(dev)
            confidence = logp + self.config.choice_temperature * (1.0 - r) * noise
            confidence = torch.where(masked, confidence, torch.full_like(confidence, float("inf")))
            rank = confidence.argsort(dim=-1, stable=True).argsort(-1)  # 0 = least confident
            still = rank < keep_masked[:, None]
            x = torch.where(masked & ~still, sampled, x)
            masked = still
        return x


@tokenloom.hookimpl
def register_generators(register):
    register("masked", MaskedGenerator)
