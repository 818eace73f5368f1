"""Head properties: the training loss (shape, finite, gradients that reach the hidden state), the
draw (shape, kind, determinism per (seed, image), batch independence, guidance of identical rows
is no guidance), the cost it declares and the backbone counts, and clear errors for bad inputs."""

from __future__ import annotations

from typing import Any

import torch

from ..contract.errors import ConfigError, TokenloomError
from .common import _expect_error

#: The kit's sizes: backbone width C, continuous token width D, vocabulary V.
KIT_HIDDEN, KIT_DIM, KIT_VOCAB = 16, 3, 7


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype.is_floating_point:
        return bool(torch.allclose(a.float(), b.float(), atol=1e-5, rtol=1e-4))
    return bool(torch.equal(a, b))


def check_head(name: str, *, registry: Any = None, train_steps: int = 30, **config: Any) -> None:
    """A head, built with ``hidden_dim = 16`` and ``token_dim = 3`` (continuous) or ``vocab_size
    = 7`` (discrete), must:

    - refuse the other token kind at build time (:class:`~tokenloom.ConfigError`);
    - ``loss(hidden [N, C], targets)`` -> finite ``[N]`` (and ``[B, T]`` for ``[B, T, C]``), whose
      gradients reach every row of ``hidden`` after ``train_steps`` optimiser steps on the head
      (heads that start at zero, as MAR's, ignore the hidden state at first);
    - ``sample`` -> ``[B, D]`` / ``[B, k, D]`` finite floats (continuous) or ``[B]`` / ``[B, k]``
      ids in ``[0, V)``; the same numbers for the same ``(seed, image, step, stream)`` (twice, and
      for a row drawn in a smaller batch — batch independence), different images or steps
      drawing differently; guidance with ``uncond == hidden`` changes nothing;
    - declare ``steps >= 1``, ``eval_flops() > 0`` and ``sample_flops_per_token() = steps ·
      eval_flops()``; a continuous head attached to a tiny backbone is counted by the
      instrumented model: ``head_steps += steps`` and ``head_tokens += B`` per draw, the NFE
      untouched;
    - an ``exact_likelihood`` head: ``log_likelihood`` finite ``[N]``;
    - refuse bad inputs with a clear :class:`~tokenloom.InputError`: a hidden state of the wrong
      width or with NaN, targets of the wrong kind or width or with NaN, guidance without
      ``uncond``."""
    from ..blocks.rng import RowRNG
    from ..contract.registry import build_component, get_registry

    registry = registry or get_registry()
    cls = registry.get("head", name).cls
    continuous = bool(cls.continuous)
    C, D, V = KIT_HIDDEN, KIT_DIM, KIT_VOCAB
    sizes = {"hidden_dim": C, "token_dim": D} if continuous else {"hidden_dim": C, "vocab_size": V}
    wrong = {"hidden_dim": C, "vocab_size": V} if continuous else {"hidden_dim": C, "token_dim": D}

    def build(sz: dict[str, int]) -> Any:
        return build_component(registry, "head", name, {**config, **sz}, path=f"head.{name}")

    try:
        build(wrong)
    except ConfigError:
        pass
    else:
        raise AssertionError(f"head {name}: built for the other token kind ({wrong}) without a ConfigError")

    torch.manual_seed(0)
    head = build(sizes)
    g = torch.Generator().manual_seed(1)
    N = 12

    def targets_of(n: int, *lead: int) -> torch.Tensor:
        if continuous:
            return torch.randn(*(lead or (n,)), D, generator=g)
        return torch.randint(0, V, lead or (n,), generator=g)

    # -- the loss --------------------------------------------------------------
    hidden = torch.randn(N, C, generator=g)
    tg = targets_of(N)
    loss = head.loss(hidden, tg)
    assert isinstance(loss, torch.Tensor) and loss.shape == (N,), \
        f"head {name}: loss of [N, C] must be [N], got {tuple(getattr(loss, 'shape', ()))}"
    assert torch.isfinite(loss).all(), f"head {name}: loss is not finite"
    lead = head.loss(torch.randn(2, 3, C, generator=g), targets_of(0, 2, 3))
    assert lead.shape == (2, 3), f"head {name}: loss of [B, T, C] must be [B, T], got {tuple(lead.shape)}"
    params = [p for p in head.parameters() if p.requires_grad]
    assert params, f"head {name}: no trainable parameters"
    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(train_steps):
        opt.zero_grad()
        head.loss(hidden, tg).mean().backward()
        opt.step()
    h = hidden.clone().requires_grad_(True)
    head.zero_grad()
    head.loss(h, tg).sum().backward()
    assert h.grad is not None, f"head {name}: the loss does not depend on the hidden state (no gradient reaches it)"
    assert torch.isfinite(h.grad).all(), f"head {name}: the gradient on hidden is not finite"
    assert (h.grad.abs().sum(-1) > 0).all(), \
        f"head {name}: the loss does not depend on the hidden state (zero gradient) after {train_steps} steps"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), \
        f"head {name}: no gradient reaches the head's parameters"
    if head.exact_likelihood:
        ll = head.log_likelihood(hidden, tg)
        assert ll.shape == (N,) and torch.isfinite(ll).all(), f"head {name}: log_likelihood must be finite [N]"

    # -- the draw ----------------------------------------------------------------
    head.eval()
    B, k = 6, 2
    hid = torch.randn(B, C, generator=g)
    rng = RowRNG(7, torch.arange(B))

    def draw(hs: torch.Tensor, r: Any, step: int = 0, **kw: Any) -> torch.Tensor:
        with torch.no_grad():
            return head.sample(hs, rng=r, step=step, **kw)

    x = draw(hid, rng)
    want = (B, D) if continuous else (B,)
    assert isinstance(x, torch.Tensor) and tuple(x.shape) == want, \
        f"head {name}: sample of [B, C] must be {want}, got {tuple(getattr(x, 'shape', ()))}"
    if continuous:
        assert x.dtype.is_floating_point and torch.isfinite(x).all(), f"head {name}: samples must be finite floats"
    else:
        assert not x.dtype.is_floating_point and x.min() >= 0 and x.max() < V, \
            f"head {name}: samples must be ids in [0, {V})"
    xk = draw(torch.randn(B, k, C, generator=g), rng)
    want_k = (B, k, D) if continuous else (B, k)
    assert tuple(xk.shape) == want_k, f"head {name}: sample of [B, k, C] must be {want_k}, got {tuple(xk.shape)}"
    assert _close(draw(hid, RowRNG(7, torch.arange(B))), x), \
        f"head {name}: two draws with the same (seed, image, step) differ — randomness must come from rng"
    rows = torch.tensor([4, 1])
    sub = draw(hid[rows], RowRNG(7, rows))
    assert _close(sub, x[rows]), f"head {name}: a row's draw depends on its batch (rows 4, 1 drawn alone differ)"
    same = hid[:1].expand(B, C).contiguous()
    xs = draw(same, rng)
    assert not all(_close(xs[i], xs[0]) for i in range(1, B)), \
        f"head {name}: every image draws the same token from the same hidden state — no per-image randomness"
    assert not _close(draw(same, rng, step=3), xs), f"head {name}: the draw ignores the step"
    guided = draw(hid, rng, guidance=3.0, uncond=hid.clone())
    assert _close(guided, x), f"head {name}: guidance with uncond == hidden must change nothing"

    # -- cost ---------------------------------------------------------------------
    assert isinstance(head.steps, int) and head.steps >= 1, f"head {name}: steps must be an int >= 1"
    assert head.eval_flops() > 0, f"head {name}: eval_flops() must be > 0"
    assert head.sample_flops_per_token() == head.steps * head.eval_flops(), \
        f"head {name}: sample_flops_per_token() must be steps × eval_flops()"
    assert head.train_flops_per_token() > 0, f"head {name}: train_flops_per_token() must be > 0"
    if continuous:
        _check_counted(name, build(sizes))

    # -- bad input ----------------------------------------------------------------
    _expect_error(f"head {name}: hidden of the wrong width",
                  lambda: head.loss(torch.randn(N, C + 1), tg))
    bad = hidden.clone()
    bad[0, 0] = float("nan")
    _expect_error(f"head {name}: NaN in hidden", lambda: head.loss(bad, tg))
    _expect_error(f"head {name}: NaN in hidden (sample)", lambda: draw(bad[:B], rng))
    if continuous:
        _expect_error(f"head {name}: integer targets", lambda: head.loss(hidden, torch.zeros(N, D, dtype=torch.long)))
        _expect_error(f"head {name}: targets of the wrong width", lambda: head.loss(hidden, torch.randn(N, D + 1)))
        nan = tg.clone()
        nan[1, 0] = float("inf")
        _expect_error(f"head {name}: inf in targets", lambda: head.loss(hidden, nan))
    else:
        _expect_error(f"head {name}: float targets", lambda: head.loss(hidden, torch.randn(N)))
        _expect_error(f"head {name}: ids out of range", lambda: head.loss(hidden, torch.full((N,), V)))
    _expect_error(f"head {name}: guidance without uncond", lambda: draw(hid, rng, guidance=2.0))


def _check_counted(name: str, head: Any) -> None:
    """A continuous head in a tiny backbone: ``sample_head`` is counted apart from the NFE."""
    from ..backbone.instrumented import InstrumentedModel
    from ..backbone.model import build_model
    from ..blocks.rng import RowRNG
    from ..contract.config import ModelConfig
    from ..contract.interfaces import ModelSpec, TokenLayout

    layout = TokenLayout(scales=((2, 2),))
    spec = ModelSpec(seq_len=4, vocab_size=0, heads=(), train_order="kit", input_kind="embeddings",
                     input_dim=KIT_DIM, token_dim=KIT_DIM, layout=layout)
    model = build_model(spec, ModelConfig(n_layer=1, d_model=KIT_HIDDEN, n_head=2), n_classes=2, head=head).eval()
    wrapped = InstrumentedModel(model)
    B = 3
    try:
        hidden = wrapped(torch.zeros(B, 2, KIT_DIM), torch.tensor([0, 1, 2]), return_hidden=True)
    except TokenloomError as exc:  # pragma: no cover - the backbone refuses the head: a kit failure
        raise AssertionError(f"head {name}: a backbone with the head refused a forward pass: {exc}") from exc
    assert tuple(hidden.shape) == (B, 2, KIT_HIDDEN), f"head {name}: the backbone's hidden states {hidden.shape}"
    nfe = wrapped.nfe
    out = wrapped.sample_head(hidden[:, -1], rng=RowRNG(0, torch.arange(B)), step=0)
    assert tuple(out.shape) == (B, KIT_DIM), f"head {name}: sample_head gave {tuple(out.shape)}"
    assert wrapped.nfe == nfe, f"head {name}: head sampling counted as backbone passes"
    assert wrapped.head_steps == head.steps and wrapped.head_tokens == B, \
        f"head {name}: head steps not counted (head_steps {wrapped.head_steps}, expected {head.steps})"
    assert wrapped.head_flops == B * head.steps * head.eval_flops(), f"head {name}: head FLOPs not counted"


__all__ = ["KIT_DIM", "KIT_HIDDEN", "KIT_VOCAB", "check_head"]
