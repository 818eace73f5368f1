"""Measure every built-in tokenizer at its default config on `shapes` (32 px)
and `digits` (32 px): tokens per image, vocabulary, held-out PSNR/MSE,
codebook utilisation and perplexity, fit time on this machine — plus the
RQ-depth, VQ dead-code-restart and FlexVAR rows. The peer is `vq`: each row
also prints its fit time and PSNR relative to `vq` on the same data.

    .venv/bin/python bench/tokenizers_compare.py            # all rows (~40 min on a shared 2-core CPU)
    .venv/bin/python bench/tokenizers_compare.py --only vq  # rows whose label starts with "vq"

Results go to bench/results/tokenizers_compare.json (rows already there for
the same data and config are reused, so a killed run continues) and the
reconstruction grids (held-out originals on top, then one row per tokenizer
in table order) to docs/tokenizers_shapes.png / docs/tokenizers_digits.png.
Training runs on one thread (`torch.set_num_threads(1)`): on a 2-core
machine shared with other processes that is several times faster for these
small networks than two contending threads. Fit time is reported as wall
clock and as CPU time of this process; with one thread the CPU time is what
the fit takes on an otherwise idle core, the wall time depends on the load.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

import tokenloom
from tokenloom.checkpoint import atomic_write, write_json
from tokenloom.config import DataConfig
from tokenloom.data import load_dataset
from tokenloom.running.images import grid_image
from tokenloom.tokenizer_train import evaluate_reconstruction

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "tokenizers_compare.json"

DATA = {
    "shapes": DataConfig(name="shapes", size=32, n=4000, n_holdout=500, channels=3),
    "digits": DataConfig(name="digits", size=32, n=1500, n_holdout=297, channels=1),
}
# (label, tokenizer name, options); defaults first, then the measured ablations
ROWS = [
    ("pixel", "pixel", {}),
    ("vq", "vq", {}),
    ("rq", "rq", {}),
    ("fsq", "fsq", {}),
    ("lfq", "lfq", {}),
    ("multiscale", "multiscale", {}),
    ("frequency", "frequency", {}),
    ("vq restart_every=0", "vq", {"restart_every": 0}),
    ("rq depth=1", "rq", {"depth": 1}),
    ("rq depth=2", "rq", {"depth": 2}),
    ("rq depth=8", "rq", {"depth": 8}),
    ("multiscale residual=false", "multiscale", {"residual": False}),
    ("lfq entropy_weight=0", "lfq", {"entropy_weight": 0.0}),
    ("frequency drop_levels=0", "frequency", {"drop_levels": 0}),
]
EXTRA_ON = {"digits": {"vq restart_every=0", "rq depth=1", "rq depth=2", "frequency drop_levels=0"}}
N_PNG = 8


def run_row(data: str, label: str, name: str, options: dict, train, holdout) -> tuple[dict, torch.Tensor]:
    shape = tuple(train.images.shape[1:])
    tok = tokenloom.create("tokenizer", name, image_shape=shape, **options)
    t0, c0 = time.perf_counter(), time.process_time()
    stats = tok.fit(train.images, progress=sys.stderr.isatty())
    fit_s, fit_cpu = time.perf_counter() - t0, time.process_time() - c0
    tok.eval()
    ev = evaluate_reconstruction(tok, holdout.images)
    with torch.no_grad():
        rec = tok.decode(tok.encode(holdout.images[:N_PNG]))
    row = {"data": data, "label": label, "tokenizer": name, "options": options, "fit_seconds": fit_s, "fit_cpu_seconds": fit_cpu,
           "fit_steps": float(stats.get("steps", 0.0)) if stats else 0.0, **ev}
    return row, rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=None, help="run only rows whose label starts with this")
    ap.add_argument("--data", default=None, choices=sorted(DATA), help="one data set only")
    ap.add_argument("--fresh", action="store_true", help="ignore rows already in the results file")
    args = ap.parse_args()
    torch.set_num_threads(1)

    done = {} if args.fresh or not RESULTS.exists() else json.loads(RESULTS.read_text())
    rows: list[dict] = done.get("rows", [])
    recs_path = ROOT / "runs" / "bench-tokenizers-recons.pt"  # cache of reconstructions for the grids (git-ignored)
    recs: dict = torch.load(recs_path, weights_only=True) if recs_path.exists() and not args.fresh else {}
    key = lambda r: (r["data"], r["label"], json.dumps(r["options"], sort_keys=True))
    have = {key(r): r for r in rows}

    for data, cfg in DATA.items():
        if args.data and data != args.data:
            continue
        train, holdout = load_dataset(cfg, split="train"), load_dataset(cfg, split="holdout")
        for label, name, options in ROWS:
            if args.only and not label.startswith(args.only):
                continue
            if label not in {r[0] for r in ROWS[:7]} and label not in EXTRA_ON.get(data, {r[0] for r in ROWS}):
                continue
            k = (data, label, json.dumps(options, sort_keys=True))
            if k in have:
                continue
            print(f"[{data}] {label} ...", file=sys.stderr, flush=True)
            row, rec = run_row(data, label, name, options, train, holdout)
            rows = [r for r in rows if key(r) != k] + [row]
            have[k] = row
            recs[f"{data}|{label}"] = rec
            write_json(RESULTS, {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                                 "threads": 1, "data": {d: vars_(c) for d, c in DATA.items()}, "rows": rows})
            with atomic_write(recs_path) as fh:
                torch.save(recs, fh)
            print(f"[{data}] {label}: PSNR {row['psnr']:.2f} dB, fit {row['fit_seconds']:.0f} s", file=sys.stderr)
        # the reconstruction grid: originals, then one row per default tokenizer
        order = [r[0] for r in ROWS[:7]] + sorted(EXTRA_ON.get(data, {r[0] for r in ROWS[7:]}))
        grid = [holdout.images[:N_PNG]] + [recs[f"{data}|{lab}"] for lab in order if f"{data}|{lab}" in recs]
        img = grid_image(grid, scale=2, background=128)
        with atomic_write(ROOT / "docs" / f"tokenizers_{data}.png") as fh:
            img.save(fh, format="PNG")
        shown = [lab for lab in order if f"{data}|{lab}" in recs]
        print(f"docs/tokenizers_{data}.png rows: originals, " + ", ".join(shown), file=sys.stderr)

    print(table(rows))


def vars_(cfg: DataConfig) -> dict:
    import attrs

    return attrs.asdict(cfg)


def table(rows: list[dict]) -> str:
    """Markdown table with ratios against the `vq` row of the same data set."""
    out = []
    for data in DATA:
        rs = [r for r in rows if r["data"] == data]
        if not rs:
            continue
        peer = next((r for r in rs if r["label"] == "vq"), None)
        out += [f"\n**{data}** (32 px, {rs[0]['n_images']} held-out images)\n",
                ("| tokenizer | tokens/image | vocabulary | PSNR (dB) | MSE | utilisation | perplexity | "
                 "fit wall (s) | fit CPU (s) | CPU ÷ vq | PSNR − vq |"),
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rs:
            ratio = (f"{r['fit_cpu_seconds'] / peer['fit_cpu_seconds']:.2f}"
                     if peer and peer["fit_cpu_seconds"] > 0.5 and r["fit_cpu_seconds"] > 0.5 else "–")
            dpsnr = f"{r['psnr'] - peer['psnr']:+.2f}" if peer else "–"
            out.append(f"| {r['label']} | {r['tokens_per_image']} | {r['vocab_size']} | {r['psnr']:.2f} | "
                       f"{r['mse']:.4f} | {r['utilisation']:.3f} | {r['perplexity']:.1f} | {r['fit_seconds']:.0f} | "
                       f"{r['fit_cpu_seconds']:.0f} | "
                       f"{ratio} | {dpsnr} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
