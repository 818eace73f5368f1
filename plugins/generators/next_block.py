"""``next-block``: next-block prediction, semi-autoregressive — NBP (Ren
et al. 2025, "Next Block Prediction: Video Generation via
Semi-Autoregressive Modeling", https://arxiv.org/abs/2502.07737).

The token grid is cut into equal blocks of ``rows`` full rows (NBP's blocks
are rows, or frames for video); ``rows`` must divide the grid height.

**Training.** Teacher forcing over the blocks in raster order: the sequence
is ``[cls, START × n, block_0, ..., block_{G-2}]`` (``n`` codes per block,
``G`` blocks; ``T = L + 1``), and every token of block g predicts **the
token at the same offset of block g + 1** — the decisive detail of NBP —
while the START block (one learned token placed at the positions of block
0) predicts block 0. Attention is block-causal: causal between blocks,
bidirectional inside one, so a token sees its whole block and every earlier
block, never the block it predicts.

**Decoding.** One forward pass per block with a KV cache (the block just
sampled is appended and predicts the next one): NFE = G = h / ``rows``.
With classifier-free guidance the conditional and null-class rows share the
pass.

No exact likelihood is reported (LITERATURE: block orders report none).
"""

from __future__ import annotations

import attrs
import torch

import tokenloom
from tokenloom.orders import GroupOrder, grid_of, refuse_known


class NextBlockGenerator(tokenloom.Generator):
    exact_likelihood = False

    @attrs.frozen
    class Config:
        rows: int = attrs.field(default=1, validator=attrs.validators.ge(1))

    def __init__(self, config: Config, *, tokenizer: tokenloom.Tokenizer):
        super().__init__(config, tokenizer=tokenizer)
        h, w, depth = grid_of(tokenizer, "next-block")
        if h % config.rows:
            raise tokenloom.ConfigError(
                f"next-block: rows = {config.rows} does not divide the token grid height {h} "
                f"(grid {h}×{w}; choose a divisor of {h})")
        self.L, self.V = tokenizer.layout.length, tokenizer.vocab_size
        self.groups = GroupOrder(torch.arange(self.L), config.rows * w * depth, vocab_size=self.V,
                                 layout=tokenizer.layout, train_order="next-block")

    def model_spec(self) -> tokenloom.ModelSpec:
        return self.groups.model_spec()

    def expected_nfe(self) -> int:
        return self.groups.G

    def training_batch(self, codes: torch.Tensor, cond: torch.Tensor) -> tokenloom.TrainBatch:
        codes = tokenloom.check_codes(codes, self.L, self.V, where="next-block.training_batch: codes")
        return self.groups.training_batch(codes, cond)

    def generate(self, model, chain, cond, *, rng, known=None) -> torch.Tensor:
        refuse_known("next-block", known)
        return self.groups.generate(model, chain, cond, rng)


@tokenloom.hookimpl
def register_generators(register):
    register("next-block", NextBlockGenerator)
