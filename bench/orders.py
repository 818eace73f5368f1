"""Generation orders and speculative decoding: NFE and wall-clock per image
for every registered generator at the demo's model size (4 layers, width
128, 4 heads), and the speed-up of each over ``raster`` on the same
tokenizer.

    .venv/bin/python bench/orders.py [--repeats 3] [--batch 16] [--train-steps 400] [--train-all]

Setting: 16-px ``shapes``; single-scale orders decode a ``pixel`` tokenizer's
8×8 grid (1 bit per channel, 2×2 pooling, V = 8 — the setting of
``examples/ablation-small.toml``); ``next-scale`` / ``next-scale-markov`` a
``multiscale`` tokenizer (scales 1, 2, 3, 4, 6, 8: L = 130), ``next-frequency``
a ``frequency`` tokenizer, ``depth-stack`` an ``rq`` tokenizer (4×4 stacks of
depth 4: L = 64); each is compared with ``raster`` on *its own* tokenizer.
Sampler chain: classifier-free guidance 1.5 (conditional and null-class
rows in one batched pass) then top-k 4. Micro-batches of ``--batch`` images
(the pipeline's 16), alternating repeats (see ``bench/common.py``);
speed-up = median of paired ratios raster seconds / order seconds.

Weights: an order's forward passes do not depend on its weights except for
the adaptive ones (``sjd``, ``speculative``: how many drafts are accepted),
so the raster target and the speculative draft are trained through the
pipeline's own stages (``--train-steps`` steps, cached in ``--out``) and the
other orders run on freshly initialised weights (``--train-all`` trains
every order's model too). ``zipar``, ``sjd`` and ``speculative`` decode the
trained raster model. Writes ``bench/results/orders.json``.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import common
import torch

from tokenloom import pipeline as P
from tokenloom.config import build_component, parse_config
from tokenloom.interfaces import SamplerContext
from tokenloom.model import InstrumentedModel, build_model
from tokenloom.registry import get_registry
from tokenloom.rng import RowRNG
from tokenloom.sampling import build_chain

MODEL = {"n_layer": 4, "d_model": 128, "n_head": 4}  # the demo's backbone
CHAIN = [{"name": "cfg", "scale": 1.5}, {"name": "top-k", "k": 4}]
TOKENIZERS = {
    "pixel": {"name": "pixel", "bits": 1, "pool": 2},
    "multiscale": {"name": "multiscale", "downsample": 2, "steps": 0},
    "frequency": {"name": "frequency"},
    "rq": {"name": "rq", "downsample": 4, "depth": 4, "steps": 0},
}
# generator table, tokenizer; raster-model orders first (they share the trained raster model)
ORDERS = [
    ({"name": "raster"}, "pixel"),
    ({"name": "zipar"}, "pixel"),
    ({"name": "sjd"}, "pixel"),
    ({"name": "speculative"}, "pixel"),
    ({"name": "random"}, "pixel"),
    ({"name": "random-parallel"}, "pixel"),
    ({"name": "masked"}, "pixel"),
    ({"name": "next-block"}, "pixel"),
    ({"name": "next-cell"}, "pixel"),
    ({"name": "neighboring"}, "pixel"),
    ({"name": "par"}, "pixel"),
    ({"name": "next-scale"}, "multiscale"),
    ({"name": "next-scale-markov"}, "multiscale"),
    ({"name": "next-frequency"}, "frequency"),
    ({"name": "depth-stack"}, "rq"),
]
ADAPTIVE = {"sjd", "speculative"}
RASTER_MODEL = {"raster", "zipar", "sjd", "speculative"}


def config(args, generator: dict, tokenizer: str, steps: int):
    return parse_config({
        "seed": 0,
        "data": {"name": "shapes", "size": 16, "n": 4000, "n_holdout": 64},
        "tokenizer": TOKENIZERS[tokenizer],
        "generator": generator,
        "model": MODEL,
        "train": {"steps": steps, "batch_size": 32, "lr": 1e-3, "warmup": 50},
        "sampler": CHAIN,
        "metrics": {"names": [], "n_samples": args.batch},
        "device": "cpu",
    }, source=f"bench/orders.py ({generator['name']})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16, help="images per generate call (the pipeline's micro-batch)")
    ap.add_argument("--train-steps", type=int, default=400, help="training steps of the raster target and draft")
    ap.add_argument("--train-all", action="store_true", help="train every order's model, not only raster's")
    ap.add_argument("--only", nargs="*", default=None, help="generator names to run (default: all)")
    ap.add_argument("--out", default=str(common.ROOT / "runs" / "bench-orders"), help="cache of trained models")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--name", default="orders")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    common.setup_threads(args.threads)
    machine = common.machine_info()
    print(f"orders benchmark: model {MODEL}, micro-batch {args.batch}\n  {common.describe_machine(machine)}")
    reg, dev, cache = get_registry(), torch.device("cpu"), Path(args.out) / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    available = set(reg.available("generator"))
    missing = [g for g in available if g not in {o["name"] for o, _ in ORDERS}]
    if missing:
        print(f"  note: registered generators not in this benchmark: {', '.join(sorted(missing))}")

    stages: dict[str, tuple] = {}

    def tokenizer_stage(tname: str, steps: int):
        if tname not in stages:
            cfg = config(args, {"name": "raster"}, tname, steps)
            train_set, _ = P.load_data(cfg)
            data_id = P.data_key(cfg)
            tok, tok_hash, _ = P.fit_tokenizer(cfg, train_set.images, cache, registry=reg, device=dev,
                                               progress=False, data_id=data_id)
            stages[tname] = (train_set, data_id, tok, tok_hash)
        return stages[tname]

    def build(gtable: dict, tname: str):
        trained = args.train_all or (gtable["name"] in RASTER_MODEL and tname == "pixel")
        cfg = config(args, gtable, tname, args.train_steps)
        train_set, data_id, tok, tok_hash = tokenizer_stage(tname, args.train_steps)
        options = {k: v for k, v in gtable.items() if k != "name"}
        gen = build_component(reg, "generator", gtable["name"], {**options, "tokenizer": tok}, path="generator")
        n_classes = int(train_set.n_classes)
        if trained:
            codes = P.encode_all(tok, tok_hash, {"train": train_set}, cache,
                                 key_extra={"data": data_id, "seed": cfg.seed, "split": "train"}, device=dev)
            model, _, _ = P.train_or_load(cfg, gen, codes["train"], train_set.labels, n_classes, tok_hash, cache,
                                          device=dev, progress=True, data_id=data_id)
            P.train_auxiliary(cfg, gen, codes["train"], train_set.labels, n_classes, tok_hash, cache, device=dev,
                              progress=True, data_id=data_id)
        else:
            model = build_model(gen.model_spec(), cfg.model, n_classes=n_classes, seed=0).eval()
            aux = gen.auxiliary_models(cfg.model)
            if aux:
                gen.attach_models({k: InstrumentedModel(build_model(gen.model_spec(), m, n_classes=n_classes,
                                                                    seed=1).eval()) for k, m in aux.items()})
        model = InstrumentedModel(model)
        chain = build_chain(cfg.sampler, registry=reg)
        emb = model.token_embeddings()
        chain.bind(SamplerContext(vocab_size=tok.vocab_size, code_embeddings=tok.code_embeddings().detach(),
                                  token_embeddings=None if emb is None else emb.detach()))
        labels = torch.arange(args.batch) % n_classes
        return gen, model, chain, labels, trained

    def runner(gen, model, chain, labels, record):
        def run():
            model.reset()
            if hasattr(gen, "reset_stats"):
                gen.reset_stats()
            with torch.no_grad():
                gen.generate(model, chain, labels, rng=RowRNG(0, torch.arange(args.batch)))
            record["nfe"] = model.nfe
            record["stats"] = gen.stats()
        return run

    raster_of: dict[str, tuple] = {}
    rows, summary, records = [], {}, []
    for gtable, tname in ORDERS:
        name = gtable["name"]
        if name not in available or (args.only and name not in args.only and name != "raster"):
            continue
        try:
            if tname not in raster_of:
                raster_of[tname] = build({"name": "raster"}, tname)
            cell = raster_of[tname] if name == "raster" else build(gtable, tname)
        except Exception as exc:  # noqa: BLE001 - report and go on with the other orders
            print(f"{name:<18} skipped: {type(exc).__name__}: {exc}")
            continue
        rr, cr = {}, {}
        fns = {"raster": runner(*raster_of[tname][:4], rr), "order": runner(*cell[:4], cr)}
        if name == "raster":
            fns = {"order": fns["order"]}
        t = common.interleaved(fns, args.repeats)
        sec = common.median(t["order"]["wall"]) / args.batch
        if name == "raster":
            speed, lo, hi, cpu = 1.0, 1.0, 1.0, 1.0
        else:
            speed = common.paired_ratio(t["raster"]["wall"], t["order"]["wall"])
            lo, hi = common.spread(t["raster"]["wall"], t["order"]["wall"])
            cpu = common.paired_ratio(t["raster"]["cpu"], t["order"]["cpu"])
        L = cell[0].tokenizer.layout.length
        nfe = cr.get("nfe", 0)
        raster_nfe = L
        stats = cr.get("stats", {}) or {}
        rec = {"generator": name, "tokenizer": tname, "L": L, "nfe_per_batch": nfe,
               "nfe_speedup": raster_nfe / nfe if nfe else None, "seconds_per_image": sec, "speedup_wall": speed,
               "speedup_min": lo, "speedup_max": hi, "speedup_cpu": cpu, "trained": cell[4],
               "stats": {k: v for k, v in stats.items() if isinstance(v, (int, float))}, "times": t}
        records.append(rec)
        acc = stats.get("acceptance_rate")
        print(f"{name:<18} {tname:<10} L {L:>3}  NFE {nfe:>4}  {sec * 1e3:7.1f} ms/image  vs raster "
              f"{speed:5.2f}× ({lo:.2f}–{hi:.2f}), CPU {cpu:.2f}×"
              + (f"  acceptance {acc:.2f}" if acc is not None else ""), flush=True)
        rows.append([name + ("" if cell[4] else " ‡"), f"{tname} (L = {L})", f"{nfe}",
                     common.fx(rec["nfe_speedup"]), f"{sec * 1e3:.1f}",
                     "1" if name == "raster" else f"**{common.fx(speed)}** ({lo:.2f}–{hi:.2f})", common.fx(cpu),
                     "–" if acc is None else f"{acc:.2f}"])
        summary[f"orders {name} speed-up over raster"] = round(speed, 3)

    md = (f"Demo model size ({MODEL['n_layer']} layers × width {MODEL['d_model']}, {MODEL['n_head']} heads), "
          f"micro-batches of {args.batch} images with guidance 1.5 (doubled rows) and top-k 4; medians of "
          f"{args.repeats} alternating repeats; speed-up = raster seconds / order seconds on the same tokenizer "
          "(min–max over repeats). NFE = forward passes of the target per micro-batch (the draft's passes of "
          "`speculative` are not counted there). ‡ = freshly initialised weights (fixed NFE: speed does not "
          f"depend on them); the raster model and the draft are trained {args.train_steps} steps.\n\n"
          + common.md_table(["generator", "tokenizer", "NFE", "NFE speed-up", "ms / image", "wall speed-up",
                             "CPU speed-up", "acceptance"], rows))
    common.write_result(args.name, common.result("orders", args, machine, summary, md, rows=records))


if __name__ == "__main__":
    main()
