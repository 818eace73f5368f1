"""``gsd``: grouped speculative decoding (So et al. 2025, "Grouped
Speculative Decoding for Autoregressive Image Generation",
https://arxiv.org/abs/2508.07747).

Instead of judging the drafted token x̃ alone, GSD judges the *group* G of
tokens that are interchangeable with it, built dynamically for every
decision (the paper found static clusters ineffective):

1. candidates: the tokens ranked within ``rank_window`` places of x̃ in the
   target's distribution p;
2. kept when their probability gap to x̃ is small, |p(y) − p(x̃)| ≤ ``max_gap``,
3. and when they are close to x̃ in the AR model's own token-embedding space,
   cosine similarity ≥ ``min_similarity``.

x̃ is accepted when u < min(1, Σ_G p / Σ_G q); on rejection the replacement
is drawn from norm(max(p − q, 0)) as in exact sampling. A group of one
(``rank_window = 0``) is exact acceptance. Unlike LANTERN it is not bounded
below by exact acceptance: Σ_G p / Σ_G q can be smaller than p(x̃)/q(x̃).
"""

from __future__ import annotations

import attrs
import torch

import tokenloom
from tokenloom.sampling import speculative_residual


class GSD(tokenloom.AcceptanceRule):
    @attrs.frozen
    class Config:
        rank_window: int = attrs.field(default=8, validator=attrs.validators.ge(0))
        max_gap: float = attrs.field(default=0.05, validator=attrs.validators.ge(0.0))
        min_similarity: float = attrs.field(default=0.0, validator=[attrs.validators.ge(-1.0), attrs.validators.le(1.0)])

    def __init__(self, config: Config):
        super().__init__(config)
        self.unit_embeddings: torch.Tensor | None = None  # [V, D], l2-normalised

    def bind(self, context: tokenloom.SamplerContext) -> None:
        emb = context.token_embeddings
        if emb is None:
            raise tokenloom.ConfigError("gsd needs the AR model's token embeddings (none in the sampler context)")
        emb = emb.detach().float()[: context.vocab_size]
        self.unit_embeddings = torch.nn.functional.normalize(emb, dim=-1)

    def group(self, p: torch.Tensor, drafted: torch.Tensor) -> torch.Tensor:
        """``BoolTensor[B, V]``: the group of each row's drafted token."""
        B, V = p.shape
        p = p.double()
        rank = torch.empty_like(p, dtype=torch.long)
        order = p.argsort(dim=-1, descending=True, stable=True)
        rank.scatter_(-1, order, torch.arange(V, device=p.device).expand(B, V))
        r0 = rank.gather(-1, drafted[:, None])
        p0 = p.gather(-1, drafted[:, None])
        near = (rank - r0).abs() <= self.config.rank_window
        close_p = (p - p0).abs() <= self.config.max_gap
        if self.config.rank_window > 0:
            if self.unit_embeddings is None:
                raise tokenloom.ConfigError("gsd: bind() was not called with the model's token embeddings")
            e = self.unit_embeddings.to(p.device)
            if e.shape[0] != V:
                raise tokenloom.InputError(f"gsd: bound to {e.shape[0]} token embeddings, got distributions over {V}")
            sim = (e[drafted] @ e.T).double()  # (B, V) cosine similarity to the draft
            close_e = sim >= self.config.min_similarity
        else:
            close_e = torch.ones_like(near)
        g = near & close_p & close_e
        g.scatter_(-1, drafted[:, None], True)
        return g

    def accept(self, p: torch.Tensor, q: torch.Tensor, drafted: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        g = self.group(p, drafted)
        pg = (p.double() * g).sum(-1)
        qg = (q.double() * g).sum(-1)
        return u.double() * qg < pg

    def residual(self, p: torch.Tensor, q: torch.Tensor, drafted: torch.Tensor | None = None) -> torch.Tensor:
        return speculative_residual(p, q)


@tokenloom.hookimpl
def register_samplers(register):
    register("gsd", GSD)
