"""``random``: RandAR — a decoder-only model that generates in any order
(Pang et al. 2025, "RandAR: Decoder-only Autoregressive Visual Generation
in Random Orders", https://arxiv.org/abs/2412.01827).

**Training.** Each image's tokens are put in a uniformly random order π and
a *position-instruction token* is inserted before every image token, telling
the model which position to predict next: the sequence is
``[cls, p_π0, x_π0, p_π1, x_π1, ..., p_π(L-1), x_π(L-1)]`` (2L + 1 tokens; the
last image token is never an input, so the model sees 2L). A position
instruction is one shared learned token (id ``V``) placed at the grid
position it asks for (2-D RoPE or a learned position embedding), the image
token after it sits at the same position. The loss is taken only at the
instruction tokens, whose targets are the image tokens that follow. Causal
attention: the model learns p(x_πt | x_π<t, π≤t) for every order.

**Decoding.** Draw an order π per image (from the image's own random
stream), then one forward pass per token with a KV cache, feeding
``[x_π(t-1), p_πt]`` and sampling x_πt at the instruction — NFE = L.

**Zero-shot inpainting/outpainting** (RandAR §4.4): with ``known`` the known
positions come first in the order and are fed as they are (their samples are
discarded), so every unknown token is generated after seeing all of the
known ones.

**Likelihood.** Exact for any fixed order; ``log_likelihood`` uses raster
order (one teacher-forced pass), comparable with the ``raster`` order.

**Reference** (ziqipang/RandAR, ``RandAR/model/randar_gpt.py``). Kept: the
interleaved instruction sequence, the loss at the instructions only, causal
attention, one shared learned instruction vector. Kept since the issue-18
fix: classifier-free guidance (and any step-dependent sampler) sees the
progress as the *fraction of tokens decoded*, ``t / L`` before token t —
RandAR's ``cfg_scales[0] + (cfg_scales[-1] − cfg_scales[0]) ·
query_token_idx_cur_step / block_size`` (``progress = "decoded"``: the
samplers get ``StepInfo.fraction = t / L``; ``"pass"`` gives the old
``t / (L − 1)``). RandAR also rotates the instruction *embedding itself* by the 2-D RoPE of
the position it asks for before the first layer
(``get_position_instruction_tokens``: ``batch_apply_rotary_emb`` on
``pos_instruct_embeddings``, each head's slice by that head's rotation), so
the instruction carries its target in its input vector as well as in
attention: ``rotate_instruction = true`` does the same (the backbone's spec
option ``rotate_ids``, :mod:`tokenloom.backbone.positions`; needs ``[model]
pos = "rope2d"``). It is off by default so that existing runs keep their
numbers: without it the position enters only through the backbone's
positions (RoPE inside attention, or a learned position embedding).
"""

from __future__ import annotations

import attrs
import torch

import tokenloom
from tokenloom.orders import instruction_sequence, instruction_spec

_ORDER_STREAM = 11  # RowRNG stream of the per-image decoding order


class RandomOrderGenerator(tokenloom.Generator):
    supports_known = True
    exact_likelihood = True
    samples_follow_likelihood = False  # decoding mixes over orders; log_likelihood is the raster order's

    @attrs.frozen
    class Config:
        #: what the samplers' progress measures: "decoded" (RandAR: t / L before token t) or "pass"
        progress: str = attrs.field(default="decoded", validator=attrs.validators.in_(("decoded", "pass")))
        #: rotate the position instruction's input embedding by the 2-D RoPE of the position it asks
        #: for, as RandAR's reference (get_position_instruction_tokens); needs [model] pos = "rope2d".
        #: Off by default (results of existing runs unchanged); part of the model spec, so set it
        #: alike on ``random`` and ``random-parallel`` to share one model
        rotate_instruction: bool = False

    def __init__(self, config: Config, *, tokenizer: tokenloom.Tokenizer):
        super().__init__(config, tokenizer=tokenizer)
        self.L = tokenizer.layout.length
        self.V = tokenizer.vocab_size
        self.instruction = self.V  # id of the position-instruction token

    def model_spec(self) -> tokenloom.ModelSpec:
        return instruction_spec(self.tokenizer, rotate=self.config.rotate_instruction)

    def expected_nfe(self) -> int:
        return self.L

    def sequence(self, codes: torch.Tensor, order: torch.Tensor) -> tokenloom.TrainBatch:
        """The interleaved teacher-forcing sequence of ``codes`` (``[B, L]``)
        in the orders ``order`` (``[B, L]``, a permutation per row)."""
        return instruction_sequence(codes, order, self.instruction)

    def training_batch(self, codes: torch.Tensor, cond: torch.Tensor) -> tokenloom.TrainBatch:
        codes = tokenloom.check_codes(codes, self.L, self.V, where="random.training_batch: codes")
        order = torch.rand(codes.shape[0], self.L).argsort(-1).to(codes.device)
        batch = self.sequence(codes, order)
        batch.cond = cond.long()
        return batch

    def generate(self, model, chain, cond, *, rng, known=None) -> torch.Tensor:
        B, dev, L = cond.shape[0], model.device, self.L
        cond = cond.to(dev).long()
        key = rng.uniform(0, L, stream=_ORDER_STREAM).to(dev)  # (B, L) in (0, 1)
        if known is not None:
            kcodes, kmask = _check_known(known, B, L, self.V, dev)
            key = key - kmask.float()  # known positions first
        order = key.argsort(-1)  # (B, L)
        guided = chain.needs_uncond
        reps = 2 if guided else 1
        rows = torch.cat([cond, torch.full_like(cond, model.null_class)]) if guided else cond
        order_r = order.repeat(reps, 1)
        cache = model.new_cache(rows.shape[0], 2 * L)
        codes = torch.zeros(B, L, dtype=torch.long, device=dev)
        prev = torch.zeros(rows.shape[0], dtype=torch.long, device=dev)  # t = 0: the class slot
        instr = torch.full_like(prev, self.instruction)
        for t in range(L):
            pos_prev = order_r[:, t - 1] if t > 0 else torch.full_like(prev, tokenloom.NO_POSITION)
            inputs = torch.stack([prev, instr], 1)  # (rows, 2): [x_π(t-1) or cls, p_πt]
            positions = torch.stack([pos_prev, order_r[:, t]], 1)
            logits = model(inputs, rows, positions=positions, cache=cache, last_only=True)[:, -1]  # (rows, V)
            pos = order[:, t]
            fraction = t / L if self.config.progress == "decoded" else None  # RandAR: progress t / L
            info = tokenloom.StepInfo(step=t, n_steps=L, positions=pos, fraction=fraction,
                                      uncond_logits=logits[B:] if guided else None)
            tok = chain.sample(logits[:B], info, rng)
            if known is not None:
                given = kmask.gather(1, pos[:, None])[:, 0]
                tok = torch.where(given, kcodes.gather(1, pos[:, None])[:, 0], tok)
            codes.scatter_(1, pos[:, None], tok[:, None])
            prev = tok.repeat(reps)
        return codes

    def log_likelihood(self, model, codes, cond) -> torch.Tensor:
        codes = tokenloom.check_codes(codes, self.L, self.V, where="random.log_likelihood: codes")
        dev = model.device
        codes = codes.to(dev)
        order = torch.arange(self.L, device=dev).expand_as(codes)
        batch = self.sequence(codes, order)
        logits = model(batch.inputs, cond.to(dev).long(), positions=batch.positions)[:, 1::2]  # (B, L, V)
        logp = torch.log_softmax(logits.float(), -1).gather(-1, codes[..., None])[..., 0]
        return logp.sum(-1)


def _check_known(known: tokenloom.Known, B: int, L: int, V: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
    codes = tokenloom.check_codes(known.codes, L, V, where="known.codes").to(dev)
    mask = known.mask
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (B, L):
        raise tokenloom.InputError(f"known.mask: expected a BoolTensor [{B}, {L}], got "
                                   f"{getattr(mask, 'dtype', type(mask))} {tuple(getattr(mask, 'shape', ()))}")
    if codes.shape[0] != B:
        raise tokenloom.InputError(f"known.codes: expected {B} rows (one per image), got {codes.shape[0]}")
    return codes, mask.to(dev)


@tokenloom.hookimpl
def register_generators(register):
    register("random", RandomOrderGenerator)
