"""Training the backbone on a generator's teacher-forcing batches.

Like nanoGPT's ``train.py``: AdamW (decay on matrices only, betas 0.9/0.95),
linear warm-up then cosine decay to 10 % of the peak rate, gradient clipping,
optional bf16 autocast and ``torch.compile``, a tqdm bar with the loss.

Everything random about step ``s`` — which codes form the batch, which labels
are dropped to the null class (classifier-free guidance), what the generator
draws in ``training_batch`` (permutations, masks), dropout — is seeded by
``(seed, s)``. So a run killed and resumed from its last checkpoint ends with
exactly the weights of an uninterrupted run, and the distributed trainer can
wrap :func:`train_step` in DDP without restructuring: each rank takes its
slice of the step's batch (:func:`batch_indices` with ``rank``/``world``).

Checkpoints are safetensors (model weights, AdamW moments, the step), written
atomically through :mod:`tokenloom.checkpoint`.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.nn.functional as F

from ..blocks.rng import _hash32, _mix
from ..contract.checkpoint import load_tensors, save_tensors
from ..contract.config import TrainConfig
from ..contract.errors import CheckpointError
from ..contract.interfaces import Generator, TrainBatch

# ---------------------------------------------------------------------------
# Seeds and schedule
# ---------------------------------------------------------------------------


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """A 32-bit seed that is a pure function of ``(seed, step, stream)``."""
    h = _hash32(torch.tensor(seed & 0xFFFFFFFF, dtype=torch.int64) ^ ((seed >> 32) & 0xFFFFFFFF))
    return int(_mix(_mix(h, step & 0xFFFFFFFF), stream & 0xFFFFFFFF))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``cfg.warmup`` steps, then cosine decay from
    ``cfg.lr`` to ``0.1 · cfg.lr`` at ``cfg.steps``."""
    warmup = min(cfg.warmup, max(cfg.steps - 1, 0))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    span = max(cfg.steps - warmup, 1)
    progress = min(1.0, (step - warmup) / span)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def batch_indices(n: int, batch_size: int, *, seed: int, step: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Indices (with replacement) of the training codes that form step
    ``step``'s batch — this rank's ``1/world`` share of it."""
    g = torch.Generator().manual_seed(step_seed(seed, step, 0))
    idx = torch.randint(0, n, (batch_size,), generator=g)
    return idx[rank::world]


def configure_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (``dim >= 2``) only."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused kernels on CUDA (one launch for all parameters); elsewhere torch's default, so CPU numbers do not move
    fused = True if params and all(p.is_cuda for p in params) else None
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=fused)


# ---------------------------------------------------------------------------
# One step
# ---------------------------------------------------------------------------


def make_batch(generator: Generator, codes: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor, *,
               seed: int, step: int, n_steps: int, label_dropout: float, null_class: int) -> TrainBatch:
    """The teacher-forcing batch of step ``step``: codes ``codes[idx]``,
    labels dropped to ``null_class`` with probability ``label_dropout``, the
    generator's own randomness seeded by ``(seed, step)``."""
    c, y = codes[idx], labels[idx].long()
    if label_dropout > 0:
        g = torch.Generator().manual_seed(step_seed(seed, step, 1))
        drop = torch.rand(y.shape[0], generator=g) < label_dropout
        y = torch.where(drop.to(y.device), torch.full_like(y, null_class), y)
    generator.on_train_step(step, n_steps)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(step_seed(seed, step, 2))
        return generator.training_batch(c, y)


def shard_batch(batch: TrainBatch, rank: int, world: int) -> TrainBatch:
    """Rows ``rank::world`` of a global teacher-forcing batch (the rows
    :func:`batch_indices` gives this rank). Per-row tensors are sliced:
    ``inputs``, ``targets``, ``loss_mask``, ``cond``, ``[B, T]`` positions,
    ``[B, T, S]`` masks, and ``extra`` tensors whose first dimension is the
    batch (a 1-D extra only when its length is ``B`` and not ``T``)."""
    B, T = batch.targets.shape[0], batch.inputs.shape[1]
    rows = slice(rank, None, world)

    def per_row(t: torch.Tensor | None, min_dim: int) -> torch.Tensor | None:
        if t is None or t.dim() < min_dim or t.shape[0] != B:
            return t
        return t[rows]

    extra = {k: per_row(v, 1) if v.dim() >= 2 or (v.dim() == 1 and B != T) else v for k, v in batch.extra.items()}
    return TrainBatch(inputs=batch.inputs[rows], targets=batch.targets[rows], loss_mask=batch.loss_mask[rows],
                      cond=batch.cond[rows], positions=per_row(batch.positions, 2),
                      attn_mask=per_row(batch.attn_mask, 3), extra=extra)


def unwrap(model: Any) -> Any:
    """The :class:`~tokenloom.model.Transformer` inside a DDP / ``torch.compile`` wrapper."""
    for _ in range(4):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner
    return model


def batch_loss(model: torch.nn.Module, batch: TrainBatch, *, denom: torch.Tensor | float | None = None) -> torch.Tensor:
    """Mean cross-entropy over the positions (and heads) in ``loss_mask``
    (``denom``: divide the summed loss by this count instead — the count of
    the global batch when ``batch`` is one rank's share of it).

    Continuous tokens (float ``targets [B, T, D]``, a model with a continuous
    :class:`~tokenloom.interfaces.Head`): the hidden states of the positions
    in ``loss_mask`` go through the head's :meth:`~tokenloom.interfaces.Head.loss`
    (its noise drawn from torch's global generator, which :func:`train` seeds
    per step), averaged the same way."""
    if batch.targets.dtype.is_floating_point:
        head = getattr(unwrap(model), "token_head", None)
        if head is None:
            from ..contract.errors import InputError

            raise InputError("batch_loss: float targets (continuous tokens) need a model with a continuous head")
        hidden = model(batch.inputs, batch.cond, positions=batch.positions, attn_mask=batch.attn_mask,
                       target_positions=batch.extra.get("target_positions"), return_hidden=True)  # (B, T, C)
        mask = batch.loss_mask
        per_token = head.loss(hidden[mask], batch.targets[mask])  # (n,)
        return per_token.float().sum() / (mask.sum().clamp(min=1) if denom is None else denom)
    out = model(batch.inputs, batch.cond, positions=batch.positions, attn_mask=batch.attn_mask,
                target_positions=batch.extra.get("target_positions"))
    heads = out if isinstance(out, tuple) else (out,)
    targets, mask = batch.targets, batch.loss_mask
    if len(heads) == 1 and targets.dim() == 2:
        targets, mask = targets[..., None], mask[..., None]
    total = torch.zeros((), device=heads[0].device)
    for h, logits in enumerate(heads):
        t, m = targets[..., h], mask[..., h]
        ce = F.cross_entropy(logits.float().flatten(0, 1), t.flatten().clamp(0, logits.shape[-1] - 1),
                             reduction="none")
        total = total + (ce * m.flatten().float()).sum()
    return total / (mask.sum().clamp(min=1) if denom is None else denom)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: TrainBatch, *, lr: float,
               grad_clip: float, bf16: bool = False, denom: torch.Tensor | float | None = None,
               world: int = 1) -> float:
    """Forward, backward, clip and update; returns the loss. Under DDP
    (``world > 1``) ``batch`` is this rank's share, ``denom`` the global
    batch's loss-mask count: each rank's loss is its summed cross-entropy
    over ``denom``, scaled by ``world`` because DDP averages gradients, so
    the update is the global batch's; the returned loss is summed over ranks."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    device_type = batch.targets.device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
        loss = batch_loss(model, batch, denom=denom)
    optimizer.zero_grad(set_to_none=True)
    (loss * world if world > 1 else loss).backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    if world > 1:
        from .dist import all_reduce_sum

        return float(all_reduce_sum(loss.detach().float()))
    return float(loss.detach())


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------


def save_training_state(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                        meta: dict[str, str] | None = None) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    scalars = []  # 0-d tensors (AdamW's step) are stored as [1] and restored
    for i, state in optimizer.state_dict()["state"].items():
        for k, v in state.items():
            v = v if isinstance(v, torch.Tensor) else torch.tensor(v)
            if v.dim() == 0:
                scalars.append(f"optim.{i}.{k}")
                v = v.reshape(1)
            tensors[f"optim.{i}.{k}"] = v
    save_tensors(path, tensors, {**(meta or {}), "step": str(step), "scalars": ",".join(scalars)})


def load_training_state(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    """Restore weights (and AdamW state); returns the step to continue from."""
    tensors, meta = load_tensors(path)
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path} does not fit the model: {exc}") from None
    if optimizer is not None:
        state: dict[int, dict[str, torch.Tensor]] = {}
        scalars = set(filter(None, meta.get("scalars", "").split(",")))
        for k, v in tensors.items():
            if k in scalars:
                v = v.reshape(())
            if k.startswith("optim."):
                _, i, name = k.split(".", 2)
                state.setdefault(int(i), {})[name] = v
        optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    return int(meta.get("step", "0"))


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------


@attrs.define
class TrainResult:
    steps: int
    final_loss: float
    seconds: float
    tokens: int
    flops: int
    resumed_from: int = 0
    losses: list[float] = attrs.Factory(list)
    #: the continuous head's share of ``flops`` (0 for the categorical head)
    head_flops: int = 0


def train(model: torch.nn.Module, generator: Generator, codes: torch.Tensor, labels: torch.Tensor,
          cfg: TrainConfig, *, seed: int, null_class: int, checkpoint: str | Path | None = None,
          checkpoint_every: int | None = None, progress: bool = True, stop_after: int | None = None) -> TrainResult:
    """Train ``model`` for ``cfg.steps`` steps on the generator's batches of
    ``codes`` (``LongTensor[N, L]``) with ``labels`` (``LongTensor[N]``).

    With ``checkpoint``, training state is written there every
    ``checkpoint_every`` steps (default: a tenth of the run) and at the end,
    and an existing file is resumed from. ``stop_after`` ends the loop early
    after that many steps (for tests of resumption).

    Several processes (``torchrun``, see :mod:`tokenloom.dist`): the model is
    wrapped in DDP; every rank builds the step's whole global batch (so every
    draw is the one a single process makes) and trains on its rows
    ``rank::world`` (:func:`shard_batch`); only rank 0 writes checkpoints.
    The update equals the single-process one up to the order of
    floating-point reductions, so weights agree to rounding, not bit for bit
    (dropout masks, when ``dropout > 0``, are drawn per rank)."""
    from . import dist

    rank, world = dist.rank(), dist.world()
    if world > 1 and cfg.batch_size < world:
        from ..contract.errors import ConfigError

        raise ConfigError([f"train.batch_size: {cfg.batch_size} is smaller than the {world} processes"])
    device = next(model.parameters()).device
    if device.type == "cuda":  # TF32 matmuls and convolutions, as LlamaGen and DiT train (no effect on the CPU)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    codes, labels = codes.to(device), labels.to(device)
    optimizer = configure_optimizer(model, cfg)
    start = 0
    if checkpoint is not None and Path(checkpoint).is_file():
        start = load_training_state(checkpoint, model, optimizer)
    every = checkpoint_every or max(1, cfg.steps // 10)
    net = dist.ddp(model) if world > 1 else model
    step_fn = torch.compile(net) if cfg.compile else net
    seq_len = getattr(getattr(model, "spec", None), "seq_len", codes.shape[1])
    fpt = model.flops_per_token(seq_len) if hasattr(model, "flops_per_token") else 6 * sum(
        p.numel() for p in model.parameters())

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=start, desc="train", file=sys.stderr, disable=not progress or rank > 0,
               dynamic_ncols=True, leave=False)
    losses: list[float] = []
    t0 = time.perf_counter()
    model.train()
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    step = start
    for step in range(start, end):
        idx = batch_indices(codes.shape[0], cfg.batch_size, seed=seed, step=step).to(device)
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(step_seed(seed, step, 3 if rank == 0 else 100 + rank))  # dropout
            batch = make_batch(generator, codes, labels, idx, seed=seed, step=step, n_steps=cfg.steps,
                               label_dropout=cfg.label_dropout, null_class=null_class)
            denom = None
            if world > 1:  # the global batch's count, then this rank's rows of it
                denom = batch.loss_mask.sum().clamp(min=1)
                batch = shard_batch(batch, rank, world)
            loss = train_step(step_fn, optimizer, batch, lr=lr_at(step, cfg), grad_clip=cfg.grad_clip, bf16=cfg.bf16,
                              denom=denom, world=world)
        losses.append(loss)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        done = step + 1
        if checkpoint is not None and rank == 0 and (done % every == 0 or done == end):
            save_training_state(checkpoint, model, optimizer, done, {"last_loss": repr(loss)})
    bar.close()
    model.eval()
    done = max(start, end)
    tokens = done * cfg.batch_size * seq_len
    final_loss = losses[-1] if losses else float("nan")
    if not losses and start > 0:  # resumed with no step left: the loss the checkpoint recorded (issue 14)
        final_loss = float(load_tensors(checkpoint)[1].get("last_loss", "nan"))
    head_fpt = model.head_flops_per_token() if hasattr(model, "head_flops_per_token") else 0
    return TrainResult(steps=done, final_loss=final_loss,
                       seconds=time.perf_counter() - t0, tokens=tokens, flops=tokens * fpt,
                       resumed_from=start, losses=losses, head_flops=tokens * head_fpt)


# ---------------------------------------------------------------------------
# Held-out likelihood
# ---------------------------------------------------------------------------


def heldout_nll(generator: Generator, model: Any, codes: torch.Tensor, labels: torch.Tensor | None, *,
                batch_size: int = 64) -> dict[str, float] | None:
    """Held-out negative log-likelihood of ``codes`` under ``model`` through
    ``generator.log_likelihood`` — None when the order has no exact
    likelihood (masked, block, neighbour orders), never a made-up number.

    Returns ``nll_bits_per_image`` (mean over images, conditional on
    ``labels`` when given), ``nll_bits_per_token``, ``nll_bits_per_dim``
    (per pixel channel of the tokenizer's images) and
    ``uniform_bits_per_image`` = L·log2 V, the baseline of a model that
    knows nothing."""
    if not getattr(generator, "exact_likelihood", False):
        return None
    inner = getattr(model, "model", model)
    head = getattr(inner, "token_head", None)
    continuous = head is not None or codes.dtype.is_floating_point
    if continuous and not (head is not None and head.exact_likelihood):
        return None  # diffusion and flow heads have no exact likelihood: none reported
    device = next(inner.parameters()).device
    null = getattr(model, "null_class", getattr(inner, "n_classes", 0))
    total, n = 0.0, codes.shape[0]
    if n == 0:
        return None
    was_training = inner.training
    inner.eval()
    from . import dist

    parts: dict[int, float] = {}  # batch start -> summed log-likelihood; batches shared out over ranks
    with torch.no_grad():
        for i in dist.shard(list(range(0, n, batch_size))):
            c = codes[i : i + batch_size].to(device)
            y = labels[i : i + batch_size].to(device) if labels is not None else torch.full(
                (c.shape[0],), null, dtype=torch.long, device=device)
            parts[i] = float(generator.log_likelihood(model, c, y).double().sum())
    if dist.world() > 1:
        parts = {i: v for p in dist.all_gather(parts) for i, v in p.items()}
    for i in sorted(parts):  # the one-process summation order, whatever the process count
        total += parts[i]
    inner.train(was_training)
    L = codes.shape[1]
    V = generator.tokenizer.vocab_size
    bits = -total / n / math.log(2)
    dims = 1
    for s in generator.tokenizer.image_shape:
        dims *= int(s)
    return {
        "nll_bits_per_image": bits,
        "nll_bits_per_token": bits / L,
        "nll_bits_per_dim": bits / dims,
        # continuous tokens: a density, no uniform baseline over a vocabulary
        "uniform_bits_per_image": None if continuous else L * math.log2(V),
    }


__all__ = [
    "TrainResult",
    "batch_indices",
    "batch_loss",
    "configure_optimizer",
    "heldout_nll",
    "load_training_state",
    "lr_at",
    "make_batch",
    "save_training_state",
    "shard_batch",
    "step_seed",
    "train",
    "train_step",
    "unwrap",
]
