"""Tokenizer training loop and reconstruction evaluation.

:func:`train_tokenizer` trains any tokenizer that has
``training_loss(images) -> (loss, stats)`` (the learned tokenizers built on
:class:`tokenloom.autoencoder.AutoencoderTokenizer`): AdamW (β = 0.9, 0.95),
linear warm-up over the first 5 % of steps then cosine decay to 10 % of the
learning rate, gradient clipping at 1.0, batches drawn from an explicit
``torch.Generator(seed)``. Streamed images (:mod:`tokenloom.blocks.streaming`)
are never held in memory: each step's batch (indices a pure function of
``(seed, step)``, :func:`stream_batches`) is decoded by DataLoader workers a
few steps ahead. With ``checkpoint=PATH`` the whole training state
(weights, optimiser moments, step, batch generator) is written atomically as
safetensors every ``checkpoint_every`` steps with a key of the run's
configuration; a run started again with the same configuration resumes where
the file left off and ends with the same weights as an uninterrupted run. A
file for another configuration is a :class:`~tokenloom.errors.CheckpointError`.

:func:`evaluate_reconstruction` reports MSE, PSNR (peak-to-peak 2 for images
in [-1, 1], from the mean squared error over all pixels), codebook
utilisation (fraction of the ``V`` codes used at least once on the evaluated
images) and perplexity (``exp`` of the entropy of the code histogram, over
all positions, scales and depths together); for continuous tokens (no
vocabulary) those two are None and the tokens' mean and spread are reported.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..contract.checkpoint import load_tensors, save_tensors
from ..contract.errors import CheckpointError, InputError
from ..contract.interfaces import check_images
from .streaming import is_lazy


def _lr_at(step: int, steps: int, lr: float) -> float:
    warm = max(1, steps // 20)
    if step < warm:
        return lr * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def run_key(tokenizer: torch.nn.Module, images: torch.Tensor, **options: Any) -> str:
    """A hash of what a training run depends on: the tokenizer's class and
    config, the image tensor and the loop options."""
    h = hashlib.sha256()
    cfg = tokenizer.config
    import attrs

    try:
        cfg = attrs.asdict(cfg)
    except attrs.exceptions.NotAnAttrsClassError:  # non-attrs configs are hashed by repr (default=str)
        pass
    h.update(json.dumps({"cls": f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}",
                         "config": cfg, "image_shape": list(tokenizer.image_shape), **options},
                        sort_keys=True, default=str).encode())
    h.update(str(tuple(images.shape)).encode())
    if is_lazy(images):  # streamed: what identifies its files, not the pixels (never all in memory)
        h.update(json.dumps(images.identity(), sort_keys=True, default=str).encode())
    else:
        h.update(images.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def stream_batches(n: int, batch_size: int, *, seed: int, start: int, steps: int,
                   flip: bool = False) -> Iterator[list[int]]:
    """The image indices of steps ``start..steps-1`` of a streamed fit (with replacement), each
    step's a pure function of ``(seed, step)`` so a resumed fit draws what an uninterrupted one
    would; with ``flip``, about half are ``~i`` (image ``i`` flipped horizontally)."""
    for step in range(start, steps):
        g = torch.Generator().manual_seed((int(seed) * 1_000_003 + step * 7_919 + 0x5EED) % (2**63))
        idx = torch.randint(n, (batch_size,), generator=g)
        if flip:
            idx = torch.where(torch.rand(batch_size, generator=g) < 0.5, ~idx, idx)
        yield idx.tolist()


def _save_state(path: Path, tok: torch.nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
                step: int, key: str) -> None:
    tensors = {f"model.{k}": v for k, v in tok.state_dict().items()}
    st = opt.state_dict()
    for i, s in st["state"].items():
        for name, v in s.items():
            tensors[f"optim.{i}.{name}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
    tensors["generator"] = gen.get_state()
    save_tensors(path, tensors, {"tokenloom_kind": "tokenizer-train-state", "step": str(step), "run_key": key})


def _load_state(path: Path, tok: torch.nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
                key: str) -> int:
    tensors, meta = load_tensors(path)
    if meta.get("tokenloom_kind") != "tokenizer-train-state":
        raise CheckpointError(f"{path} is not a tokenizer training state")
    if meta.get("run_key") != key:
        raise CheckpointError(
            f"{path} was written by a training run with another configuration or other data "
            f"(key {meta.get('run_key', '?')[:12]} != {key[:12]}); delete it or use another output directory"
        )
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        tok.load_state_dict(model, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: training state does not fit the tokenizer: {exc}") from None
    st = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    st["state"] = state
    opt.load_state_dict(st)
    gen.set_state(tensors["generator"])
    return int(meta["step"])


def train_tokenizer(tokenizer: Any, images: torch.Tensor, *, steps: int, batch_size: int = 32, lr: float = 2e-3,
                    weight_decay: float = 0.0, seed: int = 0, progress: bool = True, checkpoint: Any = None,
                    checkpoint_every: int = 100, grad_clip: float = 1.0) -> dict[str, float]:
    """Train ``tokenizer`` on ``images`` (``[N, C, H, W]`` float32 in
    [-1, 1]: a tensor, or a streamed :class:`~tokenloom.blocks.streaming.LazyImages`);
    returns the last step's statistics (running means) plus ``steps`` and
    ``seconds``. See the module docstring."""
    from tqdm.auto import tqdm

    streamed = is_lazy(images)
    if streamed:
        if tuple(images.shape[1:]) != tuple(tokenizer.image_shape):
            raise InputError(f"{type(tokenizer).__name__}.fit: images are {tuple(images.shape[1:])}, the tokenizer "
                             f"expects {tuple(tokenizer.image_shape)}")
    else:
        images = check_images(images, tokenizer.image_shape, where=f"{type(tokenizer).__name__}.fit: images")
    if images.shape[0] == 0:
        raise InputError(f"{type(tokenizer).__name__}.fit: no training images")
    if steps <= 0:
        tokenizer.eval()
        return {"steps": 0.0, "seconds": 0.0}
    params = [p for p in tokenizer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(int(seed))
    key = run_key(tokenizer, images, steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                  seed=seed, grad_clip=grad_clip)
    start = 0
    path = Path(checkpoint) if checkpoint is not None else None
    if path is not None and path.exists():
        start = _load_state(path, tokenizer, opt, gen, key)
    n = images.shape[0]
    bs = min(batch_size, n)
    tokenizer.train()
    running: dict[str, float] = {}
    batches = None
    if streamed:  # decoded by DataLoader workers, a few batches ahead; never all images at once
        device = next(iter(tokenizer.parameters()), torch.empty(0)).device
        batches = images.to(device).batches(stream_batches(n, bs, seed=seed, start=start, steps=steps,
                                                           flip=images.flip))
    t0 = time.perf_counter()
    bar = tqdm(range(start, steps), total=steps, initial=start, disable=not progress, file=sys.stderr,
               desc=f"fit {type(tokenizer).__name__}", leave=False, dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr)
        if batches is not None:
            x = next(batches)
        else:
            x = images[torch.randint(n, (bs,), generator=gen)]
        loss, stats = tokenizer.training_loss(x)
        if not torch.isfinite(loss):
            raise InputError(f"{type(tokenizer).__name__}.fit: loss became {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        with torch.no_grad():
            stats.update(tokenizer.after_step(step, gen) if hasattr(tokenizer, "after_step") else {})
        for k, v in stats.items():
            running[k] = v if k not in running else 0.95 * running[k] + 0.05 * v
        if progress and (step % 10 == 0 or step == steps - 1):
            bar.set_postfix({k: f"{v:.4g}" for k, v in list(running.items())[:4]}, refresh=False)
        if path is not None and ((step + 1) % checkpoint_every == 0 or step == steps - 1):
            _save_state(path, tokenizer, opt, gen, step + 1, key)
    bar.close()
    if batches is not None:
        batches.close()  # the DataLoader's workers end here
    tokenizer.eval()
    return {**running, "steps": float(steps), "resumed_from": float(start), "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------


def code_statistics(codes: torch.Tensor, vocab_size: int) -> dict[str, float]:
    """Utilisation (fraction of the vocabulary used) and perplexity
    (``exp`` of the entropy of the code histogram) of ``codes`` (any shape)."""
    counts = torch.bincount(codes.reshape(-1).long(), minlength=vocab_size).double()
    total = counts.sum()
    if total == 0:
        return {"utilisation": 0.0, "perplexity": 0.0}
    p = counts[counts > 0] / total
    return {"utilisation": float((counts > 0).sum() / vocab_size), "perplexity": float(torch.exp(-(p * p.log()).sum()))}


def latent_statistics(tokens: torch.Tensor) -> dict[str, float | None]:
    """Mean and standard deviation of continuous tokens (``[N, L, D]``, over all
    values) — the spread a diffusion or flow head has to model (None when empty)."""
    if tokens.numel() == 0:
        return {"latent_mean": None, "latent_std": None}
    t = tokens.double()
    return {"latent_mean": float(t.mean()), "latent_std": float(t.std()) if t.numel() > 1 else 0.0}


def psnr(mse: float) -> float:
    """PSNR in dB for images in [-1, 1] (peak-to-peak 2)."""
    return float("inf") if mse <= 0 else 10.0 * math.log10(4.0 / mse)


@torch.no_grad()
def evaluate_reconstruction(tokenizer: Any, images: torch.Tensor, *, batch_size: int = 100) -> dict[str, Any]:
    """Encode and decode ``images``; returns ``mse``, ``psnr``,
    ``utilisation``, ``perplexity`` (None for continuous tokens, which report
    ``token_dim``, ``latent_mean`` and ``latent_std`` instead), ``tokens_per_image``, ``vocab_size``,
    ``n_scales``, ``depth``, ``n_images``, ``encode_seconds`` and
    ``decode_seconds`` (wall clock for the whole set)."""
    was_training = tokenizer.training
    tokenizer.eval()
    codes, sq = [], 0.0
    t_enc = t_dec = 0.0
    for i in range(0, images.shape[0], batch_size):
        x = images[i : i + batch_size]
        t = time.perf_counter()
        c = tokenizer.encode(x)
        t_enc += time.perf_counter() - t
        t = time.perf_counter()
        y = tokenizer.decode(c)
        t_dec += time.perf_counter() - t
        sq += float(((y.double() - x.double()) ** 2).sum())
        codes.append(c)
    tokenizer.train(was_training)
    n = images.shape[0]
    mse = sq / max(1, images.numel())
    if getattr(tokenizer, "continuous", False):  # float tokens: no code histogram, their spread instead
        tokens = torch.cat(codes) if codes else torch.zeros(0, tokenizer.layout.length, tokenizer.token_dim)
        usage: dict[str, Any] = {"utilisation": None, "perplexity": None, "token_dim": int(tokenizer.token_dim),
                                 **latent_statistics(tokens)}
    else:
        all_codes = torch.cat(codes) if codes else torch.zeros(0, tokenizer.layout.length, dtype=torch.long)
        usage = code_statistics(all_codes, tokenizer.vocab_size)
    return {
        "mse": mse,
        "psnr": psnr(mse),
        **usage,
        "tokens_per_image": tokenizer.layout.length,
        "vocab_size": tokenizer.vocab_size,
        "n_scales": tokenizer.layout.n_scales,
        "depth": tokenizer.layout.depth,
        "n_images": n,
        "encode_seconds": t_enc,
        "decode_seconds": t_dec,
    }


__all__ = ["code_statistics", "evaluate_reconstruction", "latent_statistics", "psnr", "run_key", "train_tokenizer"]
