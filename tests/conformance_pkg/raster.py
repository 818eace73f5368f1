"""``plain-raster``: next-token prediction in raster order, written from the
contract in :mod:`tokenloom.interfaces` only.

Sequence (see ``ModelSpec``): index 0 is the class token, then the codes
``x_0 .. x_{L-2}``; the input at index ``t`` sits at grid position ``t - 1``
(``NO_POSITION`` for the class token) and predicts code ``t``.
"""

from __future__ import annotations

import attrs
import torch

import tokenloom


class PlainRaster(tokenloom.Generator):
    exact_likelihood = True

    @attrs.frozen
    class Config:
        pass

    def __init__(self, config: Config, *, tokenizer: tokenloom.Tokenizer):
        super().__init__(config, tokenizer=tokenizer)
        self.L = tokenizer.layout.length
        self.V = tokenizer.vocab_size

    def model_spec(self) -> tokenloom.ModelSpec:
        return tokenloom.ModelSpec(seq_len=self.L, vocab_size=self.V, heads=(self.V,), train_order="plain-raster",
                                   layout=self.tokenizer.layout)

    def expected_nfe(self) -> int:
        return self.L

    def _positions(self, device: torch.device) -> torch.Tensor:
        """Where each input sits: ``[NO_POSITION, 0, 1, ..., L - 2]``."""
        return torch.arange(-1, self.L - 1, device=device).clamp(min=tokenloom.NO_POSITION)

    def training_batch(self, codes: torch.Tensor, cond: torch.Tensor) -> tokenloom.TrainBatch:
        codes = tokenloom.check_codes(codes, self.L, self.V, where="plain-raster.training_batch: codes")
        inputs = torch.cat([torch.zeros_like(codes[:, :1]), codes[:, :-1]], 1)  # [cls, x_0, ..., x_{L-2}]
        return tokenloom.TrainBatch(inputs=inputs, targets=codes, loss_mask=torch.ones_like(codes, dtype=torch.bool),
                                    cond=cond.long(), positions=self._positions(codes.device))

    def next_logits(self, model, token: torch.Tensor, rows: torch.Tensor, cache, t: int) -> torch.Tensor:
        """The backbone's logits ``[rows, V]`` for code ``t``, given the input at index ``t``."""
        return model(token, rows, cache=cache, positions=self._positions(model.device)[t : t + 1])[:, -1]

    def generate(self, model, chain, cond, *, rng, known=None) -> torch.Tensor:
        if known is not None:
            raise tokenloom.InputError("plain-raster does not support known=")
        B, dev = cond.shape[0], model.device
        cond = cond.to(dev).long()
        guided = chain.needs_uncond  # classifier-free guidance: null-class rows after the conditional ones
        rows = torch.cat([cond, torch.full_like(cond, model.null_class)]) if guided else cond
        cache = model.new_cache(rows.shape[0], self.L)
        codes = torch.zeros(B, self.L, dtype=torch.long, device=dev)
        token = torch.zeros(rows.shape[0], 1, dtype=torch.long, device=dev)  # the class slot
        for t in range(self.L):
            logits = self.next_logits(model, token, rows, cache, t)
            info = tokenloom.StepInfo(step=t, n_steps=self.L, positions=torch.full((B,), t, device=dev),
                                      uncond_logits=logits[B:] if guided else None)
            codes[:, t] = chain.sample(logits[:B], info, rng)
            token = codes[:, t].repeat(2 if guided else 1)[:, None]
        return codes

    def log_likelihood(self, model, codes, cond) -> torch.Tensor:
        codes = tokenloom.check_codes(codes, self.L, self.V, where="plain-raster.log_likelihood: codes")
        dev = model.device
        codes = codes.to(dev)
        inputs = torch.cat([torch.zeros_like(codes[:, :1]), codes[:, :-1]], 1)
        logits = model(inputs, cond.to(dev).long(), positions=self._positions(dev))  # (B, L, V)
        return torch.log_softmax(logits.float(), -1).gather(-1, codes[..., None])[..., 0].sum(-1)


class _Plugin:
    """The plugin object a distribution would name as its entry point."""

    @staticmethod
    @tokenloom.hookimpl
    def register_generators(register):
        register("plain-raster", PlainRaster)


PLUGIN = _Plugin()
