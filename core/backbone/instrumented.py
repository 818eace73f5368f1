"""The instrumented backbone: one idea — the backbone as every generator receives it, with its
cost counted by core.

:class:`InstrumentedModel` wraps the trained :class:`~tokenloom.model.Transformer`. Calling it
runs one forward pass without gradients and counts it: ``nfe`` (forward passes), ``tokens``
(input tokens scored), ``seconds`` (wall time inside the backbone), ``kv_cache_bytes`` (the
largest cache allocated), ``depth_steps`` (RQ-Transformer depth-head steps) and, for a continuous
head (diffusion, flow), ``head_steps`` / ``head_tokens`` / ``head_evals`` / ``head_flops`` (see
:meth:`InstrumentedModel.sample_head`). The run's cost metrics come from these counters — plugins
never report their own cost.

What a generator may use of it (the ``Backbone`` of :mod:`tokenloom.interfaces`):

- ``spec`` (the :class:`~tokenloom.interfaces.ModelSpec` it was built for), ``n_classes``,
  ``null_class`` (the class id of unconditional rows), ``device``;
- ``new_cache(batch_size, max_len=None)`` -> a :class:`~tokenloom.backbone.kvcache.KVCache`;
- ``model(inputs, cond, *, positions, target_positions, attn_mask, cache, last_only,
  depth_inputs, return_hidden)`` -> logits (see :meth:`InstrumentedModel.__call__`);
- ``token_embeddings()`` and ``depth_logits(hidden, codes)`` for the orders that need them;
- ``head`` and ``sample_head(hidden, *, rng, step, ...)`` for continuous tokens.

This module does not import :mod:`tokenloom.model` (which re-exports :class:`InstrumentedModel`
under its old public path), so the two cannot form an import loop; the wrapped model is any
module with the :class:`~tokenloom.model.Transformer`'s interface.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from ..contract.interfaces import ModelSpec
from .kvcache import KVCache


class InstrumentedModel:
    """The backbone as generators see it: calling it runs one forward pass
    (no gradients) and counts it.

    ``model``: the :class:`~tokenloom.model.Transformer` to wrap (kept as
    ``self.model``; core trains and saves it, generators only call the
    wrapper). Counters: ``nfe`` (forward passes), ``tokens`` (input tokens
    scored, rows × T), ``seconds`` (wall time inside the backbone),
    ``kv_cache_bytes`` (the largest cache allocated) and ``depth_steps``
    (depth-head steps). :meth:`reset` zeroes them, :meth:`counters` reads them.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.reset()

    def reset(self) -> None:
        """Zero every counter."""
        self.nfe = 0
        self.tokens = 0
        self.seconds = 0.0
        self.kv_cache_bytes = 0
        self.depth_steps = 0  # depth-head steps (RQ-Transformer); not forward passes of the backbone
        # a continuous head (sample_head): sequential head steps (head.steps per call, like NFE for the
        # backbone), tokens drawn, network evaluations (rows x tokens x steps, null rows included) and FLOPs
        self.head_steps = 0
        self.head_tokens = 0
        self.head_evals = 0
        self.head_flops = 0

    def counters(self) -> dict[str, float]:
        """``{"nfe", "tokens", "seconds", "kv_cache_bytes"}``: the cost counted since :meth:`reset`."""
        return {"nfe": self.nfe, "tokens": self.tokens, "seconds": self.seconds,
                "kv_cache_bytes": self.kv_cache_bytes}

    # -- what generators need to know ----------------------------------------

    @property
    def spec(self) -> ModelSpec:
        """The :class:`~tokenloom.interfaces.ModelSpec` the backbone was built
        for (the generator's own :meth:`~tokenloom.interfaces.Generator.model_spec`
        for the target model, the draft's spec for a speculative draft)."""
        return self.model.spec

    @property
    def n_classes(self) -> int:
        """The number of real conditions (classes, or rows of the run's
        condition table): ``cond`` ids lie in ``[0, n_classes)``, plus
        :attr:`null_class`."""
        return self.model.n_classes

    @property
    def null_class(self) -> int:
        """The condition id of unconditional rows (classifier-free guidance):
        ``n_classes``, the null condition. A ``cond`` of None means it for every row."""
        return self.model.n_classes

    @property
    def device(self) -> torch.device:
        """The device of the backbone's weights: put inputs, masks and the
        sampling state there."""
        return next(self.model.parameters()).device

    def token_embeddings(self) -> torch.Tensor | None:
        """The input embedding table ``FloatTensor[V, C]`` (row ``i``: token
        id ``i``), or None for a backbone with ``input_kind = "embeddings"``."""
        return self.model.token_embeddings()

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty :class:`~tokenloom.backbone.kvcache.KVCache` for
        ``batch_size`` rows and up to ``max_len`` tokens (default:
        ``spec.seq_len``), on the backbone's device and dtype; pass it as
        ``cache=`` to continue a sequence. Its size is counted in
        ``kv_cache_bytes`` (the largest allocated)."""
        cache = self.model.new_cache(batch_size, max_len)
        self.kv_cache_bytes = max(self.kv_cache_bytes, cache.nbytes)
        return cache

    def __call__(self, inputs: torch.Tensor, cond: torch.Tensor | None = None, **kwargs: Any):
        """One forward pass of the backbone, without gradients, counted.

        ``inputs``: ``LongTensor[B, T]`` token ids (``[B, T, D]`` stacks for a
        depth-head model, ``FloatTensor[B, T, input_dim]`` for
        ``input_kind = "embeddings"``); index 0 of a sequence is the class
        slot (its value is ignored). ``cond``: ``LongTensor[B]`` condition ids
        (class ids for the ``class`` conditioner) in ``[0, n_classes]``
        (``null_class`` = unconditional), None = every row unconditional.
        Keywords (all optional):

        - ``positions`` / ``target_positions``: ``LongTensor[T]`` or ``[B, T]``
          flat code positions of ``spec.layout`` (``NO_POSITION`` = -1: none);
          default: the sequence index − 1. ``target_positions`` (the
          position each input predicts) is required when the spec asks for
          target-aware positions (RAR), refused otherwise;
        - ``attn_mask``: ``BoolTensor[T, S]`` or ``[B, T, S]`` over the
          ``S = cache.length + T`` keys (True = may attend); default: the
          spec's ``attention`` pattern;
        - ``cache``: a :meth:`new_cache`; the tokens continue the cached
          sequence and are appended to it;
        - ``last_only``: logits of the last position only (``T`` becomes 1);
        - ``depth_inputs``, ``return_hidden``: depth-head models (see
          :meth:`depth_logits`).

        Returns logits ``FloatTensor[B, T, V]`` — a tuple of them, one per
        entry of ``spec.heads``, when there are several heads — or the final
        hidden states ``[B, T, C]`` with ``return_hidden``. Counts one
        ``nfe``, ``B × T`` ``tokens`` and the wall time (synchronised on CUDA).
        """
        cuda = inputs.is_cuda
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if torch.is_grad_enabled():
            with torch.no_grad():
                out = self.model(inputs, cond, **kwargs)
        else:  # already under no_grad / inference_mode (the pipeline's decoding loop)
            out = self.model(inputs, cond, **kwargs)
        if cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - t0
        self.nfe += 1
        self.tokens += inputs.shape[0] * inputs.shape[1]
        return out

    @property
    def head(self) -> Any:
        """The continuous :class:`~tokenloom.interfaces.Head` of the model (None: categorical)."""
        return getattr(self.model, "token_head", None)

    def sample_head(self, hidden: torch.Tensor, *, rng: Any, step: int, stream: int = 0,
                    temperature: float = 1.0, guidance: float = 1.0,
                    uncond: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens drawn by the continuous head from hidden states ``[B, C]`` or ``[B, k, C]``
        (:meth:`~tokenloom.interfaces.Head.sample`, without gradients; ``uncond``: the null rows'
        states for guidance). Timed into ``seconds``; counted apart from the backbone's passes:
        ``head_steps`` += ``head.steps`` (the sequential steps of this call), ``head_tokens`` +=
        the tokens drawn (``B·k``), ``head_evals`` += tokens × steps × (2 when guided: the null
        rows run too) and ``head_flops`` += ``head_evals`` × ``head.eval_flops()``."""
        head = self.head
        if head is None:
            from ..contract.errors import InputError

            raise InputError("sample_head: this model has no continuous head (a categorical model: sample its "
                             "logits through the chain)")
        cuda = hidden.is_cuda
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = head.sample(hidden, rng=rng, step=step, stream=stream, temperature=temperature,
                              guidance=guidance, uncond=uncond)
        if cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - t0
        n = hidden[..., 0].numel()
        evals = n * head.steps * (1 if uncond is None else 2)
        self.head_steps += head.steps
        self.head_tokens += n
        self.head_evals += evals
        self.head_flops += evals * head.eval_flops()
        return out

    def depth_logits(self, hidden: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The depth head (RQ-Transformer) on hidden states ``[B, T, C]`` of a
        ``return_hidden`` pass and the first ``d`` codes of each position's
        stack ``LongTensor[B, T, d]``: the logits ``[B, T, V]`` of depths
        ``0 .. d`` (a tuple of ``d + 1``). Timed into ``seconds`` and counted
        in ``depth_steps``, not in ``nfe`` (one backbone pass per position,
        as RQ-Transformer counts it)."""
        cuda = hidden.is_cuda
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = self.model.depth_logits(hidden, codes)
        if cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - t0
        self.depth_steps += 1
        return out


__all__ = ["InstrumentedModel"]
