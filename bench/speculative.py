"""The speculative decoding family on ``shapes``: raster against sjd,
sjd+lantern, sjd+gsd, speculative and speculative+lantern on the *same*
trained raster model, the same sampler chain and the same seed.

    .venv/bin/python bench/speculative.py [--out runs/speculative] [--steps 600] [--samples 128]

Every cell is one ``tokenloom.pipeline.run`` into one run directory, so the
tokenizer and the raster target are trained once and shared (the draft of
``speculative`` is trained once too, as the generator's auxiliary model).
The speculative cells set ``baseline = true``: after each micro-batch the
generator times plain next-token decoding of the same batch (same model,
chain and seed) on the bare backbone, so ``speedup_wallclock`` is a paired
measurement taken minutes apart at most — on a shared machine an unpaired
comparison of two runs' ``seconds_per_image`` is much noisier.

Writes ``docs/speculative.png`` (quality against NFE and against
wall-clock speed-up) and rewrites the results block of
``docs/speculative.md`` between its ``<!-- results:start -->`` and
``<!-- results:end -->`` markers; prints the table. A benchmark, not a test:
timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time
from pathlib import Path

import torch

from tokenloom.config import parse_config
from tokenloom.pipeline import run

ROOT = Path(__file__).resolve().parents[1]

CHAIN = [{"name": "cfg", "scale": 1.5}, {"name": "top-k", "k": 4}]
LANTERN = {"name": "lantern", "k": 3, "delta": 0.2}
GSD = {"name": "gsd", "rank_window": 3, "max_gap": 0.1, "min_similarity": 0.0}

CELLS = [  # (label, generator table, acceptance rule or None)
    ("raster", {"name": "raster"}, None),
    ("sjd", {"name": "sjd", "window": 16, "init": "left", "baseline": True}, None),
    ("sjd (random init)", {"name": "sjd", "window": 16, "init": "random", "baseline": True}, None),
    ("sjd + lantern", {"name": "sjd", "window": 16, "init": "left", "baseline": True}, LANTERN),
    ("sjd + gsd", {"name": "sjd", "window": 16, "init": "left", "baseline": True}, GSD),
    ("speculative", {"name": "speculative", "gamma": 4, "baseline": True}, None),
    ("speculative + lantern", {"name": "speculative", "gamma": 4, "baseline": True}, LANTERN),
]


def config(args, generator: dict, rule: dict | None):
    gen = dict(generator)
    if gen["name"] == "speculative":
        gen.update(draft_n_layer=1, draft_d_model=32, draft_n_head=2)
    return parse_config({
        "seed": 0,
        "data": {"name": "shapes", "size": 16, "n": 4000, "n_holdout": 500},
        "tokenizer": {"name": "pixel", "bits": 1, "pool": 2},  # 8×8 codes, V = 8 (lossless for the palette)
        "generator": gen,
        "model": {"n_layer": 3, "d_model": 96, "n_head": 4},
        "train": {"steps": args.steps, "batch_size": 32, "lr": 1e-3, "warmup": 50},
        "sampler": CHAIN + ([rule] if rule else []),
        "metrics": {"names": ["shapes-oracle", "fid", "nll", "cost", "acceptance"], "n_samples": args.samples},
        "device": "cpu",
    }, source=f"bench/speculative.py ({generator['name']})")


def latency(args, n_images: int) -> dict[str, float]:
    """Batch-1 latency speed-up of every cell over raster: the trained
    components are reloaded from the run directory's cache (the pipeline's
    own stages, so nothing retrains), then image i is decoded alone by
    raster and by the cell, alternately; returns total raster time / total
    cell time per label (raster against itself: the measurement noise)."""
    import attrs

    from tokenloom import pipeline as P
    from tokenloom.config import build_component
    from tokenloom.interfaces import SamplerContext
    from tokenloom.model import InstrumentedModel
    from tokenloom.registry import get_registry
    from tokenloom.rng import RowRNG
    from tokenloom.sampling import build_chain

    reg, dev, cache = get_registry(), torch.device("cpu"), Path(args.out) / "cache"
    base = config(args, {"name": "raster"}, None)
    train_set, holdout = P.load_data(base)
    data_id = P.stable_hash(attrs.asdict(base.data))
    tok, tok_hash, _ = P.fit_tokenizer(base, train_set.images, cache, registry=reg, device=dev, progress=False,
                                       data_id=data_id)
    codes = P.encode_all(tok, tok_hash, {"train": train_set, "holdout": holdout}, cache,
                         key_extra={"data": data_id, "seed": base.seed}, device=dev)
    n_classes = int(train_set.n_classes)

    def build(cfg):
        gen = build_component(reg, "generator", cfg.generator.name, {**cfg.generator.options, "tokenizer": tok},
                              path="generator")
        model, _, _ = P.train_or_load(cfg, gen, codes["train"], train_set.labels, n_classes, tok_hash, cache,
                                      device=dev, progress=False, data_id=data_id)
        P.train_auxiliary(cfg, gen, codes["train"], train_set.labels, n_classes, tok_hash, cache, device=dev,
                          progress=False, data_id=data_id)
        model = InstrumentedModel(model)
        chain = build_chain(cfg.sampler, registry=reg)
        chain.bind(SamplerContext(vocab_size=tok.vocab_size, code_embeddings=tok.code_embeddings().detach(),
                                  token_embeddings=model.token_embeddings().detach()))
        return gen, model, chain

    def timed(gen, model, chain, i):
        t0 = time.perf_counter()
        gen.generate(model, chain, torch.tensor([i % n_classes]), rng=RowRNG(base.seed, [i]))
        return time.perf_counter() - t0

    ref = build(base)
    out = {}
    for label, g, rule in CELLS:
        cell = build(config(args, {k: v for k, v in g.items() if k != "baseline"}, rule))  # time decoding only
        timed(*ref, n_images)  # warm-up of both, untimed
        timed(*cell, n_images)
        t_ref = t_cell = 0.0
        for i in range(n_images):
            t_ref += timed(*ref, i)
            t_cell += timed(*cell, i)
        out[label] = t_ref / t_cell
        print(f"batch-1 latency {label}: {t_cell / n_images * 1e3:.0f} ms/image, raster "
              f"{t_ref / n_images * 1e3:.0f} ms/image, speed-up {out[label]:.2f}x", flush=True)
    return out


def fmt(v, digits=3):
    if v is None:
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def table(rows: list[dict]) -> str:
    head = ["cell", "NFE / image", "NFE speed-up", "wall-clock speed-up (batch 16)", "latency speed-up (batch 1)",
            "acceptance rate", "mean accepted length", "draft passes / image", "shapes valid",
            "FID (tokenloom-cnn)", "NLL bits / image"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["label"], fmt(r["nfe_per_image"], 1), fmt(r["speedup_nfe"], 2) + "×",
            fmt(r["speedup_wallclock"], 2) + ("×" if r["speedup_wallclock"] is not None else ""),
            fmt(r.get("speedup_latency"), 2) + ("×" if r.get("speedup_latency") is not None else ""),
            fmt(r["acceptance_rate"]), fmt(r["mean_accepted_length"], 2), fmt(r["draft_nfe_per_image"], 1),
            fmt(r["shapes_valid"]),
            fmt(r["fid"], 1), fmt(r["nll"], 1),
        ]) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, n_samples: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    colours = plt.get_cmap("tab10")
    panels = [("nfe_per_image", "shapes_valid"), ("speedup_latency", "shapes_valid"), ("speedup_wallclock", "fid")]
    for i, r in enumerate(rows):
        marker = "o" if r["label"] == "raster" else ("s" if r["label"].startswith("sjd") else "^")
        for ax, (x, y) in zip(axes, panels):
            xv, yv = r.get(x), r.get(y)
            if xv is None or yv is None:
                continue
            # binomial standard error of the validity rate; FID has no closed-form error
            err = (yv * (1 - yv) / n_samples) ** 0.5 if y == "shapes_valid" else None
            ax.errorbar([xv], [yv], yerr=None if err is None else [err], fmt=marker, ms=8, capsize=3,
                        color=colours(i), label=r["label"] if ax is axes[0] else None)
    axes[0].set(xlabel="target forward passes per image (NFE)", ylabel="shapes-oracle validity ↑ (±1 s.e.)",
                title="quality vs NFE")
    axes[1].set(xlabel="latency speed-up over raster, one image at a time (×)",
                ylabel="shapes-oracle validity ↑ (±1 s.e.)", title="quality vs latency (batch 1)")
    axes[2].set(xlabel="wall-clock speed-up over raster, micro-batches of 16 (paired, ×)",
                ylabel="FID, tokenloom-cnn ↓", title="FID vs throughput (batch 16)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.legend(loc="lower center", ncol=len(rows), fontsize=9, frameon=False)
    fig.suptitle("speculative decoding family on shapes 16 px (pixel tokenizer, 8×8 codes, V = 8), one raster target",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "speculative"))
    ap.add_argument("--steps", type=int, default=1500, help="training steps of the target (and of the draft)")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--latency-images", type=int, default=16, help="images timed one by one per cell (0: skip)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on a shared CPU)")
    ap.add_argument("--no-docs", action="store_true", help="print only; leave docs/ alone")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows = []
    for label, gen, rule in CELLS:
        rec = run(config(args, gen, rule), args.out, progress=True)
        m, s = rec["metrics"], rec["stats"]
        L = 64
        rows.append({
            "label": label,
            "nfe_per_image": s.get("nfe_per_image", float(m["nfe"])),
            "nfe_per_batch": float(m["nfe"]),
            "speedup_nfe": s.get("speedup_nfe", L / m["nfe"]),
            "speedup_wallclock": s.get("speedup_wallclock", 1.0 if gen["name"] == "raster" else None),
            "seconds_per_image": m["seconds_per_image"],
            "acceptance_rate": m.get("acceptance_rate"),
            "mean_accepted_length": m.get("mean_accepted_length"),
            "draft_nfe_per_image": s.get("draft_nfe_per_image"),
            "shapes_valid": m.get("shapes_valid"),
            "fid": m.get("fid"),
            "nll": m.get("nll_bits_per_image"),
            "id": rec["id"],
            "draft": rec.get("auxiliary_models", {}).get("draft", {}).get("n_params"),
            "target_params": rec["train"].get("n_params"),
        })
        print(json.dumps(rows[-1]), flush=True)
    if args.latency_images:
        for r, s in zip(rows, latency(args, args.latency_images).values()):
            r["speedup_latency"] = s
    text = table(rows)
    print(text)
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    print(f"total {time.perf_counter() - t0:.0f} s on {machine}")
    if args.no_docs:
        return
    plot(rows, ROOT / "docs" / "speculative.png", args.samples)
    doc = ROOT / "docs" / "speculative.md"
    block = (f"<!-- results:start -->\n{text}\n\n"
             f"Target {rows[0]['target_params']} parameters (non-embedding), draft {rows[-1]['draft']}; "
             f"{args.steps} training steps each; {args.samples} samples per cell in micro-batches of 16; "
             f"measured on {machine}.\n<!-- results:end -->")
    src = doc.read_text()
    new = re.sub(r"<!-- results:start -->.*?<!-- results:end -->", lambda _: block, src, flags=re.DOTALL)
    doc.write_text(new)


if __name__ == "__main__":
    main()
