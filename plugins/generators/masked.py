"""``masked``: masked-token prediction with bidirectional attention,
decoded in T parallel steps — MaskGIT (Chang et al. 2022, "MaskGIT: Masked
Generative Image Transformer", https://arxiv.org/abs/2202.04200; the recipe
of Muse and Meissonic) and, as ``style = "mar"``, MAR's masked
autoregression (Li et al. 2024, "Autoregressive Image Generation without
Vector Quantization", https://arxiv.org/abs/2406.11838, reference code
``LTH14/mar`` ``models/mar.py``). One plugin for both token kinds.

**MAR is an option of this order, not a plugin of its own**, because it is
the same order: a bidirectional transformer over ``[cls, x̃_0, ...,
x̃_{L-1}]`` with masked positions, trained on the masked positions only,
decoded in T passes that each finalise a cosine-scheduled number of
tokens, with the same NFE formula (T) and the same ``known`` support. What
MAR changes are three settings — how many tokens training masks, which
tokens a step finalises, and how guidance ramps — and they apply to
discrete codes as much as to continuous tokens, so one option gives the
comparison the issue asks for (MAR's recipe on VQ codes against MaskGIT's,
and MAR's recipe on codes against continuous tokens) at one place.

``style``: ``"maskgit"`` (the default for discrete codes), ``"mar"``, or
``"auto"`` (the default: ``"mar"`` for a continuous tokenizer, ``"maskgit"``
for a discrete one — so ``masked`` on a ``kl`` tokenizer is MAR). MaskGIT's
confidence re-masking needs the probability of a drawn token, which a
continuous head does not give, so ``style = "maskgit"`` with continuous
tokens is a :class:`~tokenloom.ConfigError`.

**Training — MaskGIT.** For each image draw r ~ U(0, 1) and mask ⌈γ(r)·L⌉
random tokens, γ(r) = cos(π/2 · r) (the cosine schedule, MaskGIT §3.2);
masked tokens are replaced by a MASK token (id ``V``). The loss is the
cross-entropy at the masked positions only.

**Training — MAR.** One mask ratio per batch from MAR's
``mask_ratio_generator``: a normal centred at 1.0 with std 0.25, truncated
to [``mask_ratio_min``, 1] (0.7 in the reference); ⌈ratio·L⌉ tokens of each
image are masked along a random order per image (``random_masking``). The
head's loss is taken at the masked positions only. With continuous tokens
a position's input is its latent plus a *mask flag* channel
(``[B, L + 1, D + 1]``): a masked position is zeros with the flag set, so
the backbone's input projection learns MAR's mask token (its bias plus the
flag's column) — the same thing the reference's learned ``mask_token`` is,
inside our single transformer. Differences from the reference: MAR is an
MAE-style encoder (which drops the masked tokens) plus a decoder (which
re-inserts mask tokens), with 64 buffer positions for the class embedding;
here one bidirectional transformer sees every position, masked ones as the
mask token, and the class token sits at index 0 — the shared tokenloom
backbone, so MAR is compared to the other orders at equal backbone FLOPs.

**Decoding — MaskGIT** (§3.2, Algorithm 1). Start with every unknown token
masked. At step t = 0..T-1 (r = (t + 1)/T): one forward pass predicts every
position; a token is sampled at each masked position through the sampler
chain; its confidence is log p(x̂) + τ·(1 − r)·g with Gumbel noise g and
τ = ``choice_temperature`` (4.5); of the N unknown tokens,
n = ⌊N·cos(π/2 · r)⌋ (at least one, at most N_masked − 1 before the last
step) with the lowest confidence are masked again and the rest are final —
every position is finalised exactly once. NFE = T.

**Decoding — MAR** (``sample_tokens``). A random order per image is drawn
once (from the image's RNG); at step t the number still masked after the
step is ⌊N·cos(π/2·(t + 1)/T)⌋, clamped to [1, N_masked − 1] before the
last step and 0 at it, and the tokens finalised are the next ones of the
order — no confidence. One forward pass per step (NFE = T); the head (or,
for codes, the chain) draws a token only at the positions finalised this
step. Guidance: the ``cfg`` sampler, with the decoded fraction as its
progress (``StepInfo.fraction``): with ``schedule = "linear"`` the scale at
step t is 1 + (s − 1)·(L − m_t)/L, m_t the number still masked after it —
MAR's linear schedule over decoded tokens (``cfg_schedule = "linear"``,
after Muse); for continuous tokens the head applies it to the denoiser's
prediction, as MAR does, and MAR's ``temperature`` is the ``temperature``
sampler's. ``steps`` is MAR's ``num_iter`` (64 at 256 px).

**Zero-shot inpainting/outpainting**: ``known`` tokens (codes, or latents
``FloatTensor[B, L, D]`` for continuous tokens) are in place from the start
and never masked; the schedule runs over the N unknown ones (MAR: the
random order visits the unknown positions only).

No exact likelihood: masked prediction gives no tractable log p(x), so the
order reports none rather than a misleading number.
"""

from __future__ import annotations

import math
from typing import ClassVar

import attrs
import torch

import tokenloom
from tokenloom.orders import check_known, check_known_latents, continuous_spec, draw_tokens

_CONFIDENCE_STREAM = 1  # RowRNG stream of the confidence Gumbel noise
_ORDER_STREAM = 7  # RowRNG stream of MAR's random decoding order (step 0)
_STYLES = ("auto", "maskgit", "mar")


def _fraction(_inst, attribute, value):
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"must be in [0, 1], got {value}")


def mar_mask_ratio(mask_ratio_min: float, generator: torch.Generator | None = None) -> float:
    """One draw of MAR's training mask ratio: N(1, 0.25²) truncated to
    [``mask_ratio_min``, 1] (``stats.truncnorm((min − 1)/0.25, 0, loc=1,
    scale=0.25)`` in the reference), by inverting the normal CDF on a
    uniform from torch's generator (global unless ``generator``)."""
    lo = torch.special.ndtr(torch.tensor((mask_ratio_min - 1.0) / 0.25, dtype=torch.float64))
    u = torch.rand(1, generator=generator, dtype=torch.float64)[0]
    p = lo + (0.5 - lo) * u  # uniform in [Φ(a), Φ(0)]
    return float(min(1.0, max(mask_ratio_min, 1.0 + 0.25 * float(torch.special.ndtri(p)))))


class MaskedGenerator(tokenloom.Generator):
    supports_known = True
    exact_likelihood = False
    continuous_ok = True  # MAR: continuous tokens with a diffusion (or flow) head

    @attrs.frozen
    class Config:
        steps: int = attrs.field(default=8, validator=attrs.validators.ge(1))
        choice_temperature: float = attrs.field(default=4.5, validator=attrs.validators.ge(0.0))
        #: "maskgit", "mar", or "auto" (mar for continuous tokens, maskgit for codes)
        style: str = attrs.field(default="auto", validator=attrs.validators.in_(_STYLES))
        #: MAR: lower end of the truncated-normal training mask ratio (the reference's 0.7)
        mask_ratio_min: float = attrs.field(default=0.7, validator=_fraction)
        #: options added with continuous tokens: left out of cache keys at these defaults
        later_defaults: ClassVar[dict] = {"style": "auto", "mask_ratio_min": 0.7}

    def __init__(self, config: Config, *, tokenizer: tokenloom.Tokenizer):
        super().__init__(config, tokenizer=tokenizer)
        self.L = tokenizer.layout.length
        self.continuous = bool(getattr(tokenizer, "continuous", False))
        self.D = int(tokenizer.token_dim) if self.continuous else 0
        self.V = 0 if self.continuous else tokenizer.vocab_size
        self.mask_id = self.V
        style = config.style
        if style == "auto":
            style = "mar" if self.continuous else "maskgit"
        if style == "maskgit" and self.continuous:
            raise tokenloom.ConfigError(
                f"masked: style = 'maskgit' re-masks by the probability of each drawn token, which continuous "
                f"tokens (tokenizer {type(tokenizer).__name__}) do not have — use style = 'mar' (or 'auto')")
        self.style = style

    # -- the model ------------------------------------------------------------

    def model_spec(self) -> tokenloom.ModelSpec:
        if self.continuous:  # inputs: latent + mask flag; a head reads the hidden states
            return continuous_spec(self.tokenizer, seq_len=self.L + 1, train_order="masked-mar", extra_input_dim=1,
                                   attention="bidirectional", cache_ops=frozenset())
        return tokenloom.ModelSpec(
            seq_len=self.L + 1,
            vocab_size=self.V + 1,
            n_extra_tokens=1,
            heads=(self.V,),
            train_order="masked" if self.style == "maskgit" else "masked-mar",
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

    def _inputs(self, tokens: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """The backbone's inputs ``[cls, x̃_0, ...]``: ids with MASK at the
        masked positions (``[B, L + 1]``), or for continuous tokens the latents
        zeroed at the masked positions plus the mask flag (``[B, L + 1, D + 1]``)."""
        if not self.continuous:
            x = torch.where(masked, torch.full_like(tokens, self.mask_id), tokens)
            return torch.cat([torch.zeros_like(x[:, :1]), x], 1)
        flag = masked[..., None].float()
        x = torch.cat([tokens.float() * (1.0 - flag), flag], -1)  # (B, L, D + 1)
        return torch.cat([torch.zeros_like(x[:, :1]), x], 1)

    # -- training -------------------------------------------------------------

    def training_batch(self, codes: torch.Tensor, cond: torch.Tensor) -> tokenloom.TrainBatch:
        if self.continuous:
            tokens = tokenloom.check_latents(codes, self.L, self.D, where="masked.training_batch: latents")
        else:
            tokens = tokenloom.check_codes(codes, self.L, self.V, where="masked.training_batch: codes")
        B, L = tokens.shape[:2]
        dev = tokens.device
        if self.style == "maskgit":
            r = torch.rand(B)
            n_mask = torch.ceil(self.gamma(r) * L).clamp(1, L).long().to(dev)  # (B,)
        else:  # MAR: one truncated-normal ratio per batch, a random order per image
            ratio = mar_mask_ratio(self.config.mask_ratio_min)
            n_mask = torch.full((B,), min(L, max(1, math.ceil(L * ratio))), dtype=torch.long, device=dev)
        rank = torch.rand(B, L).argsort(-1).argsort(-1).to(dev)  # a random rank per position
        mask = rank < n_mask[:, None]  # (B, L)
        inputs = self._inputs(tokens, mask)
        targets = torch.cat([torch.zeros_like(tokens[:, :1]), tokens], 1)
        loss_mask = torch.cat([torch.zeros_like(mask[:, :1]), mask], 1)
        return tokenloom.TrainBatch(inputs=inputs, targets=targets.float() if self.continuous else targets,
                                    loss_mask=loss_mask, cond=cond.long(), positions=self._positions(dev))

    # -- decoding -------------------------------------------------------------

    def generate(self, model, chain, cond, *, rng, known=None) -> torch.Tensor:
        if self.style == "mar":
            return self._generate_mar(model, chain, cond, rng, known)
        return self._generate_maskgit(model, chain, cond, rng, known)

    def mar_schedule(self) -> list[tuple[int, float]]:
        """MAR's schedule for L tokens: per step, ``(m, fraction)`` — the
        number still masked after the step (⌊L·cos(π/2·(t+1)/T)⌋ clamped to
        [1, m_prev − 1]) and the decoded fraction (L − m)/L that drives the
        linear guidance schedule (the reference computes it from this clamped
        count, before zeroing the last step's)."""
        L, T = self.L, self.config.steps
        out, m = [], L
        for t in range(T):
            nxt = max(1, min(m - 1, math.floor(L * math.cos(math.pi / 2 * (t + 1) / T))))
            out.append((nxt, (L - nxt) / L))
            m = 0 if t == T - 1 else nxt
        return out

    def _generate_mar(self, model, chain, cond, rng, known) -> torch.Tensor:
        B, dev, L, T = cond.shape[0], model.device, self.L, self.config.steps
        cond = cond.to(dev).long()
        guided = bool(chain.needs_uncond)
        rows = torch.cat([cond, torch.full_like(cond, model.null_class)]) if guided else cond
        if self.continuous:
            tokens = torch.zeros(B, L, self.D, device=dev)
            given = None if known is None else check_known_latents(known, B, L, self.D, dev)
        else:
            tokens = torch.zeros(B, L, dtype=torch.long, device=dev)
            given = None if known is None else check_known(known, B, L, self.V, dev)
        kmask = torch.zeros(B, L, dtype=torch.bool, device=dev)
        if given is not None:
            kmask = given[1]
            tokens = torch.where(kmask[..., None] if self.continuous else kmask, given[0].to(tokens.dtype), tokens)
        n_unknown = (~kmask).sum(1)  # (B,) N: the schedule runs over these
        # the random order of each image (its own RNG): unknown positions first, known ones never visited
        key = rng.uniform(0, L, stream=_ORDER_STREAM).to(dev) + 2.0 * kmask.float()
        order = key.argsort(dim=-1, stable=True)  # (B, L): order[b, j] = the position of rank j
        rank = order.argsort(-1)  # (B, L): the rank of each position
        positions = self._positions(dev)
        m = n_unknown.clone()  # (B,) masked before this step: the ranks [0, m)
        for t, (_, fraction) in enumerate(self.mar_schedule()):
            if t < T - 1:
                nxt = torch.floor(n_unknown.double() * math.cos(math.pi / 2 * (t + 1) / T)).long()
                nxt = torch.maximum(torch.ones_like(nxt), torch.minimum(m - 1, nxt))
                nxt = torch.minimum(nxt, m)
            else:
                nxt = torch.zeros_like(m)
            masked = rank < m[:, None]  # (B, L)
            inputs = self._inputs(tokens, masked)
            inputs = torch.cat([inputs, inputs]) if guided else inputs
            out = model(inputs, rows, positions=positions, return_hidden=self.continuous)[:, 1:]  # (R, L, ·)
            count = m - nxt  # (B,) tokens finalised this step: ranks [nxt, m)
            k = int(count.max()) if B else 0
            if k > 0:
                slot = torch.arange(k, device=dev)
                valid = slot[None, :] < count[:, None]  # (B, k)
                where = order.gather(1, (nxt[:, None] + slot[None, :]).clamp(max=L - 1))  # (B, k)
                idx = torch.cat([where, where]) if guided else where
                sel = out.gather(1, idx[..., None].expand(-1, -1, out.shape[-1]))  # (R, k, ·)
                info = tokenloom.StepInfo(step=t, n_steps=T, positions=where, fraction=fraction)
                new = draw_tokens(model, chain, sel, rng, B=B, guided=guided, info=info)  # (B, k[, D])
                tokens = self._scatter(tokens, torch.where(valid, where, torch.full_like(where, L)), new)
            m = nxt
        return tokens

    def _scatter(self, tokens: torch.Tensor, where: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """``tokens`` with ``new[b, j]`` written at position ``where[b, j]``;
        ``where == L`` (padding of a shorter row) writes nowhere."""
        L = tokens.shape[1]
        pad = torch.zeros_like(tokens[:, :1])
        out = torch.cat([tokens, pad], 1)
        if self.continuous:
            out = out.scatter(1, where[..., None].expand(-1, -1, self.D), new.to(out.dtype))
        else:
            out = out.scatter(1, where, new.to(out.dtype))
        return out[:, :L]

    def _generate_maskgit(self, model, chain, cond, rng, known) -> torch.Tensor:
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
