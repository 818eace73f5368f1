"""``depth-stack``: RQ-Transformer's stacked prediction (Lee et al. 2022,
"Autoregressive Image Generation using Residual Quantization",
https://arxiv.org/abs/2203.01941, §3.2).

For a tokenizer with residual depth D (``rq``: D codes per grid position,
each quantising what the codes before it left; or ``pixel`` with
``per_channel = true``) the image is h·w *stacks* of D codes. RQ-Transformer
splits the work in two:

- a **spatial transformer** (the backbone) runs over positions in raster
  order; the input at position t is the **sum of the embeddings of stack
  t − 1's codes** (the class token first), and its output h_t summarises
  every earlier stack;
- a **depth transformer** (the backbone's depth head, ``depth_layers``
  layers) predicts the stack at position t autoregressively over depth: its
  input at depth 0 is h_t, at depth d the summed embeddings of codes
  ``< d`` of the stack (plus a depth embedding), causal over depth, one
  output head per depth.

**Training.** The sequence is ``[cls, S_0, ..., S_{h·w−1}]`` (``T = h·w + 1``
stacks of D ids); index t predicts stack t with D heads (the depth head is
teacher-forced with stack t itself, causally over depth), the last index
predicts nothing.

**Decoding.** One backbone pass per position with a KV cache gives h_t;
then D depth-head steps sample the stack's codes one by one through the
sampler chain (they are counted as ``depth_steps``, timed with the
backbone, not as forward passes of the backbone): NFE = h·w. Classifier-free
guidance rows share each pass and depth step.

**Likelihood.** Exact: log p(x) = Σ_t Σ_d log p(c_{t,d} | c_{t,<d}, S_{<t}).
"""

from __future__ import annotations

import attrs
import torch

import tokenloom
from tokenloom.orders import grid_of, guidance_rows, refuse_known, sample_codes


class DepthStackGenerator(tokenloom.Generator):
    exact_likelihood = True

    @attrs.frozen
    class Config:
        depth_layers: int = attrs.field(default=2, validator=attrs.validators.ge(1))

    def __init__(self, config: Config, *, tokenizer: tokenloom.Tokenizer):
        super().__init__(config, tokenizer=tokenizer)
        h, w, self.D = grid_of(tokenizer, "depth-stack")
        self.P = h * w  # positions (stacks)
        self.L, self.V = tokenizer.layout.length, tokenizer.vocab_size

    def model_spec(self) -> tokenloom.ModelSpec:
        return tokenloom.ModelSpec(
            seq_len=self.P + 1,
            vocab_size=self.V,
            heads=(self.V,) * self.D,
            train_order="depth-stack",
            attention="causal",
            cache_ops=frozenset({"append"}),
            extra=(("depth_head", self.config.depth_layers),),
            layout=self.tokenizer.layout,
        )

    def expected_nfe(self) -> int:
        return self.P

    def _positions(self, device) -> torch.Tensor:
        """``[P + 1]``: the class token, then each stack at its grid position
        (the flat position of its depth-0 code)."""
        return torch.cat([torch.full((1,), tokenloom.NO_POSITION, device=device),
                          torch.arange(self.P, device=device) * self.D])

    def training_batch(self, codes: torch.Tensor, cond: torch.Tensor) -> tokenloom.TrainBatch:
        codes = tokenloom.check_codes(codes, self.L, self.V, where="depth-stack.training_batch: codes")
        B = codes.shape[0]
        stacks = codes.view(B, self.P, self.D)
        pad = torch.zeros_like(stacks[:, :1])
        inputs = torch.cat([pad, stacks], 1)  # (B, P + 1, D): index t + 1 holds stack t
        targets = torch.cat([stacks, pad], 1)  # index t predicts stack t
        loss_mask = torch.ones_like(targets, dtype=torch.bool)
        loss_mask[:, -1] = False
        return tokenloom.TrainBatch(inputs=inputs, targets=targets, loss_mask=loss_mask, cond=cond.long(),
                                    positions=self._positions(codes.device))

    def generate(self, model, chain, cond, *, rng, known=None) -> torch.Tensor:
        refuse_known("depth-stack", known)
        B, dev, D = cond.shape[0], model.device, self.D
        cond = cond.to(dev).long()
        rows, guided = guidance_rows(cond, chain, model)
        R, reps = rows.shape[0], (2 if guided else 1)
        pos = self._positions(dev)
        cache = model.new_cache(R, self.P + 1)
        codes = torch.zeros(B, self.P, D, dtype=torch.long, device=dev)
        x = torch.zeros(R, 1, D, dtype=torch.long, device=dev)  # the class slot
        for t in range(self.P):
            hidden = model(x, rows, positions=pos[t : t + 1], cache=cache, return_hidden=True)  # (R, 1, C)
            prefix = torch.zeros(R, 1, 0, dtype=torch.long, device=dev)
            for d in range(D):
                logits = model.depth_logits(hidden, prefix)[d]  # (R, 1, V)
                flat = t * D + d
                tok = sample_codes(chain, logits, rng, B=B, guided=guided, step=flat, n_steps=self.L,
                                   positions=torch.full((B, 1), flat, device=dev))[:, 0]
                codes[:, t, d] = tok
                prefix = torch.cat([prefix, tok.repeat(reps)[:, None, None]], 2)
            x = codes[:, t : t + 1].repeat(reps, 1, 1)
        return codes.reshape(B, self.L)

    def log_likelihood(self, model, codes, cond) -> torch.Tensor:
        codes = tokenloom.check_codes(codes, self.L, self.V, where="depth-stack.log_likelihood: codes")
        dev = model.device
        batch = self.training_batch(codes.to(dev), cond.to(dev))
        out = model(batch.inputs, batch.cond, positions=batch.positions)
        out = out if isinstance(out, tuple) else (out,)
        logits = torch.stack([o.float() for o in out], 2)[:, : self.P]  # (B, P, D, V)
        logp = torch.log_softmax(logits, -1).gather(-1, batch.targets[:, : self.P, :, None])[..., 0]
        return logp.flatten(1).sum(-1)


@tokenloom.hookimpl
def register_generators(register):
    register("depth-stack", DepthStackGenerator)
