"""Discrete against continuous tokens at equal backbone training FLOPs on 16-px ``shapes``
(issue 17 item 5): runs the study through the pipeline and writes ``docs/continuous.md`` and
``docs/continuous/quality-vs-head-steps.png`` from what it measured.

    .venv/bin/python bench/continuous.py [--budget smoke|full] [--out runs/continuous-<budget>]
        [--docs docs] [--top-steps N]

(``make continuous`` runs the full budget: 30 min measured on the shared 2-core CPU at load 6–9,
one thread; ``--budget smoke`` runs the same code path in about 6 min there, into
``runs/continuous-smoke`` and ``runs/continuous-smoke/docs``; ``--ceilings`` measures the
tokenizers' reconstruction into saved results, ``--from-results`` only writes the document again.)

Three pairs, each a discrete order on ``vq``/``multiscale`` codes and its continuous counterpart
on ``kl`` latents (same token grid: 8 × 8 tokens, the multi-scale pair the same scales):

- ``masked`` (MaskGIT) on VQ codes  vs  MAR-style ``masked`` (``style = "mar"``) + ``diffusion``;
- ``raster`` on VQ codes            vs  ``raster`` + ``diffusion`` head;
- VAR (``next-scale`` on ``multiscale``) vs FlowAR (``next-scale`` + ``flow`` head on ``kl`` scales).

Every backbone has the recipe's shape (``examples/shapes-recipe.toml``: 4 layers × 128, batch 64,
lr 4e-3, warm-up 100). The budget is ``--top-steps`` steps of raster on VQ in *backbone* training
FLOPs (the trainer's count, ``6 N + 12 · n_layer · d · T`` per token, a continuous head's own FLOPs
taken out); every other arm gets the steps that spend the same backbone FLOPs at its own sequence
length and parameter count. The continuous heads' own training FLOPs are extra and reported apart.

Each continuous model is trained once; its head's sampling steps (diffusion ``sampling_steps``,
flow ``steps``) are then swept at sampling only: those options are the heads' sampling-only
options (``Config.sampling_options``, read by ``tokenloom.cache.head_keys``), outside the
model's cache key. Everything runs through ``tokenloom.pipeline.run`` into one output directory
with one cache, so a re-run reuses every finished stage. One torch thread (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from common import describe_machine, machine_info

N_CLASSES = 3  # shapes: circle, square, triangle

#: the heads' options that change only sampling (left out of the model's cache key)
SAMPLING_OPTIONS = {"diffusion": ("sampling_steps", "clip_denoised"), "flow": ("steps", "time_grid")}


@dataclass(frozen=True)
class Budget:
    name: str
    top_steps: int  # raster-on-VQ steps whose backbone FLOPs every arm spends
    n: int
    n_holdout: int
    tokenizer_steps: int
    n_samples: int
    warmup: int
    fid_recipe_steps: int
    diffusion_steps: tuple[int, ...] = (5, 10, 20, 50)
    flow_steps: tuple[int, ...] = (2, 5, 10, 20)
    size: int = 16
    model: tuple[int, int, int] = (4, 128, 4)
    batch_size: int = 64
    lr: float = 4e-3


BUDGETS = {
    "smoke": Budget("smoke", top_steps=20, n=2000, n_holdout=64, tokenizer_steps=60, n_samples=16, warmup=5,
                    fid_recipe_steps=30, diffusion_steps=(5, 20), flow_steps=(2, 10)),
    "full": Budget("full", top_steps=200, n=10000, n_holdout=200, tokenizer_steps=600, n_samples=128,
                   warmup=100, fid_recipe_steps=500),
}

SCALES = [1, 2, 3, 4, 6, 8]  # the multiscale tokenizer's default on an 8 × 8 grid; FlowAR's kl the same


def tokenizers(b: Budget) -> dict[str, dict]:
    return {
        "vq": {"name": "vq", "downsample": 2, "codebook_size": 128, "steps": b.tokenizer_steps},
        "multiscale": {"name": "multiscale", "downsample": 2, "codebook_size": 128, "scales": SCALES,
                       "steps": b.tokenizer_steps},
        "kl": {"name": "kl", "downsample": 2, "token_dim": 4, "steps": b.tokenizer_steps},
        "kl-scales": {"name": "kl", "downsample": 2, "token_dim": 4, "scales": SCALES,
                      "steps": b.tokenizer_steps},
    }


@dataclass(frozen=True)
class Arm:
    label: str
    pair: str
    tokenizer: str
    generator: dict
    head: dict | None = None
    sweep_key: str | None = None  # the head's sampling-steps option
    sweep: tuple[int, ...] = ()
    chain: list = field(default_factory=list)


PAIRS = ["MAR vs MaskGIT", "raster: diffusion head vs VQ", "FlowAR vs VAR"]


def arms(b: Budget) -> list[Arm]:
    topk = [{"name": "top-k", "k": 4}]  # the recipe's chain for codes
    # the heads at the examples' size (width 64, depth 2; MAR's 4 noise draws per token for diffusion):
    # the defaults (width 128, depth 3) cost 1.6 × the backbone's training FLOPs at this size
    diff = {"name": "diffusion", "width": 64, "depth": 2}
    flow = {"name": "flow", "width": 64, "depth": 2}
    return [
        Arm("masked (MaskGIT, vq)", PAIRS[0], "vq", {"name": "masked", "steps": 8}, chain=topk),
        Arm("MAR (masked + diffusion, kl)", PAIRS[0], "kl", {"name": "masked", "style": "mar", "steps": 8},
            diff, "sampling_steps", b.diffusion_steps),
        Arm("raster (vq)", PAIRS[1], "vq", {"name": "raster"}, chain=topk),
        Arm("raster + diffusion (kl)", PAIRS[1], "kl", {"name": "raster"}, diff, "sampling_steps",
            b.diffusion_steps),
        Arm("VAR (next-scale, multiscale)", PAIRS[2], "multiscale", {"name": "next-scale"}, chain=topk),
        Arm("FlowAR (next-scale + flow, kl scales)", PAIRS[2], "kl-scales", {"name": "next-scale"},
            flow, "steps", b.flow_steps),
    ]


def reference_steps(arm: Arm) -> int | None:
    """The head-steps value the arm is trained under (the head's default when it is in the sweep)."""
    if not arm.sweep:
        return None
    default = 20 if arm.head["name"] == "diffusion" else 10
    return default if default in arm.sweep else arm.sweep[0]


def run_doc(b: Budget, arm: Arm, steps: int, head_steps: int | None) -> dict:
    m: dict[str, Any] = {"names": ["shapes-oracle", "fid", "cost"], "n_samples": b.n_samples,
                         "fid": {"recipe_steps": b.fid_recipe_steps}}
    doc = {
        "seed": 0,
        "data": {"name": "shapes", "size": b.size, "n": b.n, "n_holdout": b.n_holdout},
        "tokenizer": dict(tokenizers(b)[arm.tokenizer]),
        "generator": dict(arm.generator),
        "model": {"n_layer": b.model[0], "d_model": b.model[1], "n_head": b.model[2]},
        "train": {"steps": steps, "batch_size": b.batch_size, "lr": b.lr, "warmup": min(b.warmup, steps)},
        "sampler": [dict(s) for s in arm.chain],
        "metrics": m,
        "device": "cpu",
    }
    if arm.head is not None:
        doc["head"] = dict(arm.head)
        if head_steps is not None:
            doc["head"][arm.sweep_key] = head_steps
    return doc


def declare_sampling_options(registry: Any) -> list[str]:
    """Make sure the built-in heads name their sampling-only options (``Config.sampling_options``,
    read by ``tokenloom.cache.head_keys``); returns the heads this script had to declare them for
    (empty once the heads declare them themselves)."""
    patched = []
    for name, options in SAMPLING_OPTIONS.items():
        cfg_cls = registry.get("head", name).cls.Config
        if tuple(getattr(cfg_cls, "sampling_options", ())) != options:
            cfg_cls.sampling_options = options
            patched.append(name)
    return patched


def backbone_flops_per_step(b: Budget, arm: Arm) -> tuple[float, float]:
    """(backbone, head) training FLOPs of one step of ``arm`` (the trainer's count)."""
    from tokenloom.config import build_component, parse_config
    from tokenloom.model import build_model
    from tokenloom.pipeline_check import build_head
    from tokenloom.registry import get_registry

    registry = get_registry()
    cfg = parse_config(run_doc(b, arm, 1, reference_steps(arm)), registry=registry, source="bench/continuous.py")
    tok = build_component(registry, "tokenizer", cfg.tokenizer.name,
                          {**cfg.tokenizer.options, "image_shape": (3, b.size, b.size)}, path="tokenizer")
    gen = build_component(registry, "generator", cfg.generator.name,
                          {**cfg.generator.options, "tokenizer": tok}, path="generator")
    spec = gen.model_spec()
    head = (lambda: build_head(cfg, registry, tok)) if spec.token_dim else None
    model = build_model(spec, cfg.model, n_classes=N_CLASSES, seed=0, head=head)
    per_token = float(model.flops_per_token(spec.seq_len))
    head_per_token = float(model.head_flops_per_token()) if model.token_head is not None else 0.0
    tokens = b.batch_size * spec.seq_len
    return tokens * (per_token - head_per_token), tokens * head_per_token


def record(arm: Arm, rec: dict, head_steps: int | None, wall: float) -> dict:
    m = rec["metrics"]
    train = rec.get("train") or {}
    total = m.get("train_flops") or train.get("flops")
    head_train = m.get("train_head_flops") or 0.0
    return {
        "arm": arm.label, "pair": arm.pair, "continuous": arm.head is not None,
        "head": (arm.head or {}).get("name", "categorical"), "head_steps_setting": head_steps,
        "train_steps": rec["config"]["train"]["steps"],
        "train_flops": total, "train_head_flops": head_train,
        "backbone_train_flops": None if total is None else float(total) - float(head_train),
        "train_seconds": train.get("seconds"),
        "model_reused": bool(rec.get("cache", {}).get("model_reused")),
        "shapes_valid": m.get("shapes_valid"), "fid": m.get("fid"), "nfe": m.get("nfe"),
        "head_steps": m.get("head_steps"), "head_steps_per_token": m.get("head_steps_per_token"),
        "seconds_per_image": m.get("seconds_per_image"),
        "head_flops_per_image": m.get("head_flops_per_image"),
        "backbone_flops_per_image": m.get("backbone_flops_per_image"),
        "wall_seconds": wall,
    }


def run_all(b: Budget, out: Path, *, progress: bool) -> tuple[list[dict], dict]:
    from tokenloom.config import parse_config
    from tokenloom.pipeline import run
    from tokenloom.registry import get_registry

    registry = get_registry()
    patched = declare_sampling_options(registry)
    per_step = {a.label: backbone_flops_per_step(b, a) for a in arms(b)}
    ref = per_step[arms(b)[2].label][0]  # raster on VQ
    plan = {label: max(1, round(b.top_steps * ref / bb)) for label, (bb, _) in per_step.items()}
    rows = []
    for arm in arms(b):
        values = [reference_steps(arm)] + [s for s in arm.sweep if s != reference_steps(arm)]
        for hs in values:
            cfg = parse_config(run_doc(b, arm, plan[arm.label], hs), registry=registry,
                               source=f"bench/continuous.py ({arm.label})")
            print(f"[continuous] {arm.label}: {plan[arm.label]} steps"
                  + ("" if hs is None else f", head steps {hs}"), flush=True)
            t0 = time.perf_counter()
            rec = run(cfg, out, progress=progress, write_report=False)
            rows.append(record(arm, rec, hs, time.perf_counter() - t0))
            r = rows[-1]
            print(f"[continuous]   valid {r['shapes_valid']}, fid {r['fid']}, nfe {r['nfe']}, head steps "
                  f"{r['head_steps']}, {r['seconds_per_image']} s/image, model reused {r['model_reused']}",
                  flush=True)
    info = {"per_step": {k: {"backbone": v[0], "head": v[1]} for k, v in per_step.items()},
            "plan": plan, "patched_sampling_options": patched}
    return rows, info


def tokenizer_ceilings(b: Budget, out: Path, *, progress: bool) -> dict[str, dict]:
    """Each tokenizer's held-out round trip (the ``reconstruction`` metric: MSE, PSNR, rFID with the
    same offline extractor as FID): the ceiling of what a generator on its tokens can reach. One run
    per tokenizer, on the first arm that uses it (every stage but the metric found in the cache)."""
    from tokenloom.config import parse_config
    from tokenloom.pipeline import run
    from tokenloom.registry import get_registry

    registry = get_registry()
    declare_sampling_options(registry)
    per_step = {a.label: backbone_flops_per_step(b, a) for a in arms(b)}
    ref = per_step[arms(b)[2].label][0]
    seen: dict[str, dict] = {}
    for arm in arms(b):
        if arm.tokenizer in seen:
            continue
        doc = run_doc(b, arm, max(1, round(b.top_steps * ref / per_step[arm.label][0])), reference_steps(arm))
        doc["metrics"] = {"names": ["reconstruction"], "n_samples": b.n_samples,
                          "reconstruction": {"recipe_steps": b.fid_recipe_steps}}
        print(f"[continuous] reconstruction of {arm.tokenizer}", flush=True)
        rec = run(parse_config(doc, registry=registry, source="bench/continuous.py (ceiling)"), out,
                  progress=progress, write_report=False)
        m = rec["metrics"]
        seen[arm.tokenizer] = {"mse": m.get("mse"), "psnr": m.get("psnr"), "rfid": m.get("rfid"),
                               "table": tokenizers(b)[arm.tokenizer]}
    return seen


# ---------------------------------------------------------------------------
# Writing the document
# ---------------------------------------------------------------------------


def _f(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if isinstance(x, int):
        return str(x)
    return f"{x:.{digits}g}" if abs(x) >= 1e4 or 0 < abs(x) < 1e-3 else f"{x:.{digits}f}".rstrip("0").rstrip(".")


def _e(x: Any) -> str:
    return "—" if x is None else f"{float(x):.3g}"


def reference_rows(rows: list[dict], b: Budget) -> list[dict]:
    out = []
    for arm in arms(b):
        hits = [r for r in rows if r["arm"] == arm.label and r["head_steps_setting"] == reference_steps(arm)]
        out.append(hits[0])
    return out


def plot(rows: list[dict], b: Budget, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for arm in arms(b):
        if not arm.sweep:
            continue
        pts = sorted((r["head_steps_setting"], r) for r in rows if r["arm"] == arm.label)
        xs = [p[0] for p in pts]
        line = axes[0].plot(xs, [p[1]["shapes_valid"] for p in pts], "o-", label=arm.label)[0]
        axes[1].plot(xs, [p[1]["fid"] for p in pts], "o-", label=arm.label, color=line.get_color())
        disc = next(r for r in rows if r["pair"] == arm.pair and not r["continuous"])
        axes[0].axhline(disc["shapes_valid"], ls="--", color=line.get_color(), lw=1, label=disc["arm"])
        axes[1].axhline(disc["fid"], ls="--", color=line.get_color(), lw=1)
    top = max([r["shapes_valid"] or 0.0 for r in rows] + [0.0])
    axes[0].set_ylim(-0.02, max(0.1, top * 1.15))
    ticks = sorted(set(b.diffusion_steps) | set(b.flow_steps))
    for ax, name in zip(axes, ("shapes_valid (oracle, higher is better)", "FID (offline extractor, lower is better)")):
        ax.set_xscale("log")
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("head steps per token (sampling only; one trained model per line)")
        ax.set_title(name, fontsize=9)
    axes[0].legend(fontsize=6)
    fig.suptitle(f"shapes 16 px, equal backbone training FLOPs ({b.top_steps} raster-on-VQ steps); "
                 "dashed: the discrete counterpart", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def reading(rows: list[dict], b: Budget) -> list[str]:
    """Sentences computed from the figures (nothing here is typed from a result)."""
    lines = []
    refs = reference_rows(rows, b)
    n = b.n_samples
    se = lambda p: math.sqrt(max(p * (1 - p), 1.0 / n) / n)
    for pair in PAIRS:
        d = next(r for r in refs if r["pair"] == pair and not r["continuous"])
        c = next(r for r in refs if r["pair"] == pair and r["continuous"])
        dv, cv = d["shapes_valid"] or 0.0, c["shapes_valid"] or 0.0
        gap = cv - dv
        band = 1.96 * math.hypot(se(dv), se(cv))
        if max(dv, cv) < 1.0 / n:
            verdict = "neither arm draws a valid image at this budget, so validity does not separate them"
        elif abs(gap) <= band:
            verdict = "the two are within sampling noise of each other"
        elif gap > 0:
            verdict = "the continuous arm is ahead"
        else:
            verdict = "the discrete arm is ahead"
        fid_word = ""
        if d["fid"] is not None and c["fid"] is not None:
            fid_word = (f"; FID {_f(c['fid'], 3)} against {_f(d['fid'], 3)} "
                        f"({'continuous' if c['fid'] < d['fid'] else 'discrete'} lower)")
        same = [r for r in rows if r["arm"] == c["arm"]]
        best = max(same, key=lambda r: r["shapes_valid"] or 0.0)
        lines.append(
            f"- **{pair}**: valid {_f(cv)} ({c['arm']}, {c['head_steps_setting']} head steps) against "
            f"{_f(dv)} ({d['arm']}): {verdict} (difference {gap:+.3f}, 95 % band ±{band:.3f} over {n} "
            f"samples each){fid_word}. Across the head-steps sweep the continuous arm's validity runs "
            f"{_f(min(r['shapes_valid'] or 0.0 for r in same))}–{_f(best['shapes_valid'] or 0.0)} "
            f"(best at {best['head_steps_setting']} steps); its sampling takes "
            f"{_f(c['seconds_per_image'])} s/image against {_f(d['seconds_per_image'])}.")
    top = max(rows, key=lambda r: r["shapes_valid"] or 0.0)
    lines.append(
        f"- **Budget**: the best row of the study draws {_f(top['shapes_valid'] or 0.0)} valid images "
        f"({top['arm']}): at {b.top_steps} raster-on-VQ steps of backbone compute every arm is early in "
        "training (the recipe's raster trains 750 steps for about 0.5, docs/recipes.md), so these are "
        "tiny-budget readings.")
    for arm in arms(b):
        if not arm.sweep:
            continue
        pts = sorted((r for r in rows if r["arm"] == arm.label), key=lambda r: r["head_steps_setting"])
        lo, hi = pts[0], pts[-1]
        if lo["fid"] is None or hi["fid"] is None:
            continue
        lines.append(
            f"- **Head steps, {arm.label}**: from {lo['head_steps_setting']} to {hi['head_steps_setting']} "
            f"steps per token FID goes {_f(lo['fid'])} → {_f(hi['fid'])} and sampling "
            f"{_f(lo['seconds_per_image'])} → {_f(hi['seconds_per_image'])} s/image (head FLOPs per image "
            f"{_e(lo['head_flops_per_image'])} → {_e(hi['head_flops_per_image'])}, the backbone's "
            f"{_e(lo['backbone_flops_per_image'])}); the best FID is at "
            f"{min(pts, key=lambda r: r['fid'])['head_steps_setting']} steps.")
    return lines


def write_doc(rows: list[dict], info: dict, b: Budget, docs: Path, machine: str, load: str,
              wall: float) -> Path:
    refs = reference_rows(rows, b)
    plot_path = docs / "continuous" / "quality-vs-head-steps.png"
    have_plot = plot(rows, b, plot_path)
    L = []
    w = L.append
    w("# Continuous tokens: tokenizers, heads, orders — and discrete against continuous at equal compute")
    w("")
    w("<!-- Written by bench/continuous.py from what it measured; do not edit by hand: "
      "`make continuous` (or `.venv/bin/python bench/continuous.py`) writes it again. -->")
    w("")
    w("## What the continuous-token support is")
    w("")
    w("A tokenizer may give **continuous tokens**: `Tokenizer.continuous = True`, `encode(images)` returns "
      "`FloatTensor[B, L, D]` (the posterior mean — deterministic) and `decode` takes it back; the layout "
      "(`TokenLayout`: one grid, or scales coarse → fine) is the same as for codes. What turns the backbone's "
      "hidden state into a token is a **head**, a plugin kind of its own (`tokenloom.Head`, hook "
      "`register_heads`):")
    w("")
    w("| component | kind | what it is |")
    w("|---|---|---|")
    w("| `kl` | tokenizer | MAR's / LDM's convolutional VAE with a KL term, fitted by `fit-tokenizer`; "
      "`scales = [...]` gives FlowAR's non-residual multi-scale layout (each scale the latent "
      "area-downsampled) |")
    w("| `patch` | tokenizer | raw pixel patches as tokens, training-free |")
    w("| `categorical` | head | today's linear head + sampler chain (the default: discrete runs as before) |")
    w("| `diffusion` | head | MAR's DiffLoss: a small AdaLN MLP denoiser conditioned on the hidden state, "
      "DDPM ε-loss on `diffusion_batch_mul` noise draws per token, cosine schedule respaced to "
      "`sampling_steps` at sampling |")
    w("| `flow` | head | flow matching (rectified flow), sampled with `steps` Euler steps (FlowAR, xAR) |")
    w("| `raster` | order | next-token AR; with a continuous head, MAR's \"AR, raster, causal\" variant |")
    w("| `masked` | order | MaskGIT on codes; `style = \"mar\"` (the default for continuous tokens): MAR's "
      "random order, truncated-normal mask ratio, cosine schedule, bidirectional attention |")
    w("| `next-scale` | order | VAR on `multiscale` codes; FlowAR on `kl` with `scales` and a `flow` head |")
    w("| `next-cell` | order | xAR's next-cell prediction with a `flow` head (`noisy_context`) |")
    w("")
    w("Run them with a `[head]` table: `tokenloom run examples/continuous-mar.toml` (also "
      "`continuous-raster`, `continuous-flowar`, `continuous-xar`). A categorical head on continuous "
      "tokens, a diffusion/flow head on codes, top-k/top-p on a continuous head, steps = 0 or a "
      "continuous tokenizer with a discrete-only order are `ConfigError`s at build time. Only `cfg` "
      "(applied to the head's prediction; MAR's linear schedule over decoded tokens) and `temperature` "
      "act on a continuous head.")
    w("")
    w("**How cost is counted.** Core counts backbone passes and head steps apart: `nfe` = backbone "
      "forward passes per generated batch (as for codes); `head_steps` = sequential head evaluations "
      "per generated batch (a diffusion head's `sampling_steps`, a flow head's Euler `steps`, once per "
      "decoding step of the order); `head_steps_per_token`; `head_flops_per_image` and "
      "`backbone_flops_per_image` at sampling. In training, `train_flops` includes the head's own "
      "FLOPs (`train_head_flops`: forward + backward, × the noise draws per token); the backbone's "
      "share is `train_flops − train_head_flops`. A head without an exact likelihood (diffusion, "
      "flow) reports held-out NLL as None.")
    w("")
    w("## The study")
    w("")
    plan = info["plan"]
    w(f"Budget `{b.name}`: every backbone 4 layers × 128 (the recipe's, `examples/shapes-recipe.toml`), "
      f"batch {b.batch_size}, lr {b.lr:g}, warm-up {b.warmup}, seed 0, `[model] cond` at its default "
      "(`prefix`: the class as a prefix token; the recipe has since moved to `adaln`, not used here); "
      f"data `shapes` {b.size} px, "
      f"{b.n} training images, {b.n_holdout} held out; {b.n_samples} samples per row; metrics: "
      f"`shapes-oracle` (validity), `fid` (the offline extractor, trained {b.fid_recipe_steps} steps once "
      f"and cached), `cost`. Tokenizers fitted {b.tokenizer_steps} steps each: `vq` (downsample 2, 128 "
      f"codes: 8 × 8 codes), `multiscale` (the same, scales {SCALES}), `kl` (downsample 2, 4 channels: "
      f"8 × 8 latents) and `kl` with scales {SCALES} — the same token grids on both sides.")
    w("")
    w(f"**Equal backbone training FLOPs**: {b.top_steps} steps of raster on VQ; each arm's steps spend "
      "the same backbone FLOPs (the trainer's count, a continuous head's own FLOPs taken out):")
    w("")
    w("| arm | backbone FLOPs / step | head FLOPs / step (extra) | steps | backbone train FLOPs "
      "| head train FLOPs | head / backbone |")
    w("|---|---|---|---|---|---|---|")
    for r in refs:
        ps = info["per_step"][r["arm"]]
        ratio = (r["train_head_flops"] or 0.0) / r["backbone_train_flops"] if r["backbone_train_flops"] else None
        w(f"| {r['arm']} | {_e(ps['backbone'])} | {_e(ps['head']) if ps['head'] else '0'} | {plan[r['arm']]} "
          f"| {_e(r['backbone_train_flops'])} | {_e(r['train_head_flops']) if r['train_head_flops'] else '0'} "
          f"| {_f(ratio, 2) if ratio is not None else '—'} |")
    w("")
    if info.get("ceilings"):
        w("The tokenizers' own held-out round trip (the `reconstruction` metric: decode(encode(x)) "
          f"against x on the {b.n_holdout} held-out images; rFID with the same extractor as FID) — the "
          "ceiling of every arm on its tokens:")
        w("")
        w("| tokenizer | MSE | PSNR (dB) | rFID |")
        w("|---|---|---|---|")
        for name, c in info["ceilings"].items():
            w(f"| `{name}` | {_f(c['mse'], 4)} | {_f(c['psnr'], 3)} | {_f(c['rfid'], 4)} |")
        w("")
    w("Sampler chains: the codes use the recipe's `top-k` (k = 4); the continuous heads sample at "
      "temperature 1 without guidance (none of the rows uses `cfg`).")
    w("")
    w("## Discrete against continuous")
    w("")
    w("Each continuous arm at its head's default sampling steps (diffusion 20, flow 10):")
    w("")
    w("| pair | arm | shapes_valid | FID | NFE | head steps / token | head steps / batch "
      "| s / image (sampling) | train s |")
    w("|---|---|---|---|---|---|---|---|---|")
    for r in refs:
        w(f"| {r['pair']} | {r['arm']} | {_f(r['shapes_valid'])} | {_f(r['fid'], 4)} | {_f(r['nfe'])} "
          f"| {_f(r['head_steps_per_token']) if r['continuous'] else '—'} "
          f"| {_f(r['head_steps']) if r['continuous'] else '—'} | {_f(r['seconds_per_image'])} "
          f"| {_f(r['train_seconds'], 3)} |")
    w("")
    w("## Quality against the head's sampling steps")
    w("")
    w("One trained model per arm; only the head's sampling steps change (the model is reused from the "
      "cache: `model reused` below).")
    w("")
    w("| arm | head steps / token | shapes_valid | FID | head steps / batch | head FLOPs / image "
      "| backbone FLOPs / image | s / image | model reused |")
    w("|---|---|---|---|---|---|---|---|---|")
    for arm in arms(b):
        for r in sorted((r for r in rows if r["arm"] == arm.label and arm.sweep), key=lambda r: r["head_steps_setting"]):
            w(f"| {r['arm']} | {r['head_steps_setting']} | {_f(r['shapes_valid'])} | {_f(r['fid'], 4)} "
              f"| {_f(r['head_steps'])} | {_e(r['head_flops_per_image'])} | {_e(r['backbone_flops_per_image'])} "
              f"| {_f(r['seconds_per_image'])} | {'yes' if r['model_reused'] else 'no (trained here)'} |")
    w("")
    if have_plot:
        w("![quality against head steps](continuous/quality-vs-head-steps.png)")
        w("")
    w("## Reading")
    w("")
    L.extend(reading(rows, b))
    w("")
    w("What this does not show: one seed, one budget and one backbone size; validity over "
      f"{b.n_samples} samples has a 95 % band of about ±{1.96 * math.sqrt(0.25 / b.n_samples):.2f} near "
      "0.5. The continuous heads' own training FLOPs are on top of the matched backbone FLOPs (table "
      "above); the heads are the examples' size (width 64, depth 2), not tuned; the codes' sampler "
      "(top-k 4) was tuned on raster by the recipe, the heads' temperature was not. Both FID and "
      "validity judge decoded images, so each tokenizer's own reconstruction error is inside them "
      + (f"(the round trips above: rFID {_f(min(c['rfid'] for c in info['ceilings'].values()), 3)}–"
         f"{_f(max(c['rfid'] for c in info['ceilings'].values()), 3)} against generated FIDs of "
         f"{_f(min(r['fid'] for r in rows if r['fid'] is not None), 3)} and more"
         + ("; at this budget the backbones and heads, not the tokenizers, set the figures). "
            if 5 * max(c["rfid"] for c in info["ceilings"].values())
            < min(r["fid"] for r in rows if r["fid"] is not None) else "). ")
         if info.get("ceilings") and all(c.get("rfid") is not None for c in info["ceilings"].values())
         else "(not measured in this invocation). ")
      + "A budget where one side reads 0 says that side has not learned the task "
      "yet at this compute, not that it cannot. Sampling times are wall-clock on the shared machine (one "
      "thread, other jobs running): read their ratios, not their values.")
    w("")
    w("## Settings and machine")
    w("")
    w(f"- machine: {machine}")
    w(f"- load: {load}; one torch thread (`OMP_NUM_THREADS=1`, `torch.set_num_threads(1)`); the study "
      f"took {wall / 60:.1f} min of wall time in this invocation (stages found in the cache are not "
      "re-run, so a re-run takes less).")
    if info.get("patched_sampling_options"):
        w(f"- the heads {', '.join(info['patched_sampling_options'])} did not declare their sampling-only "
          "options (`Config.sampling_options`) yet; the script declared them "
          f"({', '.join(f'{k}: {list(v)}' for k, v in SAMPLING_OPTIONS.items())}) so that the sweep "
          "reuses each trained model.")
    w(f"- output and cache: `{info['out']}`; figures in `bench/results/continuous{'-' + b.name if b.name != 'full' else ''}.json`.")
    w("")
    docs.mkdir(parents=True, exist_ok=True)
    path = docs / "continuous.md"
    path.write_text("\n".join(L), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", choices=sorted(BUDGETS), default="full")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--docs", type=Path, default=None)
    ap.add_argument("--top-steps", type=int, default=None, help="raster-on-VQ steps of the budget")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--ceilings", action="store_true",
                    help="measure the tokenizers' reconstruction ceilings into the saved results, then write")
    ap.add_argument("--from-results", action="store_true",
                    help="write the document again from bench/results/continuous*.json (no runs)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    b = BUDGETS[args.budget]
    if args.top_steps:
        b = replace(b, top_steps=args.top_steps)
    out = args.out or REPO / "runs" / f"continuous-{b.name}"
    docs = args.docs or (REPO / "docs" if b.name == "full" else out / "docs")
    res = REPO / "bench" / "results" / f"continuous{'-' + b.name if b.name != 'full' else ''}.json"
    if args.from_results or args.ceilings:
        saved = json.loads(res.read_text(encoding="utf-8"))
        b = Budget(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved["budget"].items()})
        if args.ceilings:
            saved["info"]["ceilings"] = tokenizer_ceilings(b, out, progress=args.progress)
            res.write_text(json.dumps(saved, indent=1, default=str), encoding="utf-8")
        path = write_doc(saved["rows"], saved["info"], b, docs, describe_machine(saved["machine"]),
                         saved["load"], saved["wall_seconds"])
        print(f"[continuous] wrote {path} from {res}", flush=True)
        return 0
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    rows, info = run_all(b, out, progress=args.progress)
    info["ceilings"] = tokenizer_ceilings(b, out, progress=args.progress)
    wall = time.perf_counter() - t0
    load1 = os.getloadavg()
    info["out"] = str(out.relative_to(REPO)) if out.is_relative_to(REPO) else str(out)
    mi = machine_info()
    load = (f"1-minute load average {load0[0]:.1f} at the start and {load1[0]:.1f} at the end "
            f"(15-minute {load1[2]:.1f}; other jobs shared the {os.cpu_count()} cores)")
    res.parent.mkdir(parents=True, exist_ok=True)
    res.write_text(json.dumps({"machine": mi, "budget": b.__dict__, "load": load, "wall_seconds": wall,
                               "info": info, "rows": rows}, indent=1, default=str), encoding="utf-8")
    path = write_doc(rows, info, b, docs, describe_machine(mi), load, wall)
    print(f"[continuous] wrote {path} and {res} ({wall / 60:.1f} min)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
