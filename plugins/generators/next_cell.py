"""``next-cell``: next-cell prediction with k×k cells — xAR's "next-X"
prediction with X = a cell (Ren et al. 2025, "Beyond Next-Token: Next-X
Prediction for Autoregressive Visual Generation",
https://arxiv.org/abs/2502.20388). One plugin for both token kinds.

The token grid is cut into k×k cells (``cell`` must divide the grid height
and width), visited in raster order over the cell grid; inside a cell the
tokens are in raster order (residual depth minor).

**Training.** Teacher forcing over cells: ``[cls, START × n, cell_0, ...,
cell_{G-2}]`` with ``n = k²·depth`` tokens per cell and ``G`` cells; each
token of cell g predicts the token at the same offset of cell g + 1 (the
START block, a learned token at the positions of cell 0, predicts cell 0).
Attention is block-causal over cells: a cell is seen whole by its own
tokens and by every later cell, never by the tokens that predict it.

**Decoding.** One forward pass per cell with a KV cache: NFE = G =
(h/k)·(w/k). Classifier-free guidance rows share the pass.

**Discrete codes** (a categorical head): the discrete stand-in of xAR — its
cell entity on VQ codes, no noisy context.

**Continuous tokens — xAR's own formulation.** With a continuous tokenizer
(``kl``, ``patch``) the inputs are the tokens (``[B, T, D + 1]``: the last
channel flags the START block, so the input projection learns the START
token) and the targets are the tokens of the next cell; the backbone's
hidden state at each of the cell's n positions conditions the run's head
(``[head] name = "flow"``: flow matching, Euler steps), which draws that
token — the k×k tokens of a cell are predicted together in one backbone
pass, each by the head conditioned on its own hidden state. ``cfg``'s
guidance (scale and schedule over cells) applies to the head's velocity;
head steps are counted apart by core (NFE stays G backbone passes).
``noisy_context = true`` is xAR's *noisy context learning*: in training,
every context cell is replaced by ``t·x + (1 − t)·ε`` at its own noise
level ``t ~ U(0, 1)`` (per image and cell), so the model is trained on
imperfect context as it meets at inference (where the context is the
clean generated cells). Differences from the reference (only the README of
``OliverRensu/xAR`` is stored here, so this follows the paper and
``LITERATURE.md``): xAR runs the flow through its whole transformer —
every Euler step is a backbone pass over the noisy current cell, so its
NFE is cells × steps — and its noisy context shares the flow's time
schedule; here the backbone runs once per cell and a small per-token flow
head does the steps, the structure of MAR/FlowAR, so backbone cost and
head cost are counted apart and compared at equal backbone FLOPs.

No exact likelihood is reported (LITERATURE: block orders report none; a
flow head has none either).
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch

import tokenloom
from tokenloom.orders import GroupOrder, flat_index, grid_of, refuse_known


class NextCellGenerator(tokenloom.Generator):
    exact_likelihood = False
    continuous_ok = True  # xAR: continuous tokens with a flow head

    @attrs.frozen
    class Config:
        cell: int = attrs.field(default=2, validator=attrs.validators.ge(1))
        #: xAR's noisy context learning (continuous tokens only)
        noisy_context: bool = False
        #: options added with continuous tokens: left out of cache keys at these defaults
        later_defaults: ClassVar[dict] = {"noisy_context": False}

    def __init__(self, config: Config, *, tokenizer: tokenloom.Tokenizer):
        super().__init__(config, tokenizer=tokenizer)
        h, w, depth = grid_of(tokenizer, "next-cell")
        k = config.cell
        if h % k or w % k:
            raise tokenloom.ConfigError(
                f"next-cell: cell = {k} does not divide the token grid {h}×{w} (a k×k cell must tile it)")
        self.continuous = bool(getattr(tokenizer, "continuous", False))
        if config.noisy_context and not self.continuous:
            raise tokenloom.ConfigError(
                "next-cell: noisy_context = true needs continuous tokens (xAR's noisy context learning "
                "noises continuous tokens; the tokenizer is discrete)")
        self.L, self.V = tokenizer.layout.length, tokenizer.vocab_size
        self.token_dim = int(tokenizer.token_dim) if self.continuous else 0
        idx = flat_index(h, w, depth).reshape(h // k, k, w // k, k, depth)  # (cell row, r, cell col, c, d)
        order = idx.permute(0, 2, 1, 3, 4).flatten()  # cell-major, raster inside a cell
        self.groups = GroupOrder(order, k * k * depth, vocab_size=self.V, layout=tokenizer.layout,
                                 train_order="next-cell", token_dim=self.token_dim)

    def model_spec(self) -> tokenloom.ModelSpec:
        if self.config.noisy_context:  # a different training recipe: a model of its own
            return self.groups.model_spec(cell=self.config.cell, noisy_context=True)
        return self.groups.model_spec(cell=self.config.cell)

    def expected_nfe(self) -> int:
        return self.groups.G

    def training_batch(self, codes: torch.Tensor, cond: torch.Tensor) -> tokenloom.TrainBatch:
        if self.continuous:
            latents = tokenloom.check_latents(codes, self.L, self.token_dim,
                                              where="next-cell.training_batch: latents")
            return self.groups.training_batch(latents, cond, context_noise=self.config.noisy_context)
        codes = tokenloom.check_codes(codes, self.L, self.V, where="next-cell.training_batch: codes")
        return self.groups.training_batch(codes, cond)

    def generate(self, model, chain, cond, *, rng, known=None) -> torch.Tensor:
        refuse_known("next-cell", known)
        return self.groups.generate(model, chain, cond, rng)


@tokenloom.hookimpl
def register_generators(register):
    register("next-cell", NextCellGenerator)
