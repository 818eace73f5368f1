"""Shared machinery of the speculative decoding family (``speculative``,
``sjd``): the sampler chain applied over a window of positions, the
draft-then-verify step, and the statistics every such loop reports. The
raster target's spec, teacher forcing, likelihood and plain decoding loop are
:mod:`tokenloom.orders`' raster recipe (re-exported here: ``raster_spec``,
``raster_training_batch``, ``raster_log_likelihood``,
``autoregressive_decode``), the very one the ``raster`` order runs.

Speculative sampling (Leviathan, Kalman & Matias 2023, "Fast Inference from
Transformers via Speculative Decoding", https://arxiv.org/abs/2211.17192;
Chen et al. 2023, https://arxiv.org/abs/2302.01318): drafted tokens
``d_j ~ q_j`` are judged left to right against the target's ``p_j``; the
first rejected one is replaced by a draw from the acceptance rule's residual,
and when every draft is accepted the target's next distribution gives one
more token for free. With the ``exact`` rule (u < min(1, p/q), residual
norm(max(p − q, 0))) the committed tokens are distributed exactly as
next-token sampling from ``p`` — for *any* ``q``, as long as each draft is a
fresh sample from its ``q`` (or a fixed token with ``q`` one-hot on it).

``p`` and ``q`` are the *processed* distributions: the run's sampler chain
(guidance, temperature, top-k, ...) is applied to both, position by position
with the decoding step the raster order would give it, so exactness holds
for the distribution the user asked for; a greedy chain makes both one-hot,
and speculative decoding then reproduces greedy decoding token for token.

Every loop here keeps a row's state (its committed length, drafts, KV-cache
prefix) to itself and draws all its randomness from the run's
:class:`~tokenloom.rng.RowRNG` at ``(iteration, stream)``, so image *i*
depends only on ``(seed, i)``, never on its batch neighbours.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

import torch

from ..contract.interfaces import (
    RNG,
    AcceptanceRule,
    Backbone,
    Chain,
    Generator,
    ModelSpec,
    StepInfo,
    TrainBatch,
)
from .orders import (
    raster_decode,
    raster_log_likelihood,
    raster_spec,
    raster_training_batch,
    refuse_known,
)
from .rng import RowRNG
from .sampling import ExactRule, SamplerChain

#: Plain next-token decoding, the baseline every speed-up is measured against:
#: :func:`tokenloom.orders.raster_decode` (the ``raster`` order's own loop).
autoregressive_decode = raster_decode
#: The error of ``known=`` given to an order that cannot keep codes: :func:`tokenloom.orders.refuse_known`.
check_not_known = refuse_known

#: RowRNG stream of the speculative loops: iteration t of image i draws all
#: its uniforms at once, ``rng.uniform(t, n, stream=STREAM)``, and
#: :class:`Noise` hands out disjoint slices of them.
STREAM = 101


# ---------------------------------------------------------------------------
# Distributions over a window of positions
# ---------------------------------------------------------------------------


def process_window(chain: SamplerChain, logits: torch.Tensor, positions: torch.Tensor, n_steps: int,
                   uncond: torch.Tensor | None = None) -> torch.Tensor:
    """Apply the chain to ``logits`` ``[B, K, V]`` whose entry ``(b, k)``
    predicts flat position ``positions[b, k]``: every position gets the
    :class:`StepInfo` plain raster decoding would give it (``step`` = the
    position), so scheduled processors (CFG ramps, temperature schedules)
    see the same step; a chain whose processors all declare
    ``depends_on_step() == False`` is called once for every position.
    Positions ``>= n_steps`` (padding past the end) are processed as the
    last one. Returns processed logits ``[B, K, V]``."""
    B, K, V = logits.shape
    pos = positions.clamp(0, n_steps - 1)
    flat_logits = logits.reshape(B * K, V)
    flat_uncond = uncond.reshape(B * K, V) if uncond is not None else None
    flat_pos = pos.reshape(-1)
    if not chain.depends_on_step:  # no schedule in the chain: one call for every position
        info = StepInfo(step=int(flat_pos.min()), n_steps=n_steps, positions=flat_pos, uncond_logits=flat_uncond)
        return chain(flat_logits, info).reshape(B, K, V)
    out = torch.empty_like(flat_logits)
    for t in torch.unique(flat_pos).tolist():
        sel = (flat_pos == t).nonzero().flatten()
        info = StepInfo(step=int(t), n_steps=n_steps, positions=flat_pos[sel],
                        uncond_logits=flat_uncond[sel] if flat_uncond is not None else None)
        out[sel] = chain(flat_logits[sel], info)
    return out.reshape(B, K, V)


def to_probs(chain: SamplerChain, processed: torch.Tensor) -> torch.Tensor:
    """The processed distribution as float64 probabilities (one-hot at the
    argmax for a greedy chain)."""
    if chain.greedy:
        return torch.nn.functional.one_hot(processed.argmax(-1), processed.shape[-1]).double()
    return torch.softmax(processed.double(), dim=-1)


class Noise:
    """All uniforms of one decoding iteration, drawn in one
    ``rng.uniform(step, n, stream=STREAM)`` call (one counter-based hash
    pass instead of one per use) and handed out in order: each named use
    takes the next disjoint slice, so every number is a pure function of
    (seed, image, iteration, use) — the same for an image alone or in any
    batch, as long as the loop asks for the same slices in the same order."""

    def __init__(self, rng: RowRNG, step: int, sizes: dict[str, tuple[int, ...]], device: torch.device):
        total = sum(_numel(s) for s in sizes.values())
        u = rng.uniform(step, total, stream=STREAM).to(device)  # (B, total) in (0, 1)
        self._parts, start = {}, 0
        for name, shape in sizes.items():
            n = _numel(shape)
            self._parts[name] = u[:, start : start + n].reshape(u.shape[0], *shape)
            start += n

    def uniform(self, name: str) -> torch.Tensor:
        return self._parts[name]

    def gumbel(self, name: str) -> torch.Tensor:
        return -torch.log(-torch.log(self._parts[name].double())).float()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def draw(chain: SamplerChain, processed: torch.Tensor, gumbel: torch.Tensor) -> torch.Tensor:
    """The chain's final draw from processed logits ``[B, V]`` or
    ``[B, K, V]`` with the given Gumbel noise of the same shape — the
    Gumbel-max draw of ``RowRNG.categorical`` (argmax when greedy)."""
    if chain.greedy:
        return processed.argmax(-1)
    return torch.argmax(processed.float() + gumbel, dim=-1)


def draw_from_probs(chain: SamplerChain, probs: torch.Tensor, gumbel: torch.Tensor) -> torch.Tensor:
    """One draw per row from probabilities ``[B, V]`` (argmax when greedy)."""
    if chain.greedy:
        return probs.argmax(-1)
    return torch.argmax(torch.log(probs.double()).float() + gumbel, dim=-1)


# ---------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------


def acceptance_rule(chain: SamplerChain) -> AcceptanceRule:
    """The chain's acceptance rule, or exact acceptance when it has none."""
    return chain.acceptance if chain.acceptance is not None else ExactRule()


def verify(rule: Any, chain: SamplerChain, p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor,
           n_valid: torch.Tensor, u: torch.Tensor, gumbel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Judge drafts left to right and draw the token after the accepted prefix.

    ``p``: ``[B, K + 1, V]`` target probabilities (entry k for draft k, entry
    K for the position after the window); ``q``: ``[B, K, V]`` the
    distributions the drafts ``[B, K]`` were drawn from; ``n_valid``: ``[B]``
    how many drafts lie inside the image (the rest is padding past the end);
    ``u``: ``[B, K]`` acceptance uniforms; ``gumbel``: ``[B, V]`` noise of the
    draw after the accepted prefix.

    Returns ``(n_accepted [B], next_token [B], rejected [B])``: the accepted
    prefix length ``a``; the token for slot ``a`` — drawn from the rule's
    residual at the first rejection, otherwise from ``p[:, a]`` (the bonus
    token; meaningless when ``a == n_valid < K``, i.e. past the end); and
    whether a draft was rejected."""
    B, K, V = q.shape
    ok = rule.accept(p[:, :K].reshape(B * K, V), q.reshape(B * K, V), drafts.reshape(-1),
                     u.reshape(-1).to(p.device)).reshape(B, K)
    ok = ok & (torch.arange(K, device=p.device)[None, :] < n_valid[:, None])
    a = ok.long().cumprod(-1).sum(-1)  # (B,) accepted prefix
    rejected = a < n_valid
    rows = torch.arange(B, device=p.device)
    slot = a.clamp(max=K - 1)
    residual = rule.residual(p[rows, slot], q[rows, slot], drafts[rows, slot]).double()  # (B, V)
    target = torch.where(rejected[:, None], residual, p[rows, a])
    nxt = draw_from_probs(chain, target, gumbel)
    return a, nxt, rejected


# ---------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------


class SpeculativeStats:
    """Counters accumulated over ``generate`` calls (one per micro-batch)
    until :meth:`reset`; :meth:`as_dict` gives the run statistics:

    - ``acceptance_rate``: accepted drafts / drafts the rule judged (each
      verification judges its accepted prefix and at most one rejection) —
      the per-token acceptance probability, comparable between rules;
    - ``mean_accepted_length``: tokens committed per verification pass (the
      accepted drafts plus the resampled or bonus token), ≥ 1;
    - ``nfe_per_image``: target forward passes per image (a batch takes as
      many as its slowest image); ``draft_nfe_per_image`` for a draft model;
    - ``drafted_per_image``: drafted tokens per image inside the image;
    - ``speedup_nfe`` = L / ``nfe_per_image`` against next-token decoding;
    - with a baseline measured: ``baseline_seconds_per_image``,
      ``speculative_seconds_per_image`` and ``speedup_wallclock``.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.images = 0
        self.tokens = 0
        self.passes = 0  # per-image verification passes, summed over images
        self.draft_passes = 0
        self.judged = 0
        self.accepted = 0
        self.drafted = 0
        self.seconds = 0.0
        self.baseline_seconds = 0.0
        self.baseline_images = 0

    def record(self, *, accepted: torch.Tensor, rejected: torch.Tensor, committed: torch.Tensor,
               drafted: torch.Tensor, draft_passes: int = 0) -> None:
        """One verification pass of the rows in it (tensors ``[B]``)."""
        self.passes += int(accepted.numel())
        self.draft_passes += draft_passes * int(accepted.numel())
        self.accepted += int(accepted.sum())
        self.judged += int(accepted.sum() + rejected.long().sum())
        self.tokens += int(committed.sum())
        self.drafted += int(drafted.sum())

    def as_dict(self, L: int) -> dict[str, float]:
        if self.images == 0:
            return {}
        out = {
            "acceptance_rate": self.accepted / self.judged if self.judged else 0.0,
            "mean_accepted_length": self.tokens / self.passes if self.passes else 0.0,
            "nfe_per_image": self.passes / self.images,
            "drafted_per_image": self.drafted / self.images,
            "speedup_nfe": L * self.images / self.passes if self.passes else 0.0,
        }
        if self.draft_passes:
            out["draft_nfe_per_image"] = self.draft_passes / self.images
        if self.baseline_images:
            out["baseline_seconds_per_image"] = self.baseline_seconds / self.baseline_images
            out["speculative_seconds_per_image"] = self.seconds / self.images
            out["speedup_wallclock"] = (self.baseline_seconds / self.baseline_images) / max(
                self.seconds / self.images, 1e-12)
        return out


# ---------------------------------------------------------------------------
# The base of the family: a raster model decoded faster
# ---------------------------------------------------------------------------


class SpeculativeOrder(Generator):
    """Base of the orders that decode a plain raster model faster (``sjd``,
    ``speculative``): the model, its teacher forcing and its exact likelihood
    are the raster recipe's (so they share ``raster``'s trained model), and
    :meth:`generate` times the subclass's :meth:`decode`, keeps the
    :class:`SpeculativeStats` that :meth:`stats` reports and, with a config
    field ``baseline = true``, times plain next-token decoding beside it.
    ``name`` is the registered name (for messages)."""

    exact_likelihood = True  # the raster model's likelihood (decoding is exact with the exact rule)
    name: ClassVar[str] = "speculative"

    def __init__(self, config: Any, *, tokenizer: Any):
        super().__init__(config, tokenizer=tokenizer)
        self.L = tokenizer.layout.length
        self.V = tokenizer.vocab_size
        self._stats = SpeculativeStats()

    def model_spec(self) -> ModelSpec:
        return raster_spec(self.tokenizer)

    def training_batch(self, codes: torch.Tensor, cond: torch.Tensor) -> TrainBatch:
        return raster_training_batch(codes, cond, self.L, self.V, where=f"{self.name}.training_batch: codes")

    def log_likelihood(self, model: Backbone, codes: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return raster_log_likelihood(model, codes, cond, self.L, self.V, where=f"{self.name}.log_likelihood: codes")

    def stats(self) -> dict[str, float]:
        """Acceptance statistics of the ``generate`` calls since
        :meth:`reset_stats` (see :class:`SpeculativeStats`)."""
        return self._stats.as_dict(self.L)

    def reset_stats(self) -> None:
        self._stats.reset()

    def generate(self, model: Backbone, chain: Chain, cond: torch.Tensor, *, rng: RNG,
                 known: Any = None) -> torch.Tensor:
        check_not_known(self.name, known)
        t0 = time.perf_counter()
        codes = self.decode(model, chain, cond, rng)
        self._stats.seconds += time.perf_counter() - t0
        self._stats.images += cond.shape[0]
        if self.config.baseline:
            self._stats.baseline_seconds += time_baseline(model, chain, cond, rng, self.L)
            self._stats.baseline_images += cond.shape[0]
        return codes

    def decode(self, model: Backbone, chain: Chain, cond: torch.Tensor, rng: RNG) -> torch.Tensor:
        """The order's decoding loop: ``LongTensor[B, L]``."""
        raise NotImplementedError


# ---------------------------------------------------------------------------
# Plain next-token decoding (the baseline every speed-up is measured against)
# ---------------------------------------------------------------------------


def time_baseline(model: Any, chain: SamplerChain, cond: torch.Tensor, rng: RowRNG, L: int) -> float:
    """Wall-clock seconds of plain raster decoding (:func:`autoregressive_decode`)
    on the bare backbone behind ``model`` (not counted by the instrumentation)."""
    inner = getattr(model, "model", model)
    if next(inner.parameters()).is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    autoregressive_decode(inner, chain, cond, rng, L)
    if next(inner.parameters()).is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0




__all__ = [
    "STREAM",
    "ExactRule",
    "Noise",
    "SpeculativeOrder",
    "SpeculativeStats",
    "acceptance_rule",
    "autoregressive_decode",
    "check_not_known",
    "draw",
    "draw_from_probs",
    "process_window",
    "raster_log_likelihood",
    "raster_spec",
    "raster_training_batch",
    "time_baseline",
    "to_probs",
    "verify",
]
