"""A third-party head for the conformance kit: a mixture of K diagonal Gaussians per token
(``p(x | h) = Σ_k π_k(h) N(x; μ_k(h), σ_k(h)²)``, one linear layer from the hidden state to the
mixture's logits, means and log standard deviations), written from :mod:`tokenloom.interfaces`
alone and registered through a ``register_heads`` hook like any plugin. It has an exact
likelihood (its loss is the negative log-likelihood) and one step per token: the component is
drawn with ``rng.categorical``, the offset with ``rng.normal`` (temperature scales it), and
guidance moves every mixture parameter, ``u + s·(c − u)``."""

from __future__ import annotations

import math

import attrs
import torch
from torch import nn

import tokenloom


class MixtureOfGaussians(tokenloom.Head):
    continuous = True
    exact_likelihood = True

    @attrs.frozen
    class Config:
        components: int = attrs.field(default=4, validator=attrs.validators.ge(1))

    def __init__(self, config, *, hidden_dim, token_dim=0, vocab_size=0):
        super().__init__(config, hidden_dim=hidden_dim, token_dim=token_dim, vocab_size=vocab_size)
        K, D = config.components, self.token_dim
        self.proj = nn.Linear(self.hidden_dim, K * (1 + 2 * D))

    def mixture(self, hidden):
        K, D = self.config.components, self.token_dim
        out = self.proj(hidden).float()
        logits, rest = out[..., :K], out[..., K:].unflatten(-1, (K, 2 * D))
        return logits, rest[..., :D], rest[..., D:].clamp(-5.0, 3.0)

    def log_likelihood(self, hidden, targets):
        hidden = self.check_hidden(hidden)
        x = self.check_targets(targets, hidden).float()[..., None, :]  # (.., 1, D)
        logits, mu, log_std = self.mixture(hidden)
        comp = (-0.5 * ((x - mu) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        return torch.logsumexp(torch.log_softmax(logits, -1) + comp, -1)

    def loss(self, hidden, targets):
        return -self.log_likelihood(hidden, targets)

    def sample(self, hidden, *, rng, step, stream=0, temperature=1.0, guidance=1.0, uncond=None):
        hidden = self.check_hidden(hidden)
        uncond = self.check_uncond(uncond, hidden, guidance)
        logits, mu, log_std = self.mixture(hidden)
        if uncond is not None:
            u = self.mixture(uncond)
            logits, mu, log_std = (b + guidance * (a - b) for a, b in zip((logits, mu, log_std), u))
        k = rng.categorical(logits, step, stream=stream).to(hidden.device)  # (B,) or (B, k)
        pick = k[..., None, None].expand(*k.shape, 1, self.token_dim)
        m, s = mu.gather(-2, pick)[..., 0, :], log_std.gather(-2, pick)[..., 0, :].exp()
        eps = rng.normal(step, *hidden.shape[1:-1], self.token_dim, stream=stream).to(hidden.device)
        return m + s * eps * temperature


PLUGIN = type("MixturePlugin", (), {
    "register_heads": staticmethod(tokenloom.hookimpl(lambda register: register("mog", MixtureOfGaussians))),
})
