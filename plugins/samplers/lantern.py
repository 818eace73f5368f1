"""``lantern``: relaxed speculative acceptance through latent proximity
(Jang et al. 2025, "LANTERN: Accelerating Visual Autoregressive Models with
Relaxed Speculative Decoding", https://arxiv.org/abs/2410.03355).

Visual AR models spread probability thinly over interchangeable tokens
("token selection ambiguity"), so exact acceptance rejects good drafts.
LANTERN lets the drafted token x̃ borrow the target probability of its
nearest neighbours in the tokenizer's latent code space
(``code_embeddings()``): take the ``k`` nearest codes B_k(x̃) in order of
distance, and the longest prefix A ⊆ B_k(x̃) whose total target mass is at
most δ. The relaxed target p̃ moves that mass onto x̃
(p̃(x̃) = p(x̃) + Σ_A p, p̃(a) = 0 for a in A), so the total-variation
distance TV(p, p̃) = Σ_A p ≤ δ. Accept when u < min(1, p̃(x̃)/q(x̃)); on
rejection resample from norm(max(p̃ − q, 0)).

δ = 0 is exact acceptance; for the same u, LANTERN accepts whenever exact
acceptance does. The paper uses k ≈ 1000, δ ≈ 0.1–0.4 for 16k-code
tokenizers; our defaults suit small codebooks.

**Reference** (jadohu/LANTERN): the neighbours are the k nearest codes by
Euclidean distance between the VQ codebook vectors
(``entrypoints/generate_codebook.py``: ``cdist`` over
``vq_model.quantize.embedding.weight``), the relaxation as above in
``models/ea_model_llamagen.py`` (``lantern_k = 1000``, ``lantern_delta =
0.1`` by default in ``entrypoints/generate_images.py``). Kept: that rule.
Differs: the neighbours are computed on the tokenizer's ``code_embeddings()``
(for ``vq`` the l2-normalised codebook, which is what its lookup uses); the
reference's ``lantern_delta > 1`` mode (a budget relative to p(x̃)) is not
offered; and the reference drafts with EAGLE-2 trees, here the rule judges
``speculative``'s chain drafts or ``sjd``'s Jacobi drafts (see
``speculative``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import torch

import tokenloom
from tokenloom.sampling import speculative_residual


def _unit_interval(_inst, attribute, value):
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"must be in [0, 1], got {value}")


class Lantern(tokenloom.AcceptanceRule):
    exact_settings: ClassVar[dict[str, Any]] = {"delta": 0.0}

    @attrs.frozen
    class Config:
        k: int = attrs.field(default=16, validator=attrs.validators.ge(1))
        delta: float = attrs.field(default=0.1, validator=_unit_interval)

    def __init__(self, config: Config):
        super().__init__(config)
        self.neighbours: torch.Tensor | None = None  # LongTensor[V, k]

    def bind(self, context: tokenloom.SamplerContext) -> None:
        emb = context.code_embeddings
        if emb is None:
            raise tokenloom.ConfigError("lantern needs the tokenizer's code_embeddings() (none in the sampler context)")
        emb = emb.detach().float()
        V = emb.shape[0]
        k = min(self.config.k, V - 1)
        rows = []
        for chunk in torch.split(torch.arange(V), 1024):  # V×V distances in chunks
            d = torch.cdist(emb[chunk], emb)
            d[torch.arange(len(chunk)), chunk] = float("inf")  # a token is not its own neighbour
            rows.append(torch.topk(d, k, dim=-1, largest=False).indices if k > 0 else d[:, :0].long())
        self.neighbours = torch.cat(rows)

    def _moved_mass(self, p: torch.Tensor, drafted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mass moved onto the draft [B], the neighbours it came from [B, k] as a mask)."""
        if self.neighbours is None:
            raise tokenloom.ConfigError("lantern: bind() was not called with the tokenizer's code embeddings")
        if self.neighbours.shape[0] != p.shape[-1]:
            raise tokenloom.InputError(
                f"lantern: bound to a vocabulary of {self.neighbours.shape[0]} codes, got distributions over {p.shape[-1]}"
            )
        nb = self.neighbours.to(p.device)[drafted]  # (B, k)
        pn = p.double().gather(-1, nb)  # (B, k) in order of distance
        cum = pn.cumsum(-1)
        inside = cum <= self.config.delta  # longest prefix within the TV budget
        moved = (pn * inside).sum(-1)
        return moved, inside, nb

    def neighbourhood(self, p: torch.Tensor, drafted: torch.Tensor) -> torch.Tensor:
        """The draft and its ``k`` nearest codes: the only mass LANTERN moves onto it."""
        _, _, nb = self._moved_mass(p, drafted)
        out = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, nb, True)
        return out.scatter_(-1, drafted[:, None], True)

    def relaxed(self, p: torch.Tensor, drafted: torch.Tensor) -> torch.Tensor:
        """The relaxed target p̃ ``[B, V]`` for each row's drafted token."""
        moved, inside, nb = self._moved_mass(p, drafted)
        out = p.double().clone()
        out.scatter_(-1, nb, torch.where(inside, torch.zeros_like(moved)[:, None].expand_as(inside), out.gather(-1, nb)))
        out.scatter_add_(-1, drafted[:, None], moved[:, None])
        return out.to(p.dtype)

    def accept(self, p: torch.Tensor, q: torch.Tensor, drafted: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        moved, _, _ = self._moved_mass(p, drafted)
        px = p.double().gather(-1, drafted[:, None]).squeeze(-1) + moved
        qx = q.double().gather(-1, drafted[:, None]).squeeze(-1)
        return u.double() * qx < px

    def residual(self, p: torch.Tensor, q: torch.Tensor, drafted: torch.Tensor | None = None) -> torch.Tensor:
        if drafted is None:
            return speculative_residual(p, q)
        return speculative_residual(self.relaxed(p, drafted), q)


@tokenloom.hookimpl
def register_samplers(register):
    register("lantern", Lantern)
