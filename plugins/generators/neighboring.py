"""``neighboring``: next-neighbour prediction — NAR (He et al. 2025,
"Neighboring Autoregressive Modeling for Efficient Visual Generation",
https://arxiv.org/abs/2503.10696).

Generation is a progressive outpainting from the top-left token: tokens are
decoded in ascending Manhattan distance from it, so one anti-diagonal
``i + j = d`` is decoded per forward pass. NAR's decisive detail is its
**dimension-oriented decoding heads**: one output head per orthogonal
direction — head 0 predicts the next token to the *right* ``(i, j+1)``,
head 1 the next token *below* ``(i+1, j)`` — so every token of diagonal d
predicts its neighbours on diagonal d + 1 (the spec declares two heads).

**Training.** The sequence is ``[cls, x_(0,0), ..., x_(h-1,w-1)]`` (raster
order, ``T = L + 1``) under NAR's proximity mask: a token on diagonal d
attends to the class token and to every token on diagonals ≤ d (its own
diagonal included, bidirectionally), never to diagonal d + 1. The right
head of ``(i, j)`` is trained on ``x_(i,j+1)``, the down head on
``x_(i+1,j)`` (where those exist), and both heads of the class token on
``x_(0,0)``. Each head has its own cross-entropy (the trainer's per-head
loss); the reference implementation instead takes one cross-entropy of the
two heads' averaged logits — the same combination this order decodes with.

**Decoding.** Pass 0 feeds the class token and samples ``x_(0,0)`` from the
average of its two heads' logits. Pass d ≥ 1 feeds diagonal d − 1 (KV
cache) and samples all of diagonal d at once: a token of the first row
from the right head of its left neighbour, of the first column from the
down head of the token above, and every other token from the average of
both (as in the reference code). NFE = h + w − 1.

**Reference** (ThisisBillhe/NAR, ``NAR-images/autoregressive/models/gpt.py``,
``Transformer.__init__`` / ``forward``). Kept: the proximity mask, the class
token's two predictions averaged for ``x_(0,0)``, the first row from the right
head, the first column from the down head, the rest from the average of both;
and (since issue 18) the heads' structure: the *right* head (``norm``,
``output``) reads the hidden state after the ``n_layer`` blocks, the *down*
head has its own extra transformer block (``medusa_attention_num = 1``, run
after the others, KV-cached like them), its own norm (``medusa_norm``) and
output layer (``medusa_output``) — the backbone's spec option
``("head_blocks", (0, down_blocks))``, ``down_blocks = 1`` by default.
``down_blocks = 0`` restores the structure before the fix (both heads linear
layers on the backbone's one final hidden state and norm; it changes NAR's
numbers, see CHANGELOG). Differs: the reference's norms are RMSNorm and its
right output layer starts at zero (LlamaGen's init), tokenloom's LayerNorm
and normal(0.02); the reference trains one cross-entropy of the two heads'
averaged logits, tokenloom each head on its own target (above).

Needs one code per grid position (a layout of depth 1). No exact
likelihood is reported (LITERATURE: neighbour orders report none).
"""

from __future__ import annotations

import attrs
import torch

import tokenloom
from tokenloom.orders import grid_of, guidance_rows, refuse_known, sample_codes

RIGHT, DOWN = 0, 1


class NeighboringGenerator(tokenloom.Generator):
    exact_likelihood = False

    @attrs.frozen
    class Config:
        #: extra transformer blocks the down head has to itself (the reference's
        #: ``medusa_attention_num``); 0: both heads on one hidden state (before issue 18)
        down_blocks: int = attrs.field(default=1, validator=attrs.validators.ge(0))

    def __init__(self, config: Config, *, tokenizer: tokenloom.Tokenizer):
        super().__init__(config, tokenizer=tokenizer)
        self.h, self.w, _ = grid_of(tokenizer, "neighboring", allow_depth=False)
        self.L, self.V = tokenizer.layout.length, tokenizer.vocab_size
        r, c = torch.meshgrid(torch.arange(self.h), torch.arange(self.w), indexing="ij")
        self.diag = (r + c).flatten()  # (L,) Manhattan distance from (0, 0)

    def model_spec(self) -> tokenloom.ModelSpec:
        return tokenloom.ModelSpec(
            seq_len=self.L + 1,
            vocab_size=self.V,
            heads=(self.V, self.V),
            train_order="neighboring",
            attention="custom",
            cache_ops=frozenset({"append"}),
            layout=self.tokenizer.layout,
            extra=(("head_blocks", (0, self.config.down_blocks)),) if self.config.down_blocks else (),
        )

    def expected_nfe(self) -> int:
        return self.h + self.w - 1

    def attention_mask(self, device) -> torch.Tensor:
        """``BoolTensor[L + 1, L + 1]``: NAR's proximity mask over ``[cls,
        raster tokens]`` — diagonal d sees diagonals ≤ d and the class token."""
        d = torch.cat([torch.full((1,), -1), self.diag]).to(device)  # the class token: "diagonal -1"
        return d[None, :] <= d[:, None]

    def training_batch(self, codes: torch.Tensor, cond: torch.Tensor) -> tokenloom.TrainBatch:
        codes = tokenloom.check_codes(codes, self.L, self.V, where="neighboring.training_batch: codes")
        B, dev = codes.shape[0], codes.device
        h, w = self.h, self.w
        grid = codes.view(B, h, w)
        targets = torch.zeros(B, self.L + 1, 2, dtype=torch.long, device=dev)
        mask = torch.zeros(B, self.L + 1, 2, dtype=torch.bool, device=dev)
        targets[:, 0, :] = codes[:, :1]  # the class token predicts x_(0,0) with both heads
        mask[:, 0, :] = True
        right = torch.zeros(B, h, w, dtype=torch.long, device=dev)
        right[:, :, :-1] = grid[:, :, 1:]
        down = torch.zeros(B, h, w, dtype=torch.long, device=dev)
        down[:, :-1, :] = grid[:, 1:, :]
        has_right = torch.zeros(h, w, dtype=torch.bool, device=dev)
        has_right[:, :-1] = True
        has_down = torch.zeros(h, w, dtype=torch.bool, device=dev)
        has_down[:-1, :] = True
        targets[:, 1:, RIGHT], targets[:, 1:, DOWN] = right.flatten(1), down.flatten(1)
        mask[:, 1:, RIGHT] = has_right.flatten()
        mask[:, 1:, DOWN] = has_down.flatten()
        inputs = torch.cat([torch.zeros_like(codes[:, :1]), codes], 1)
        return tokenloom.TrainBatch(inputs=inputs, targets=targets, loss_mask=mask, cond=cond.long(),
                                    positions=torch.arange(-1, self.L, device=dev),
                                    attn_mask=self.attention_mask(dev))

    def generate(self, model, chain, cond, *, rng, known=None) -> torch.Tensor:
        refuse_known("neighboring", known)
        B, dev = cond.shape[0], model.device
        h, w = self.h, self.w
        cond = cond.to(dev).long()
        rows, guided = guidance_rows(cond, chain, model)
        R = rows.shape[0]
        n_steps = h + w - 1
        cache = model.new_cache(R, self.L + 1)
        codes = torch.zeros(B, self.L, dtype=torch.long, device=dev)
        # pass 0: the class token; x_(0,0) from the average of both heads
        right, down = model(torch.zeros(R, 1, dtype=torch.long, device=dev), rows,
                            positions=torch.full((1,), tokenloom.NO_POSITION, device=dev),
                            attn_mask=torch.ones(1, 1, dtype=torch.bool, device=dev), cache=cache)
        logits = (right + down) / 2  # (R, 1, V)
        first = torch.zeros(1, dtype=torch.long, device=dev)
        codes[:, :1] = sample_codes(chain, logits, rng, B=B, guided=guided, step=0, n_steps=n_steps,
                                    positions=first.expand(B, 1))
        prev = [(0, 0)]  # the diagonal just sampled, by ascending row
        for d in range(1, n_steps):
            src = torch.tensor([i * w + j for i, j in prev], device=dev)  # (k,) flat positions fed
            x = codes[:, src]
            x = x.repeat(2, 1) if guided else x
            S = cache.length + len(prev)
            right, down = model(x, rows, positions=src, cache=cache,
                                attn_mask=torch.ones(len(prev), S, dtype=torch.bool, device=dev))
            nxt = [(i, d - i) for i in range(max(0, d - w + 1), min(h - 1, d) + 1)]
            index = {p: t for t, p in enumerate(prev)}
            parts = []
            for i, j in nxt:  # right head of the left neighbour, down head of the one above
                got = []
                if j >= 1:
                    got.append(right[:, index[(i, j - 1)]])
                if i >= 1:
                    got.append(down[:, index[(i - 1, j)]])
                parts.append(sum(got) / len(got))
            logits = torch.stack(parts, 1)  # (R, k', V)
            where = torch.tensor([i * w + j for i, j in nxt], device=dev)
            codes[:, where] = sample_codes(chain, logits, rng, B=B, guided=guided, step=d, n_steps=n_steps,
                                           positions=where.expand(B, -1))
            prev = nxt
        return codes


@tokenloom.hookimpl
def register_generators(register):
    register("neighboring", NeighboringGenerator)
