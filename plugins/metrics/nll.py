"""``nll``: held-out negative log-likelihood of the codes, in bits per image
and bits per pixel dimension — the likelihood measure of PixelCNN
(van den Oord et al. 2016, https://arxiv.org/abs/1601.06759) and Image
Transformer/iGPT, applied to discrete visual tokens.

For a generator with an exact likelihood (``generator.exact_likelihood``:
raster, random, next-scale, depth-stack orders), ``log_likelihood(model,
codes, cond)`` gives log p(codes | cond) in nats per image; then

- ``nll_bits_per_image`` = −mean log p / ln 2;
- ``nll_bits_per_dim`` = bits per image / (C·H·W) of the tokenizer's images;
- ``nll_bits_per_token`` = bits per image / L.

Masked, block and neighbour orders have no tractable exact likelihood: they
report None rather than a misleading number. Limits: this is the likelihood
of the *codes*, comparable across generators that share a tokenizer; across
tokenizers (or against pixel-level models) it is not a pixel likelihood,
since a lossy tokenizer discards information the codes do not carry. The
pipeline passes the held-out split's codes as ``ctx.codes`` with their labels
as ``ctx.real_labels`` (absent labels: the unconditional/null class), and the
likelihood it already computed of them in ``ctx.stats`` (``heldout_nll_bits_per_image``,
``heldout_images``): without ``max_images``, that number is used rather than
scoring the same codes twice.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import torch

import tokenloom

_NONE = {"nll_bits_per_image": None, "nll_bits_per_dim": None, "nll_bits_per_token": None}


class NLL(tokenloom.Metric):
    requires = frozenset({"codes", "model", "generator", "tokenizer"})
    card_name = "nll"

    @attrs.frozen
    class Config:
        batch_size: int = attrs.field(default=64, validator=attrs.validators.ge(1))
        max_images: int | None = attrs.field(default=None, validator=attrs.validators.optional(
            attrs.validators.ge(1)))

    def compute(self, ctx: tokenloom.MetricContext) -> tokenloom.MetricResult:
        gen = ctx.generator
        exact = bool(getattr(gen, "exact_likelihood", False))
        card = self.card(generator=type(gen).__name__ if gen is not None else None, exact_likelihood=exact,
                         units="bits (log base 2)")
        if gen is None or not exact:
            card["reason"] = "no generator" if gen is None else "generation order has no exact likelihood"
            return tokenloom.MetricResult(_NONE, card)
        if ctx.model is None:
            raise tokenloom.InputError("nll: the context has no model to score the codes with")
        tok = ctx.tokenizer if ctx.tokenizer is not None else getattr(gen, "tokenizer", None)
        if tok is None:
            raise tokenloom.InputError("nll: the context needs the tokenizer (for the code layout and image size)")
        continuous = bool(getattr(tok, "continuous", False))
        head = getattr(ctx.model, "head", None)
        if continuous and (head is None or not head.exact_likelihood):  # diffusion, flow: no exact likelihood
            card["reason"] = f"the head {type(head).__name__} has no exact likelihood of continuous tokens"
            return tokenloom.MetricResult(_NONE, card)
        if continuous:  # a head with an exact density: log p of the latents (it may exceed 0)
            codes = tok.check_tokens(ctx.codes, where="nll: ctx.codes")
        else:
            codes = tokenloom.check_codes(ctx.codes, tok.layout.length, tok.vocab_size, where="nll: ctx.codes")
        if self.config.max_images is not None:
            codes = codes[: self.config.max_images]
        n = codes.shape[0]
        if n == 0:
            raise tokenloom.InputError("nll: no held-out codes to score")
        if self.config.max_images is None and (ctx.stats or {}).get("heldout_images") == n:
            # the pipeline scored these very codes already (ctx.stats["heldout_*"]): not a second time
            bits = tokenloom.read_stat(ctx.stats, "heldout_nll_bits_per_image", metric="nll")
            return self._result(card, tok, codes, bits, "the pipeline's likelihood of the held-out codes (ctx.stats)")
        cond = self._cond(ctx, n)
        total = 0.0
        with torch.no_grad():
            for i in range(0, n, self.config.batch_size):
                c = codes[i : i + self.config.batch_size]
                y = cond[i : i + self.config.batch_size]
                lp = gen.log_likelihood(ctx.model, c.to(ctx.device), y.to(ctx.device))
                if not isinstance(lp, torch.Tensor) or lp.shape != (len(c),):
                    raise tokenloom.InputError(
                        f"nll: {type(gen).__name__}.log_likelihood must return FloatTensor[{len(c)}], got "
                        f"{tuple(getattr(lp, 'shape', ()))}")
                if not torch.isfinite(lp).all() or (not continuous and (lp > 1e-4).any()):
                    raise tokenloom.InputError(f"nll: {type(gen).__name__}.log_likelihood returned values that "
                                               "are not finite log-probabilities (must be <= 0)")
                total += lp.double().sum().item()
        return self._result(card, tok, codes, -total / n / math.log(2), "held-out codes (ctx.codes)")

    @staticmethod
    def _result(card: dict[str, Any], tok: Any, codes: torch.Tensor, bits: float,
                source: str) -> tokenloom.MetricResult:
        dims = int(math.prod(tok.image_shape))
        card.update({"n_images": int(codes.shape[0]), "codes_per_image": int(codes.shape[1]),
                     "pixel_dims": dims, "source": source})
        return tokenloom.MetricResult({"nll_bits_per_image": bits, "nll_bits_per_dim": bits / dims,
                                       "nll_bits_per_token": bits / codes.shape[1]}, card)

    @staticmethod
    def _cond(ctx: tokenloom.MetricContext, n: int) -> torch.Tensor:
        labels = ctx.real_labels
        if labels is not None:
            labels = torch.as_tensor(labels).long().flatten()
            if len(labels) < n:
                raise tokenloom.InputError(f"nll: {len(labels)} labels for {n} held-out code sequences")
            return labels[:n].cpu()
        n_classes = getattr(ctx.data, "n_classes", None)
        if n_classes is None:
            raise tokenloom.InputError("nll: the context needs real_labels (or data.n_classes for the null class)")
        return torch.full((n,), int(n_classes), dtype=torch.long)  # the null class: unconditional likelihood


@tokenloom.hookimpl
def register_metrics(register):
    register("nll", NLL)
