"""``categorical``: today's head — a linear layer from the hidden state to the logits of the
``V`` codes, a softmax over them (the head of every GPT-style image model: LlamaGen, VAR, ...).

In a run this head is the backbone's own output layer: the transformer builds it as its
``heads[0]`` (``nn.Linear(d_model, V, bias=False)``, initialised N(0, 0.02)), trains it with the
cross-entropy of :func:`tokenloom.train.batch_loss` and decodes through the run's whole sampler
chain (top-k, top-p, guidance, ...) — exactly the path of every run before heads existed, so a
categorical run gives the same numbers and cache keys as before. This class is the same
computation as a standalone module (the conformance kit and the head API use it): :meth:`loss`
is the per-token cross-entropy, :meth:`log_likelihood` the exact log-probability, and
:meth:`sample` the guided (``u + s·(c − u)``), tempered categorical draw with the per-image RNG.
One evaluation per token (``steps = 1``).
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import nn

import tokenloom


class CategoricalHead(tokenloom.Head):
    continuous = False
    exact_likelihood = True

    @attrs.frozen
    class Config:
        pass

    def __init__(self, config: Config, *, hidden_dim: int, token_dim: int = 0, vocab_size: int = 0):
        super().__init__(config, hidden_dim=hidden_dim, token_dim=token_dim, vocab_size=vocab_size)
        self.out = nn.Linear(self.hidden_dim, self.vocab_size, bias=False)
        nn.init.normal_(self.out.weight, mean=0.0, std=0.02)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[.., V]`` logits of hidden states ``[.., C]``."""
        return self.out(self.check_hidden(hidden))

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = self.check_targets(targets, hidden)
        logits = self.logits(hidden).float()
        return F.cross_entropy(logits.reshape(-1, self.vocab_size), targets.reshape(-1),
                               reduction="none").reshape(targets.shape)

    def log_likelihood(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = self.check_targets(targets, hidden)
        return torch.log_softmax(self.logits(hidden).float(), -1).gather(-1, targets[..., None])[..., 0]

    def sample(self, hidden, *, rng, step, stream=0, temperature=1.0, guidance=1.0, uncond=None):
        hidden = self.check_hidden(hidden)
        uncond = self.check_uncond(uncond, hidden, guidance)
        if not temperature > 0:
            raise tokenloom.InputError(f"CategoricalHead: temperature must be > 0, got {temperature}")
        logits = self.logits(hidden).float()
        if uncond is not None:
            u = self.logits(uncond).float()
            logits = guidance * logits + (1.0 - guidance) * u
        return rng.categorical(logits / temperature, step, stream=stream).to(hidden.device)

    def eval_flops(self) -> int:
        return 2 * self.hidden_dim * self.vocab_size


@tokenloom.hookimpl
def register_heads(register):
    register("categorical", CategoricalHead)
