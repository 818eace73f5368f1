"""``par``: parallelized autoregressive generation — PAR (Wang et al. 2025,
"Parallelized Autoregressive Visual Generation", CVPR 2025,
https://arxiv.org/abs/2412.15119).

The token grid is split into ``regions`` = k×k equal regions (PAR-4x: 2×2,
PAR-16x: 4×4). Adjacent tokens depend strongly on each other and distant
ones weakly, so PAR generates *the first token of every region
sequentially* (they fix the global layout), then *one token per region per
pass* — tokens at the same relative position of the n regions, far apart,
in parallel.

**Token order.** Position-major, region-minor: ``x_{t·n + r}`` is the t-th
token (raster inside the region, residual depth minor) of region r
(regions in raster order). Groups of n consecutive tokens share t.

**Training** (the reference code's sequence): ``[cls, x_0, ..., x_{n-1},
M_1, ..., M_{n-1}, x_n, ..., x_{L-n-1}]`` (``T = L``) where ``M_j`` are
n − 1 learned transition tokens (extra ids, no grid position) and the
output at index s predicts ``x_s``: the class token and ``x_0 … x_{n-2}``
predict the first tokens one by one; ``[x_{n-1}, M_1, ..., M_{n-1}]``
predict the first parallel group ``x_n … x_{2n-1}``; from then on every
token predicts the token one position further in its own region. The
attention mask is causal with PAR's *group-wise full attention*: a
parallel group ``[x_{n-1}, M…]`` or ``[x_{gn}, …, x_{gn+n-1}]`` attends to
itself bidirectionally (block-causal with blocks ``1 × n, n, n, ...``), so
each token sees the entire previous group.

**Decoding.** n sequential passes (the class token, then ``x_0 …
x_{n-2}``), then one pass per group with a KV cache: NFE = n + (L − n)/n.
``regions = 1`` is plain raster order. Classifier-free guidance rows share
each pass.

No exact likelihood is reported (tokens of a group are sampled
independently; LITERATURE lists block orders as reporting none).
"""

from __future__ import annotations

import math

import attrs
import torch

import tokenloom
from tokenloom.orders import flat_index, grid_of, guidance_rows, refuse_known, sample_codes


class ParGenerator(tokenloom.Generator):
    exact_likelihood = False

    @attrs.frozen
    class Config:
        regions: int = attrs.field(default=4, validator=attrs.validators.ge(1))

    def __init__(self, config: Config, *, tokenizer: tokenloom.Tokenizer):
        super().__init__(config, tokenizer=tokenizer)
        h, w, depth = grid_of(tokenizer, "par")
        n = config.regions
        k = math.isqrt(n)
        if k * k != n:
            raise tokenloom.ConfigError(f"par: regions = {n} must be a square number (k×k regions: 1, 4, 9, 16, ...)")
        if h % k or w % k:
            raise tokenloom.ConfigError(
                f"par: {k}×{k} regions do not tile the token grid {h}×{w} ({k} must divide both sides)")
        self.n = n
        self.L, self.V = tokenizer.layout.length, tokenizer.vocab_size
        idx = flat_index(h, w, depth).reshape(k, h // k, k, w // k, depth)  # (region row, r, region col, c, d)
        self.order = idx.permute(1, 3, 4, 0, 2).flatten()  # (L,) position-major, region-minor
        self.m = self.L // n  # tokens per region
        self.transition = list(range(self.V, self.V + n - 1))  # ids of M_1 ... M_{n-1}

    def block_sizes(self) -> tuple[int, ...]:
        return (1,) * self.n + (self.n,) * (self.m - 1)

    def model_spec(self) -> tokenloom.ModelSpec:
        return tokenloom.ModelSpec(
            seq_len=self.L,
            vocab_size=self.V + self.n - 1,
            n_extra_tokens=self.n - 1,
            heads=(self.V,),
            train_order="par",
            attention="block-causal",
            cache_ops=frozenset({"append"}),
            extra=(("block_sizes", self.block_sizes()), ("regions", self.n)),
            layout=self.tokenizer.layout,
        )

    def expected_nfe(self) -> int:
        return self.n + (self.L - self.n) // self.n

    def _sequence(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs ``[B, L]`` and positions ``[L]`` of the teacher-forcing
        sequence for codes ``x`` already in PAR order."""
        B, dev, n = x.shape[0], x.device, self.n
        order = self.order.to(dev)
        none = tokenloom.NO_POSITION
        M = torch.tensor(self.transition, dtype=torch.long, device=dev).expand(B, -1)
        inputs = torch.cat([torch.zeros_like(x[:, :1]), x[:, :n], M, x[:, n:]], 1)[:, : self.L]
        positions = torch.cat([torch.full((1,), none, device=dev), order[:n],
                               torch.full((n - 1,), none, device=dev), order[n:]])[: self.L]
        return inputs, positions

    def training_batch(self, codes: torch.Tensor, cond: torch.Tensor) -> tokenloom.TrainBatch:
        codes = tokenloom.check_codes(codes, self.L, self.V, where="par.training_batch: codes")
        x = codes.gather(1, self.order.to(codes.device).expand(codes.shape[0], -1))  # (B, L) in PAR order
        inputs, positions = self._sequence(x)
        return tokenloom.TrainBatch(inputs=inputs, targets=x, loss_mask=torch.ones_like(x, dtype=torch.bool),
                                    cond=cond.long(), positions=positions)

    def generate(self, model, chain, cond, *, rng, known=None) -> torch.Tensor:
        refuse_known("par", known)
        B, dev, n, L = cond.shape[0], model.device, self.n, self.L
        cond = cond.to(dev).long()
        rows, guided = guidance_rows(cond, chain, model)
        R = rows.shape[0]
        n_steps = self.expected_nfe()
        order = self.order.to(dev)
        x = torch.zeros(B, L, dtype=torch.long, device=dev)  # codes in PAR order
        _, positions = self._sequence(x[:1])
        cache = model.new_cache(R, L)
        inputs = torch.zeros(R, 1, dtype=torch.long, device=dev)  # the class slot
        at, done = 0, 0  # sequence index of this pass's first input; tokens sampled so far
        for step in range(n_steps):
            T = inputs.shape[1]
            k = 1 if done < n else n  # tokens this pass predicts
            logits = model(inputs, rows, positions=positions[at : at + T], cache=cache)[:, -k:]  # (R, k, V)
            x[:, done : done + k] = sample_codes(chain, logits, rng, B=B, guided=guided, step=step,
                                                 n_steps=n_steps, positions=order[done : done + k].expand(B, -1))
            at += T
            done += k
            if done < n:
                new = x[:, done - 1 : done]  # the first token just sampled
            elif done == n:  # enter the parallel mode: [x_{n-1}, M_1, ..., M_{n-1}]
                M = torch.tensor(self.transition, dtype=torch.long, device=dev).expand(B, -1)
                new = torch.cat([x[:, n - 1 : n], M], 1)
            else:
                new = x[:, done - n : done]
            inputs = new.repeat(2, 1) if guided else new
        codes = torch.empty_like(x)
        codes[:, order] = x
        return codes


@tokenloom.hookimpl
def register_generators(register):
    register("par", ParGenerator)
