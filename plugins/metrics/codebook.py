"""``codebook``: how much of the tokenizer's vocabulary the data actually
uses — utilisation and perplexity of the code histogram, the standard
diagnostics of codebook collapse in VQ tokenizers (van den Oord et al. 2017,
https://arxiv.org/abs/1711.00937; reported for VQGAN/ViT-VQGAN, Yu et al.
2022, https://arxiv.org/abs/2110.04627, and the FSQ/LFQ papers).

Over every position of the codes of the real images (``ctx.codes``,
``[N, L]``) with vocabulary ``V = ctx.tokenizer.vocab_size``:

- ``codebook_utilisation``: the fraction of the V codes used at least once;
- ``codebook_perplexity``: exp(H(p)) with p the empirical code frequencies —
  the effective number of codes in use, between 1 and min(V, N·L).

Both depend on how many codes were counted (a small sample under-counts
rare codes), so the card records N and L.

A continuous tokenizer (``kl``, ``patch``: float tokens, no vocabulary) has
no codebook: both values are None ("not applicable", the card says why) —
never a number made up from float latents.
"""

from __future__ import annotations

import attrs
import torch

import tokenloom

_KEYS = ("codebook_utilisation", "codebook_perplexity")


class Codebook(tokenloom.Metric):
    requires = frozenset({"codes", "tokenizer"})
    card_name = "codebook"

    @attrs.frozen
    class Config:
        pass

    def compute(self, ctx: tokenloom.MetricContext) -> tokenloom.MetricResult:
        tok = ctx.tokenizer
        if getattr(tok, "continuous", False):
            return tokenloom.MetricResult(dict.fromkeys(_KEYS), self.card(
                not_applicable=f"{type(tok).__name__} gives continuous tokens: no codebook to count",
                token_dim=int(getattr(tok, "token_dim", 0))))
        vocab = getattr(tok, "vocab_size", None)
        if not isinstance(vocab, int) or vocab < 1:
            raise tokenloom.InputError("codebook: the context needs the tokenizer (for its vocab_size)")
        codes = ctx.codes
        if codes is None:
            raise tokenloom.InputError("codebook: the context has no codes")
        length = tok.layout.length if getattr(tok, "layout", None) is not None else (
            codes.shape[1] if isinstance(codes, torch.Tensor) and codes.dim() == 2 else -1)
        codes = tokenloom.check_codes(codes, length, vocab, where="codebook: ctx.codes")
        if codes.numel() == 0:
            raise tokenloom.InputError("codebook: no codes to count")
        counts = torch.bincount(codes.flatten().cpu(), minlength=vocab).double()  # (V,)
        p = counts / counts.sum()
        entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
        values = {
            "codebook_utilisation": float((counts > 0).sum().item() / vocab),
            "codebook_perplexity": float(torch.tensor(entropy).exp().item()),
        }
        return tokenloom.MetricResult(values, self.card(
            vocab_size=vocab, n_images=int(codes.shape[0]), codes_per_image=int(codes.shape[1]),
            source="codes of the real images (ctx.codes)"))


@tokenloom.hookimpl
def register_metrics(register):
    register("codebook", Codebook)
