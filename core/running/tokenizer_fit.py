"""``tokenloom fit-tokenizer CONFIG --out DIR``: fit the configured tokenizer
on the configured data and report how well it reconstructs held-out images.

Writes into ``DIR``:

- ``tokenizer.safetensors`` — the fitted tokenizer (config and content hash
  in its metadata; :func:`tokenloom.checkpoint.load_component` rebuilds it);
- ``train_state.safetensors`` — the resumable training state of learned
  tokenizers (a killed run started again continues from it);
- ``reconstruction.json`` / ``reconstruction.md`` — MSE, PSNR, codebook
  utilisation and perplexity on the held-out split (and on up to 500
  training images), tokens per image, vocabulary, fit time; for a
  continuous tokenizer (no vocabulary) utilisation and perplexity are None
  ("n/a" in the Markdown) and the token width and the tokens' mean and
  standard deviation are reported instead;
- ``reconstruction.png`` — held-out originals (top row) above their
  reconstructions (bottom row).

Every file is written atomically. :func:`fit_seeded` is the one way a tokenizer is
fitted — here and in a run (:func:`tokenloom.pipeline.fit_tokenizer`, which caches the result).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import attrs
import torch

from ..blocks.data import ImageSet, open_dataset
from ..blocks.tokenizer_train import evaluate_reconstruction
from ..contract.checkpoint import save_tokenizer, write_json, write_text
from ..contract.config import RunConfig, load_config
from ..contract.registry import get_registry
from .images import grid_image, save_png
from .pipeline_check import build_tokenizer
from .results import format_number


def fit_seeded(tok: Any, images: torch.Tensor, *, seed: int, device: torch.device, progress: bool = True,
               checkpoint: Path | None = None) -> dict[str, float]:
    """Fit ``tok`` (already on ``device``) on ``images`` with the global torch RNG seeded from
    ``seed`` (and restored afterwards), keeping a resumable training state in ``checkpoint``
    (:meth:`~tokenloom.Tokenizer.fit_resumable`); leaves it in eval mode. Returns the fit's
    statistics. A training state that is corrupt (unreadable, content hash wrong) is reported,
    moved aside and the fit starts over."""
    if checkpoint is not None:
        from .cache import cache_ok

        cache_ok(Path(checkpoint))
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        tok.train()
        stats = tok.fit_resumable(images.to(device), checkpoint=checkpoint, progress=progress)
    tok.eval()
    return stats or {}


def _or_na(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def report_markdown(report: dict[str, Any]) -> str:
    """The reconstruction report as a Markdown document."""
    ho, tr = report["holdout"], report.get("train") or {}
    continuous = ho.get("token_dim") is not None
    kind = (f"continuous tokens of width {ho['token_dim']} (no vocabulary)" if continuous
            else f"vocabulary: {ho['vocab_size']}")
    lines = [
        (f"# Tokenizer `{report['tokenizer']['name']}` on `{report['data']['name']}` "
         f"({report['data']['size']} px)"),
        "",
        f"- options: `{report['tokenizer']['options']}`",
        (f"- tokens per image: {ho['tokens_per_image']} ({ho['n_scales']} scale(s), depth {ho['depth']}), "
         f"{kind}"),
        f"- fit: {report['fit'].get('steps', 0):.0f} steps in {report['fit_seconds']:.1f} s "
        f"on {report['train_images']} training images"
        + (f" (resumed at step {report['fit']['resumed_from']:.0f})" if report["fit"].get("resumed_from") else ""),
        "",
    ]
    if continuous:
        lines += ["| split | images | MSE | PSNR (dB) | token mean | token std |",
                  "|---|---:|---:|---:|---:|---:|"]
    else:
        lines += ["| split | images | MSE | PSNR (dB) | utilisation | perplexity |",
                  "|---|---:|---:|---:|---:|---:|"]
    for name, m in (("held-out", ho), ("train", tr)):
        if m and continuous:
            lines.append(f"| {name} | {m['n_images']} | {format_number(m['mse'])} | {m['psnr']:.2f} | "
                         f"{_or_na(m.get('latent_mean'), '.3f')} | {_or_na(m.get('latent_std'), '.3f')} |")
        elif m:
            lines.append(f"| {name} | {m['n_images']} | {format_number(m['mse'])} | {m['psnr']:.2f} | "
                         f"{m['utilisation']:.3f} | {m['perplexity']:.1f} |")
    usage = ("continuous tokens have no codebook (utilisation and perplexity: not applicable); token mean and "
             "std are over all values of the split's tokens (after the tokenizer's scale factor, if any)."
             if continuous else
             "utilisation is the fraction of the vocabulary used at least once on the split, perplexity "
             "exp(entropy) of its code histogram.")
    lines += ["", ("PSNR for images in [-1, 1] (peak-to-peak 2) from the mean squared error over all pixels; "
                   + usage),
              "", "![originals above reconstructions](reconstruction.png)", ""]
    return "\n".join(lines)


def fit_tokenizer_run(cfg: RunConfig, out: str | Path, *, progress: bool = True, registry: Any = None,
                      n_png: int = 16) -> dict[str, Any]:
    """Fit ``cfg.tokenizer`` on ``cfg.data`` (seed ``cfg.seed``, on the CPU), write the
    files listed in the module docstring into ``out`` and return the report."""
    registry = registry or get_registry()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train = open_dataset(cfg.data, split="train", seed=cfg.seed)  # folder, hf: streamed, never all in memory
    holdout = open_dataset(cfg.data, split="holdout", seed=cfg.seed)
    holdout = holdout if isinstance(holdout, ImageSet) else holdout.materialize()
    shape = tuple(train.images.shape[1:])
    tok = build_tokenizer(cfg, registry)
    t0 = time.perf_counter()
    stats = fit_seeded(tok, train.images, seed=cfg.seed, device=torch.device("cpu"), progress=progress,
                       checkpoint=out / "train_state.safetensors")
    fit_seconds = time.perf_counter() - t0
    digest = save_tokenizer(out / "tokenizer.safetensors", tok, name=cfg.tokenizer.name,
                            options=dict(cfg.tokenizer.options))
    evaluation = holdout.images if len(holdout) else train.images[:500]
    ho = evaluate_reconstruction(tok, evaluation)
    tr = evaluate_reconstruction(tok, train.images[:500]) if len(holdout) else None
    with torch.no_grad():
        x = evaluation[:n_png]
        y = tok.decode(tok.encode(x))
    save_png(out / "reconstruction.png", grid_image([x, y], scale=max(1, 64 // shape[-1]), background=128))
    report = {
        "tokenizer": {"name": cfg.tokenizer.name, "options": dict(cfg.tokenizer.options),
                      "config": attrs.asdict(tok.config) if attrs.has(type(tok.config)) else None,
                      "sha256": digest},
        "data": attrs.asdict(cfg.data),
        "seed": cfg.seed,
        "image_shape": list(shape),
        "train_images": len(train),
        "fit": {k: float(v) for k, v in stats.items()},
        "fit_seconds": fit_seconds,
        "evaluated_on": "holdout" if len(holdout) else "the first 500 training images (n_holdout = 0)",
        "holdout": ho,
        "train": tr,
        "files": {"tokenizer": "tokenizer.safetensors", "png": "reconstruction.png",
                  "markdown": "reconstruction.md", "train_state": "train_state.safetensors"},
    }
    write_json(out / "reconstruction.json", report)
    write_text(out / "reconstruction.md", report_markdown(report))
    return report


def fit_tokenizer_file(path: str | Path, out: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """:func:`fit_tokenizer_run` on a TOML config file."""
    return fit_tokenizer_run(load_config(path), out, progress=progress)


__all__ = ["fit_seeded", "fit_tokenizer_file", "fit_tokenizer_run", "report_markdown"]
