"""``gsd``: grouped speculative decoding (So et al. 2025, "Grouped
Speculative Decoding for Autoregressive Image Generation",
https://arxiv.org/abs/2508.07747).

Instead of judging the drafted token x̃ alone, GSD judges the *group* G of
tokens that are interchangeable with it, built dynamically for every
decision (the paper found static clusters ineffective):

1. candidates: the tokens up to ``rank_window`` places below x̃ (less
   probable) and up to ``rank_window_above`` places above it in the
   target's distribution p;
2. kept when their probability gap to x̃ is small, |p(y) − p(x̃)| <
   ``max_gap``;
3. and when they are close to x̃ in the AR model's own input token-embedding
   space: ``distance = "squared-l2"`` keeps ||e_y − e_x̃||² < ``max_distance``
   (raw embeddings), ``"cosine"`` keeps cosine similarity ≥
   ``min_similarity``.

x̃ is accepted when u < min(1, Σ_G p / Σ_G q); on rejection the replacement
is drawn from norm(max(p − q, 0)) as in exact sampling. A group of one
(``rank_window = 0``) is exact acceptance. Unlike LANTERN it is not bounded
below by exact acceptance: Σ_G p / Σ_G q can be smaller than p(x̃)/q(x̃).

**Reference.** The authors' code (junhyukso/GSD,
``scheduler/jacobi_iteration_lumina_mgpt.py``, the acceptance loop of its
speculative-Jacobi sampler): candidates ``sort(logits)[i − 7 : i + 7]`` (7
less probable, 6 more probable, i the draft's rank), ``p_thr = 0.15``
(strict), and ``d_thr = 0.5`` on the squared Euclidean distance between the
rows of ``model.embed_tokens.weight``. These are the defaults here (since
the issue-18 fix; before it: ±8 ranks, gap ≤ 0.05, cosine similarity ≥ 0).
Differs: the reference's distance threshold is tied to Lumina-mGPT's
embedding scale — a small tokenloom model's embeddings start at std 0.02
(squared distances ≈ 0.1 at d = 128, inside 0.5), so how selective the rule
is depends on how far training spreads them; ``distance = "cosine"`` is a
scale-free alternative. The
reference restricts the rule to image-token ids (< 10000 in Chameleon's
vocabulary) and falls back to exact acceptance when its slice fails at the
top or bottom of the ranking; here the window is clipped at the ends.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import torch

import tokenloom
from tokenloom.sampling import speculative_residual


class GSD(tokenloom.AcceptanceRule):
    exact_settings: ClassVar[dict[str, Any]] = {"rank_window": 0, "rank_window_above": 0}

    @attrs.frozen
    class Config:
        #: candidates below the draft in p's ranking (the reference: 7)
        rank_window: int = attrs.field(default=7, validator=attrs.validators.ge(0))
        #: candidates above it; None = rank_window − 1 (the reference's slice [i − 7, i + 7))
        rank_window_above: int | None = attrs.field(default=None, validator=attrs.validators.optional(
            attrs.validators.ge(0)))
        #: |p(y) − p(x̃)| < max_gap (the reference's p_thr = 0.15)
        max_gap: float = attrs.field(default=0.15, validator=attrs.validators.ge(0.0))
        #: "squared-l2" (the reference: ||e_y − e_x̃||² < max_distance on raw embeddings) or "cosine"
        distance: str = attrs.field(default="squared-l2", validator=attrs.validators.in_(("squared-l2", "cosine")))
        max_distance: float = attrs.field(default=0.5, validator=attrs.validators.ge(0.0))  # the reference's d_thr
        min_similarity: float = attrs.field(default=0.0, validator=[attrs.validators.ge(-1.0), attrs.validators.le(1.0)])

    def __init__(self, config: Config):
        super().__init__(config)
        self.embeddings: torch.Tensor | None = None  # [V, D], the AR model's input embeddings
        self.unit_embeddings: torch.Tensor | None = None  # [V, D], l2-normalised

    def bind(self, context: tokenloom.SamplerContext) -> None:
        emb = context.token_embeddings
        if emb is None:
            raise tokenloom.ConfigError("gsd needs the AR model's token embeddings (none in the sampler context)")
        emb = emb.detach().float()[: context.vocab_size]
        self.embeddings = emb
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
        cfg = self.config
        above = max(cfg.rank_window - 1, 0) if cfg.rank_window_above is None else cfg.rank_window_above
        offset = rank - r0  # > 0: less probable than the draft
        near = (offset <= cfg.rank_window) & (offset >= -above)
        close_p = (p - p0).abs() < cfg.max_gap
        if cfg.rank_window > 0 or above > 0:
            if self.unit_embeddings is None:
                raise tokenloom.ConfigError("gsd: bind() was not called with the model's token embeddings")
            e = self.unit_embeddings.to(p.device)
            if e.shape[0] != V:
                raise tokenloom.InputError(f"gsd: bound to {e.shape[0]} token embeddings, got distributions over {V}")
            if cfg.distance == "cosine":
                sim = (e[drafted] @ e.T).double()  # (B, V) cosine similarity to the draft
                close_e = sim >= cfg.min_similarity
            else:  # the reference: squared Euclidean distance between raw embeddings
                raw = self.embeddings.to(p.device)
                d2 = torch.cdist(raw[drafted].double(), raw.double()).pow(2)  # (B, V)
                close_e = d2 < cfg.max_distance
        else:
            close_e = torch.ones_like(near)
        g = near & close_p & close_e
        g.scatter_(-1, drafted[:, None], True)
        return g

    def neighbourhood(self, p: torch.Tensor, drafted: torch.Tensor) -> torch.Tensor:
        """The draft's group: the only tokens whose mass GSD counts for it."""
        return self.group(p, drafted)

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
