"""Generating a run's samples: the micro-batch loop, the regions of zero-shot inpainting and
outpainting, and decoding codes back to images.

:func:`generate_codes` is what makes a run's image i the same bits whatever ``n_samples`` or the
process count: fixed micro-batches of :data:`MICRO_BATCH` rows, image i drawing from
``RowRNG(seed, i)``.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch

from ..backbone import dist
from ..blocks.rng import RowRNG
from ..contract.errors import ConfigError
from ..contract.interfaces import Known, TokenLayout
from .machine import peak_memory_bytes, reset_peak_memory

#: Images generated per forward batch. Fixed, so image i sees the same
#: floating-point computation whatever ``n_samples`` or the process count.
MICRO_BATCH = 16
#: Regions ``known_region`` can regenerate (the rest of the image is kept).
REGIONS = ("center", "border", "left", "right", "top", "bottom")


def region_mask(layout: TokenLayout, region: str) -> torch.Tensor:
    """``BoolTensor[L]``: True where a code is *known* (kept) when
    ``region`` is regenerated — ``center`` (inpainting the middle half),
    ``border`` (outpainting around the kept middle), or a half: ``left``,
    ``right``, ``top``, ``bottom``."""
    if region not in REGIONS:
        raise ConfigError([f"region: must be one of {', '.join(REGIONS)}, got {region!r}"])
    parts = []
    for h, w in layout.scales:
        r = (torch.arange(h, dtype=torch.float64)[:, None] + 0.5) / h  # (h, 1) in (0, 1)
        c = (torch.arange(w, dtype=torch.float64)[None, :] + 0.5) / w  # (1, w)
        middle = (r > 0.25) & (r < 0.75) & (c > 0.25) & (c < 0.75)
        unknown = {
            "center": middle,
            "border": ~middle,
            "left": (c < 0.5).expand(h, w),
            "right": (c > 0.5).expand(h, w),
            "top": (r < 0.5).expand(h, w),
            "bottom": (r > 0.5).expand(h, w),
        }[region]
        parts.append((~unknown).flatten().repeat_interleave(layout.depth))
    return torch.cat(parts)


def generate_codes(generator: Any, model: Any, chain: Any, labels: torch.Tensor, *, seed: int,
                   known: Known | None = None, progress: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
    """Generate one code sequence per label in fixed micro-batches of
    :data:`MICRO_BATCH`; image i uses ``RowRNG(seed, i)``. Returns the codes
    and the cost statistics measured by the instrumented ``model``.

    Every micro-batch has exactly :data:`MICRO_BATCH` rows: the last one is
    filled up with extra images (indices n, n + 1, …, labels and known codes
    taken round robin) that are generated and dropped. The kernels pick
    their blocking by the number of rows, so this is what makes image i the
    same bits whatever ``n`` is; the extras' work counts in the time per
    image and their draws in the generator's statistics (more samples of
    the same distribution).

    Under torchrun the micro-batches are shared out round robin over the
    ranks and gathered on every rank in their order, so the codes are those
    of one process; ``seconds_per_image`` is then the ranks' summed compute
    time per image.

    A model with a continuous head (diffusion, flow) also reports its
    sampling cost, counted by the instrumented model apart from the NFE:
    ``head_steps`` (sequential head steps per micro-batch, as ``nfe``),
    ``head_steps_per_token``, ``head_evals_per_image`` (network evaluations,
    null rows of guidance included), ``head_flops_per_image`` and, to compare
    with it, ``backbone_flops_per_image`` (2 × the backbone's non-embedding
    weights per input token scored; attention left out). Codes are
    then latents ``FloatTensor[n, L, D]``."""
    from tqdm.auto import tqdm

    n = labels.shape[0]
    dev = model.device
    starts = list(range(0, n, MICRO_BATCH))
    parts: dict[int, tuple[torch.Tensor, int, float, int]] = {}  # start -> (codes, nfe, seconds, kv bytes)
    heads: dict[int, tuple[int, int, int, int]] = {}  # start -> a continuous head's (steps, evals, FLOPs), tokens
    reset_peak_memory()
    for i in tqdm(dist.shard(starts), desc="generate", file=sys.stderr, disable=not progress, leave=False):
        idx = torch.arange(i, i + MICRO_BATCH)  # past n: the extras that fill the last micro-batch
        real = min(n, i + MICRO_BATCH) - i
        src = idx % n
        sub = None if known is None else Known(known.codes[src].to(dev), known.mask[src].to(dev))
        model.reset()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():  # no autograd bookkeeping on any tensor of the decoding loop
            codes = generator.generate(model, chain, labels[src].to(dev), rng=RowRNG(seed, idx.to(dev)), known=sub)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        heads[i] = (getattr(model, "head_steps", 0), getattr(model, "head_evals", 0), getattr(model, "head_flops", 0),
                    getattr(model, "tokens", 0))
        parts[i] = (codes[:real].cpu(), model.nfe, time.perf_counter() - t0, model.kv_cache_bytes)
    peak = peak_memory_bytes(dev)
    if dist.world() > 1:  # every rank's micro-batches, back in their order
        gathered = dist.all_gather((parts, peak, heads))
        parts = {i: v for p, _, _ in gathered for i, v in p.items()}
        heads = {i: v for _, _, h in gathered for i, v in h.items()}
        peak = max((pk for _, pk, _ in gathered if pk is not None), default=None)
    codes = torch.cat([parts[i][0] for i in starts])
    nfes = [parts[i][1] for i in starts]
    seconds = 0.0
    for i in starts:
        seconds += parts[i][2]
    kv = max([0] + [parts[i][3] for i in starts])
    L = codes.shape[1]
    stats = {
        "nfe": float(sum(nfes) / len(nfes)),
        "seconds_per_image": seconds / n,
        "tokens_per_second": n * L / seconds if seconds > 0 else float("nan"),
        "kv_cache_bytes": float(kv),
        "peak_memory_bytes": peak,
    }
    if getattr(model, "head", None) is not None:  # a continuous head: its cost, counted apart from the NFE
        stats["head_steps"] = float(sum(heads[i][0] for i in starts) / len(starts))  # per batch, like nfe
        stats["head_steps_per_token"] = float(model.head.steps)
        stats["head_evals_per_image"] = float(sum(heads[i][1] for i in starts) / n)
        stats["head_flops_per_image"] = float(sum(heads[i][2] for i in starts) / n)
        # the backbone's side of the same comparison: 2 FLOPs per weight per input token scored (forward)
        inner = getattr(model, "model", model)
        per_token = 2 * inner.n_params() if hasattr(inner, "n_params") else 0
        stats["backbone_flops_per_image"] = float(sum(heads[i][3] for i in starts) * per_token / n)
    return codes, stats


def decode_all(tok: Any, codes: torch.Tensor, device: torch.device, *, batch_size: int = 256) -> torch.Tensor:
    """``tok.decode`` of every code sequence, ``batch_size`` at a time on ``device``; CPU images."""
    with torch.no_grad():
        parts = [tok.decode(codes[i : i + batch_size].to(device)).cpu() for i in range(0, codes.shape[0], batch_size)]
    return torch.cat(parts)


def context_images(tok: Any, known: Known, device: torch.device) -> torch.Tensor:
    """Decoded known codes with the regenerated region greyed out."""
    imgs = decode_all(tok, known.codes, device)
    layout = tok.layout
    h, w = layout.grid
    last = layout.scale_slices()[-1]
    m = known.mask[:, last].reshape(-1, h, w, layout.depth).any(-1).float()[:, None]  # (n, 1, h, w)
    m = torch.nn.functional.interpolate(m, size=imgs.shape[-2:], mode="nearest")
    return torch.where(m > 0.5, imgs, torch.zeros_like(imgs))


__all__ = ["MICRO_BATCH", "REGIONS", "context_images", "decode_all", "generate_codes", "region_mask"]
