"""Compare generation orders on ``shapes`` (32 px) at one model size and one
training budget in FLOPs, through the pipeline, and print the tables.

    .venv/bin/python examples/orders_compare.py [--out runs/orders-compare] [--budget-steps 600]
        [--tokenizer-steps 600] [--n-samples 64] [--docs <out>/docs]

docs/orders.md's measured tables are written by ``bench/claims.py`` (``make
claims``) from the claims study; this script writes its sample crops and
``results.json`` under ``--docs`` (default ``<out>/docs``), and fills an
``orders.md`` there only if one with its markers exists.

Every order runs ``tokenloom.pipeline.run`` into one output directory, so the
tokenizers (``vq`` for the grid orders and ``random``, ``multiscale`` for
``next-scale`` and ``next-scale-markov``, ``rq`` for ``depth-stack``, the
training-free ``frequency`` for ``next-frequency``) are fitted once, and
``zipar`` reuses the ``raster`` model and ``random-parallel`` the ``random``
model. The training budget is ``--budget-steps`` raster steps in FLOPs (the
trainer's count: tokens × (6·N + 12·n_layer·d·T), a depth head's layers
counted once per code of the stack); every other order gets the number of
steps that spends the same FLOPs at its own sequence length and parameter
count. Timings use one intra-op thread (the machine is shared; two threads
contend). The tokenizers' own held-out reconstructions are judged by the
same oracle (the ceiling of the oracle columns).

Run time: about 5½ minutes from scratch on the shared 2-core CPU (measured
5 min 27 s: three fitted tokenizers of 30–40 s, eleven backbones of 15–22 s,
generation, the reconstruction check, the timing rounds); with a filled cache
under ``--out`` only what is missing is fitted, trained or generated (about
30 s when nothing is).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

import tokenloom
from tokenloom.config import build_component, parse_config
from tokenloom.model import build_model
from tokenloom.pipeline import run

REPO = Path(__file__).resolve().parents[1]

TOKENIZERS = {
    "vq": {"name": "vq", "codebook_size": 64, "downsample": 4, "steps": 500},
    "multiscale": {"name": "multiscale", "codebook_size": 64, "downsample": 4, "steps": 500},
    # RQ-VAE: 4×4 positions × depth 4 = 64 codes over one shared codebook of 64 (vq's L and vocabulary)
    "rq": {"name": "rq", "codebook_size": 64, "depth": 4, "downsample": 8, "steps": 500},
    # training-free Haar bands (levels 3, finest level dropped: 7 bands, L = 256); shapes is drawn in
    # palette colours (every channel at ±1), so the smallest odd number of bins keeps them: V = 3^3 = 27
    "frequency": {"name": "frequency", "levels": 3, "drop_levels": 1, "bins": 3},
}
TRAINED = {"vq", "multiscale", "rq"}  # tokenizers fitted for --tokenizer-steps (frequency is training-free)


def tokenizer_table(name: str, steps: int) -> dict:
    return {**TOKENIZERS[name], "steps": steps} if name in TRAINED else dict(TOKENIZERS[name])

# (label, generator table, tokenizer, formula of NFE on an h×w grid)
ORDERS = [
    ("raster", {"name": "raster"}, "vq", "L = h·w"),
    ("random", {"name": "random"}, "vq", "L"),
    ("next-scale", {"name": "next-scale"}, "multiscale", "number of scales"),
    ("next-scale-markov", {"name": "next-scale-markov", "steps": 4}, "multiscale", "Σ_k min(steps, h_k·w_k)"),
    ("next-frequency", {"name": "next-frequency"}, "frequency", "number of bands"),
    # one depth layer: the backbone's 2 layers stay the larger part (RQ-Transformer's depth transformer is
    # the smaller one); its FLOPs (run D times per position) are in the budget
    ("depth-stack", {"name": "depth-stack", "depth_layers": 1}, "rq", "h·w (+ D depth-head steps each)"),
    ("neighboring", {"name": "neighboring"}, "vq", "h + w − 1"),
    ("next-block", {"name": "next-block", "rows": 1}, "vq", "h / rows"),
    ("next-cell", {"name": "next-cell", "cell": 2}, "vq", "(h/k)·(w/k)"),
    ("par", {"name": "par", "regions": 4}, "vq", "n + (L − n)/n"),
    ("zipar", {"name": "zipar", "window": 4}, "vq", "2w + (h − 2)·window"),
    ("random-parallel", {"name": "random-parallel", "steps": 16}, "vq", "steps"),
    ("masked", {"name": "masked", "steps": 8}, "vq", "T"),
]


def base_config(budget_steps: int, n_samples: int) -> dict:
    return {
        "seed": 0,
        "data": {"name": "shapes", "size": 32, "n": 4000, "n_holdout": 200},
        "model": {"n_layer": 2, "d_model": 64, "n_head": 4},
        "train": {"steps": budget_steps, "batch_size": 32, "lr": 2e-3, "warmup": 30},
        "sampler": [{"name": "top-k", "k": 16}],
        "metrics": {"names": ["shapes-oracle"], "n_samples": n_samples},
    }


def formula_nfe(label: str, gen_table: dict, layout) -> int:
    """Each order's NFE from LITERATURE.md's formula, on this layout."""
    h, w = layout.grid
    L = layout.length
    if label == "raster":
        return L
    if label == "next-scale":
        return layout.n_scales
    if label == "neighboring":
        return h + w - 1
    if label == "next-block":
        return h // gen_table["rows"]
    if label == "next-cell":
        return (h // gen_table["cell"]) * (w // gen_table["cell"])
    if label == "par":
        n = gen_table["regions"]
        return n + (L - n) // n
    if label == "zipar":
        return 2 * w + (h - 2) * gen_table["window"]
    if label == "masked":
        return gen_table["steps"]
    if label == "random":
        return L
    if label == "random-parallel":  # one token per pass (sequential RandAR) once steps reach L
        return min(gen_table["steps"], L)
    if label == "next-scale-markov":
        return sum(min(gen_table["steps"], sh * sw) for sh, sw in layout.scales)
    if label == "next-frequency":
        return layout.n_scales  # one scale per band
    if label == "depth-stack":
        return h * w  # positions; the D codes of a stack come from the depth head, not backbone passes
    raise KeyError(label)


def flops_per_step(cfg, gen, n_classes: int) -> float:
    spec = gen.model_spec()
    model = build_model(spec, cfg.model, n_classes=n_classes, seed=0)
    return cfg.train.batch_size * spec.seq_len * model.flops_per_token(spec.seq_len)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/orders-compare")
    ap.add_argument("--budget-steps", type=int, default=600, help="raster steps; the FLOPs every order gets")
    ap.add_argument("--n-samples", type=int, default=64)
    ap.add_argument("--tokenizer-steps", type=int, default=600)
    ap.add_argument("--timing-rounds", type=int, default=5)
    ap.add_argument("--docs", default=None, help="where the crops and results.json go (default <out>/docs)")
    args = ap.parse_args()
    if args.docs is None:
        args.docs = str(Path(args.out) / "docs")
    torch.set_num_threads(1)
    out = Path(args.out)
    registry = tokenloom.get_registry()

    rows, t0 = [], time.perf_counter()
    budget = None
    for label, gen_table, tok_name, formula in ORDERS:
        raw = base_config(args.budget_steps, args.n_samples)
        raw["tokenizer"] = tokenizer_table(tok_name, args.tokenizer_steps)
        raw["generator"] = dict(gen_table)
        cfg = parse_config(raw, registry=registry)
        tok = build_component(registry, "tokenizer", cfg.tokenizer.name,
                              {**cfg.tokenizer.options, "image_shape": (3, 32, 32)}, path="tokenizer")
        gen = build_component(registry, "generator", cfg.generator.name,
                              {**cfg.generator.options, "tokenizer": tok}, path="generator")
        per_step = flops_per_step(cfg, gen, n_classes=3)
        if budget is None:
            if label != "raster":
                raise SystemExit("the first order must be raster (it fixes the FLOP budget)")
            budget = per_step * args.budget_steps
        raw["train"]["steps"] = max(1, round(budget / per_step))
        cfg = parse_config(raw, registry=registry)
        print(f"== {label}: {raw['train']['steps']} steps ({gen.model_spec().seq_len} tokens per sequence)",
              file=sys.stderr)
        record = run(cfg, out, progress=True, registry=registry)
        m = record["metrics"]
        rows.append({
            "order": label, "tokenizer": tok_name, "L": tok.layout.length, "grid": list(tok.layout.grid),
            "formula": formula, "formula_nfe": formula_nfe(label, gen_table, tok.layout), "nfe": m["nfe"],
            "seconds_per_image": m["seconds_per_image"], "nll_bits_per_image": m.get("nll_bits_per_image"),
            "uniform_bits_per_image": m.get("uniform_bits_per_image"),
            "shapes_valid": m.get("shapes_valid"), "shapes_colour_ok": m.get("shapes_colour_ok"),
            "shapes_count_ok": m.get("shapes_count_ok"),
            "train_steps": record["train"].get("steps"), "train_flops": record["train"].get("flops"),
            "model_key": record["cache"]["model"], "samples": str(out / record["artifacts"]["samples"]),
            "generator": gen_table,
        })
    ceilings = tokenizer_ceilings(rows, out, registry, args.tokenizer_steps)
    timing_pass(rows, registry, args.timing_rounds)
    total = time.perf_counter() - t0
    print(f"== total {total:.0f} s", file=sys.stderr)
    write_docs(rows, ceilings, Path(args.docs), args, total)


def tokenizer_ceilings(rows: list[dict], out: Path, registry, tokenizer_steps: int) -> dict[str, dict]:
    """Each tokenizer's own held-out reconstructions (decode ∘ encode of the
    200 held-out images, the cached fitted tokenizer) judged by the
    ``shapes-oracle`` rules: no order can sample better images than its
    tokenizer decodes, so these bound the oracle columns."""
    from tokenloom.interfaces import MetricContext
    from tokenloom.pipeline import data_key, fit_tokenizer, load_data

    metric = build_component(registry, "metric", "shapes-oracle", {}, path="metrics.shapes-oracle")
    result = {}
    for name in dict.fromkeys(r["tokenizer"] for r in rows):
        raw = base_config(1, 64)
        raw["tokenizer"] = tokenizer_table(name, tokenizer_steps)
        raw["generator"] = dict(next(r["generator"] for r in rows if r["tokenizer"] == name))
        cfg = parse_config(raw, registry=registry)
        train_set, holdout = load_data(cfg)
        tok, _, _ = fit_tokenizer(cfg, train_set.images, out / "cache", registry=registry,
                                  device=torch.device("cpu"), progress=False, data_id=data_key(cfg))
        with torch.no_grad():
            rec = torch.cat([tok.decode(tok.encode(holdout.images[i : i + 256]))
                             for i in range(0, len(holdout), 256)])  # (N, 3, 32, 32)
        m = metric.compute(MetricContext(generated=rec, generated_labels=holdout.labels.long(),
                                         data=holdout)).values
        mse = float(((rec - holdout.images) ** 2).mean())
        result[name] = {"options": {k: v for k, v in raw["tokenizer"].items() if k != "name"},
                        "L": tok.layout.length, "vocab": tok.vocab_size, "n": len(holdout),
                        "psnr_db": 10 * math.log10(4.0 / mse) if mse > 0 else float("inf"),
                        "shapes_valid": m["shapes_valid"], "shapes_colour_ok": m["shapes_colour_ok"],
                        "shapes_count_ok": m["shapes_count_ok"]}
    return result


def timing_pass(rows: list[dict], registry, rounds: int) -> None:
    """Seconds per image again, as the minimum over ``rounds`` round-robin
    repetitions (the shared machine makes one measurement noisy): 64 images
    in micro-batches of the pipeline's size, the same sampler chain, the same
    backbone and tokenizer shapes with fresh (untrained) weights — every order
    here does a fixed amount of work per image, whatever the weights."""
    from tokenloom.config import ModelConfig
    from tokenloom.model import InstrumentedModel
    from tokenloom.pipeline import MICRO_BATCH
    from tokenloom.rng import RowRNG
    from tokenloom.sampling import build_chain

    cases = []
    for r in rows:
        raw = base_config(1, 64)
        raw["tokenizer"] = dict(TOKENIZERS[r["tokenizer"]])
        raw["generator"] = dict(r["generator"])
        cfg = parse_config(raw, registry=registry)
        tok = build_component(registry, "tokenizer", cfg.tokenizer.name,
                              {**cfg.tokenizer.options, "image_shape": (3, 32, 32)}, path="tokenizer").eval()
        gen = build_component(registry, "generator", cfg.generator.name,
                              {**cfg.generator.options, "tokenizer": tok}, path="generator")
        model = InstrumentedModel(build_model(gen.model_spec(), ModelConfig(**raw["model"]), n_classes=3).eval())
        cases.append((r, gen, model, build_chain(cfg.sampler, registry=registry)))
    best = {r["order"]: float("inf") for r in rows}
    labels = torch.arange(64) % 3
    for _ in range(rounds):
        for r, gen, model, chain in cases:
            t = time.perf_counter()
            with torch.no_grad():
                for i in range(0, 64, MICRO_BATCH):
                    idx = torch.arange(i, i + MICRO_BATCH)
                    gen.generate(model, chain, labels[idx], rng=RowRNG(0, idx))
            best[r["order"]] = min(best[r["order"]], (time.perf_counter() - t) / 64)
    for r in rows:
        r["seconds_per_image_min"] = best[r["order"]]


def write_docs(rows: list[dict], ceilings: dict[str, dict], docs: Path, args, total: float) -> None:
    from PIL import Image

    from tokenloom.checkpoint import atomic_write, write_json, write_text

    pics = docs / "orders"
    pics.mkdir(parents=True, exist_ok=True)
    for r in rows:  # the first two rows of samples of each order's grid, at half size
        img = Image.open(r["samples"]).convert("RGB")
        white = (torch.tensor(list(img.getdata())).view(img.height, img.width, 3) == 255).all(-1).all(-1)
        gaps = [y for y in range(1, img.height) if white[y] and not white[y - 1]]  # bottom edges of cell rows
        crop = img.crop((0, 0, img.width, gaps[1] + 2 if len(gaps) > 1 else img.height))
        crop = crop.resize((crop.width // 2, crop.height // 2), Image.NEAREST)
        with atomic_write(pics / f"{r['order']}.png") as f:
            crop.save(f, format="PNG")
    write_json(pics / "results.json", {"rows": rows, "tokenizer_ceilings": ceilings, "seconds_total": total,
                                       "budget_steps": args.budget_steps, "n_samples": args.n_samples,
                                       "torch": torch.__version__})
    raster = next(r for r in rows if r["order"] == "raster")

    def shared(r):  # the order whose model this row decodes with, if an earlier row trained it
        return next((f" (the `{o['order']}` model)" for o in rows[: rows.index(r)]
                     if o["model_key"] == r["model_key"]), "")

    def f(v, fmt):
        return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    lines = [
        ("| order | tokenizer (L) | NFE | formula | formula value | NFE ÷ raster | seconds / image (pipeline) | "
         "seconds / image (min of rounds) | time ÷ raster | held-out NLL (bits / image) | oracle-valid | "
         "palette-clean | count-ok | train steps (same FLOPs) | samples |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        nll = r["nll_bits_per_image"]
        lines.append(
            f"| `{r['order']}` | {r['tokenizer']} ({r['L']}) | {f(r['nfe'], '.0f')} | {r['formula']} | "
            f"{r['formula_nfe']} | {r['nfe'] / raster['nfe']:.3f} | {f(r['seconds_per_image'], '.4f')} | "
            f"{f(r['seconds_per_image_min'], '.4f')} | "
            f"{r['seconds_per_image_min'] / raster['seconds_per_image_min']:.2f} | "
            f"{f(nll, '.1f')} | {f(r['shapes_valid'], '.2f')} | {f(r['shapes_colour_ok'], '.2f')} | "
            f"{f(r['shapes_count_ok'], '.2f')} | {r['train_steps']}"
            f"{shared(r)} | ![{r['order']}](orders/{r['order']}.png) |")
    lines += [
        "",
        (f"The tokenizers' own reconstructions of the {next(iter(ceilings.values()))['n']} held-out images, "
         "judged by the same oracle (no order can do better than its tokenizer decodes):"),
        "",
        "| tokenizer | options | L | vocabulary | PSNR (dB) | oracle-valid | palette-clean | count-ok |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, c in ceilings.items():
        opts = ", ".join(f"{k} {v}" for k, v in c["options"].items())
        lines.append(f"| {name} | {opts} | {c['L']} | {c['vocab']} | {c['psnr_db']:.1f} | "
                     f"{f(c['shapes_valid'], '.2f')} | {f(c['shapes_colour_ok'], '.2f')} | "
                     f"{f(c['shapes_count_ok'], '.2f')} |")
    table = "\n".join(lines)
    print(table)
    text = (docs / "orders.md").read_text() if (docs / "orders.md").exists() else ""
    begin, end = "<!-- measured: begin -->", "<!-- measured: end -->"
    if begin in text and end in text:
        text = text[: text.index(begin) + len(begin)] + "\n" + table + "\n" + text[text.index(end):]
        write_text(docs / "orders.md", text)
    else:
        print(f"(docs/orders.md has no {begin} … {end} block; table printed only)", file=sys.stderr)


if __name__ == "__main__":
    main()
