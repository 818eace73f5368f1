"""``next-cell``: next-cell prediction with k×k cells — the discrete
variant of xAR's "next-X" prediction (Ren et al. 2025, "Beyond Next-Token:
Next-X Prediction for Autoregressive Visual Generation",
https://arxiv.org/abs/2502.20388). xAR itself predicts continuous tokens
with a flow-matching head and noisy-context training; this order keeps its
*cell* entity — a k×k group of neighbouring tokens generated in one pass —
on discrete codes with a categorical head, and has no noisy context.

The token grid is cut into k×k cells (``cell`` must divide the grid height
and width), visited in raster order over the cell grid; inside a cell the
codes are in raster order (residual depth minor).

**Training.** Teacher forcing over cells: ``[cls, START × n, cell_0, ...,
cell_{G-2}]`` with ``n = k²·depth`` codes per cell and ``G`` cells; each
token of cell g predicts the token at the same offset of cell g + 1 (the
START block, a learned token at the positions of cell 0, predicts cell 0).
Attention is block-causal over cells: a cell is seen whole by its own
tokens and by every later cell, never by the tokens that predict it.

**Decoding.** One forward pass per cell with a KV cache: NFE = G =
(h/k)·(w/k). Classifier-free guidance rows share the pass.

No exact likelihood is reported (LITERATURE: block orders report none).
"""

from __future__ import annotations

import attrs
import torch

import tokenloom
from tokenloom.orders import GroupOrder, flat_index, grid_of, refuse_known


class NextCellGenerator(tokenloom.Generator):
    exact_likelihood = False

    @attrs.frozen
    class Config:
        cell: int = attrs.field(default=2, validator=attrs.validators.ge(1))

    def __init__(self, config: Config, *, tokenizer: tokenloom.Tokenizer):
        super().__init__(config, tokenizer=tokenizer)
        h, w, depth = grid_of(tokenizer, "next-cell")
        k = config.cell
        if h % k or w % k:
            raise tokenloom.ConfigError(
                f"next-cell: cell = {k} does not divide the token grid {h}×{w} (a k×k cell must tile it)")
        self.L, self.V = tokenizer.layout.length, tokenizer.vocab_size
        idx = flat_index(h, w, depth).reshape(h // k, k, w // k, k, depth)  # (cell row, r, cell col, c, d)
        order = idx.permute(0, 2, 1, 3, 4).flatten()  # cell-major, raster inside a cell
        self.groups = GroupOrder(order, k * k * depth, vocab_size=self.V, layout=tokenizer.layout,
                                 train_order="next-cell")

    def model_spec(self) -> tokenloom.ModelSpec:
        return self.groups.model_spec(cell=self.config.cell)

    def expected_nfe(self) -> int:
        return self.groups.G

    def training_batch(self, codes: torch.Tensor, cond: torch.Tensor) -> tokenloom.TrainBatch:
        codes = tokenloom.check_codes(codes, self.L, self.V, where="next-cell.training_batch: codes")
        return self.groups.training_batch(codes, cond)

    def generate(self, model, chain, cond, *, rng, known=None) -> torch.Tensor:
        refuse_known("next-cell", known)
        return self.groups.generate(model, chain, cond, rng)


@tokenloom.hookimpl
def register_generators(register):
    register("next-cell", NextCellGenerator)
