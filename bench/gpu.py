"""The GPU path, measured in one prepared script (under 8 minutes on one GPU).

    .venv/bin/python bench/gpu.py                 # needs a CUDA device; writes bench/results/gpu.json
    .venv/bin/python bench/gpu.py --dry-run       # every code path at toy sizes on the CPU (no figures)
    .venv/bin/python bench/report.py              # then: the GPU section of docs/benchmarks.md

Three sections, each against its peer on the same device, in one process:

1. **training** (a LlamaGen-B-like backbone: 12 layers × width 768, 12 heads, T = 256 tokens of a
   16×16 VQ grid, V = 16384, batch 32): tokenloom's product step (``tokenloom.train.train_step`` on
   ``make_batch``) in fp32, with TF32 matmuls, with bf16 autocast, + fused AdamW, + ``torch.compile``
   of the model — and the bare nanoGPT stack of ``bench/train.py`` (``BareGPT``) in fp32 and with the
   best settings. MFU = model FLOPs (6·N + 12·n_layer·d·T per token) per second over the bf16
   matmul peak measured here (square ``torch.mm``); the headline is ours / bare at the best
   settings (target ≥ 0.8×);
2. **decoding** (the same backbone, raster order, L = 256, V = 16384) at batch 1, 32 and 256:
   Hugging Face GPT-2 ``generate`` (same depth, width, heads, vocabulary; sampling, its dynamic
   cache), ours eager (``raster`` through the instrumented backbone and its KV cache) and ours
   with the static KV cache (``tokenloom.backbone.kvcache.static_raster_decode``) compiled by
   ``torch.compile`` — on CUDA with ``mode="reduce-overhead"`` (CUDA graphs), as gpt-fast and
   LlamaGen decode — in fp32 and bf16. Target: ≥ 3× GPT-2 at batch 1;
3. **speculative orders** on ``shapes`` (the setting of ``bench/speculative.py``, trained on the
   GPU): ``sjd`` and ``speculative`` against ``raster`` on the same trained model, chain and seed;
   their ``speedup_wallclock`` is the generators' own paired measurement against plain next-token
   decoding (``baseline = true``), next to ``speedup_nfe``.

``--budget-s`` (default 420) bounds the whole run: a section that would start after it is skipped
and says so. Without a CUDA device the script exits with a message (status 2) unless ``--dry-run``,
which runs every code path at toy sizes on the CPU (compilation with the ``eager`` backend: the
graph capture without code generation) and writes its JSON to ``--out`` (default: a temporary
file) — what ``tests/test_gpu_script.py`` runs so this script does not rot.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
import torch

import tokenloom
from tokenloom.config import ModelConfig, TrainConfig
from tokenloom.model import InstrumentedModel, build_model
from tokenloom.rng import RowRNG
from tokenloom.sampling import SamplerChain
from tokenloom.train import batch_indices, configure_optimizer, lr_at, make_batch, train_step

BENCH = Path(__file__).resolve().parent
TRAIN_TARGET, DECODE_TARGET = 0.8, 3.0

#: (n_layer, d_model, n_head, tokenizer kwargs, train batch, train steps per repeat, decode batches)
SIZES = {
    "full": (12, 768, 12, {"name": "vq", "codebook_size": 16384, "downsample": 16, "image_shape": (3, 256, 256)},
             32, 10, (1, 32, 256)),
    "dry": (2, 32, 2, {"name": "pixel", "bits": 1, "image_shape": (3, 4, 4)}, 4, 2, (1, 2)),
}


def no_cuda_message() -> str:
    return ("bench/gpu.py: no CUDA device (torch.cuda.is_available() is False); run it on a machine with a GPU, "
            "or `bench/gpu.py --dry-run` to check every code path on the CPU (no figures)")


def set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def matmul_peak(dev: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    """FLOP/s of square ``torch.mm`` in ``dtype`` (the achievable peak, measured here)."""
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    torch.mm(a, b)
    wall, _ = common.timed(lambda: [torch.mm(a, b) for _ in range(repeats)])
    return repeats * 2 * n**3 / wall


def fused_adamw(model: torch.nn.Module, cfg: TrainConfig, fused: bool) -> torch.optim.Optimizer:
    """tokenloom's AdamW groups (decay on matrices), with ``fused`` kernels where asked."""
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]}
              for g in configure_optimizer(model, cfg).param_groups]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=fused or None)


# ---------------------------------------------------------------------------
# 1. training
# ---------------------------------------------------------------------------


def train_section(args: Any, dev: torch.device, size: tuple) -> dict[str, Any]:
    sys.path.insert(0, str(BENCH))
    from train import BareGPT  # bench/train.py's bare nanoGPT stack

    n_layer, d, n_head, tok_kw, B, steps, _ = size
    tok_kw = dict(tok_kw)
    tok = tokenloom.create("tokenizer", tok_kw.pop("name"), **tok_kw)
    gen = tokenloom.create("generator", "raster", tokenizer=tok)
    spec = gen.model_spec()
    T, V = spec.seq_len, tok.vocab_size
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, V, (max(256, 4 * B), T), generator=g).to(dev)
    labels = torch.randint(0, 10, (codes.shape[0],), generator=g).to(dev)
    cfg = TrainConfig(steps=10_000, batch_size=B, lr=3e-4, warmup=10)
    fused_ok = dev.type == "cuda"
    variants = {  # name: (tf32, bf16, fused AdamW, compile)
        "ours fp32": (False, False, False, False),
        "ours tf32": (True, False, False, False),
        "ours bf16": (True, True, False, False),
        "ours bf16+fused": (True, True, fused_ok, False),
        "ours bf16+fused+compile": (True, True, fused_ok, True),
        "bare fp32": (False, False, False, False),
        "bare bf16+fused+compile": (True, True, fused_ok, True),
    }
    flops = {}
    out: dict[str, Any] = {"shape": {"n_layer": n_layer, "d_model": d, "n_head": n_head, "seq_len": T, "vocab": V,
                                     "batch": B, "steps_per_repeat": steps}, "variants": {}}
    for name, (tf32, bf16, fused, compiled) in variants.items():
        set_tf32(tf32)
        torch.manual_seed(0)
        if name.startswith("ours"):
            model = build_model(spec, ModelConfig(n_layer=n_layer, d_model=d, n_head=n_head), n_classes=10).to(dev)
            fpt = model.flops_per_token(T)
        else:
            model = BareGPT(n_layer, d, n_head, V, T).to(dev)
            fpt = model.flops_per_token(T)
        model.train()
        flops[name] = fpt
        opt = fused_adamw(model, cfg, fused)
        net = torch.compile(model, backend=args.compile_backend) if compiled else model
        state = {"step": 0}

        def run(model=model, net=net, opt=opt, name=name, bf16=bf16, state=state):
            for _ in range(steps):
                s = state["step"]
                idx = batch_indices(codes.shape[0], B, seed=0, step=s).to(dev)
                if name.startswith("ours"):
                    batch = make_batch(gen, codes, labels, idx, seed=0, step=s, n_steps=cfg.steps,
                                       label_dropout=cfg.label_dropout, null_class=10)
                    train_step(net, opt, batch, lr=lr_at(s, cfg), grad_clip=cfg.grad_clip, bf16=bf16)
                else:
                    x = codes[idx]
                    inputs = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1)
                    for group in opt.param_groups:
                        group["lr"] = lr_at(s, cfg)
                    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                        loss = net(inputs, x)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    opt.step()
                state["step"] = s + 1

        t0 = time.perf_counter()
        run()  # warm-up (and compilation)
        common.sync()
        warm = time.perf_counter() - t0
        walls = [common.timed(run)[0] for _ in range(args.repeats)]
        tokens = steps * B * T
        out["variants"][name] = {"tf32": tf32, "bf16": bf16, "fused_adamw": fused, "compile": compiled,
                                 "tokens_per_s": tokens / common.median(walls), "walls": walls,
                                 "warmup_seconds": warm, "flops_per_token": fpt}
        print(f"  train {name:<26} {tokens / common.median(walls):>10.0f} tok/s  (warm-up {warm:.1f} s)", flush=True)
        del model, net, opt
    set_tf32(True)
    peak = matmul_peak(dev, torch.bfloat16 if dev.type == "cuda" else torch.float32, args.matmul_n, args.repeats)
    out["matmul_peak_flops"] = peak
    for r in out["variants"].values():
        r["mfu"] = r["tokens_per_s"] * r["flops_per_token"] / peak
    best, bare = out["variants"]["ours bf16+fused+compile"], out["variants"]["bare bf16+fused+compile"]
    out["ours_vs_bare"] = best["tokens_per_s"] / bare["tokens_per_s"]
    out["ours_vs_bare_fp32"] = (out["variants"]["ours fp32"]["tokens_per_s"]
                                / out["variants"]["bare fp32"]["tokens_per_s"])
    return out


# ---------------------------------------------------------------------------
# 2. decoding
# ---------------------------------------------------------------------------


def decode_section(args: Any, dev: torch.device, size: tuple) -> dict[str, Any]:
    from tokenloom.backbone.kvcache import StaticDecoder, static_raster_decode

    n_layer, d, n_head, tok_kw, _, _, batches = size
    tok_kw = dict(tok_kw)
    tok = tokenloom.create("tokenizer", tok_kw.pop("name"), **tok_kw)
    gen = tokenloom.create("generator", "raster", tokenizer=tok)
    V, L = tok.vocab_size, tok.layout.length
    set_tf32(True)
    torch.manual_seed(0)
    model = InstrumentedModel(build_model(gen.model_spec(), ModelConfig(n_layer=n_layer, d_model=d, n_head=n_head),
                                          n_classes=1).to(dev).eval())
    hf = None
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=L + 1, n_embd=d, n_layer=n_layer, n_head=n_head,
                                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                        eos_token_id=None)).to(dev).eval()
    except ImportError:
        print("  (transformers is not installed: no GPT-2 peer; .venv/bin/pip install -e '.[bench]')")
    out: dict[str, Any] = {"shape": {"n_layer": n_layer, "d_model": d, "n_head": n_head, "L": L, "V": V}, "rows": []}
    for B in batches:
        cond = torch.zeros(B, dtype=torch.long, device=dev)
        fns = {}

        def eager(B=B, cond=cond):
            with torch.inference_mode():
                return gen.generate(model, SamplerChain(), cond, rng=RowRNG(0, torch.arange(B, device=dev)))
        fns["ours eager"] = eager
        decoders = {}
        for label, bf16 in (("ours static+compile", False), ("ours static+compile bf16", True)):
            decoders[label] = StaticDecoder(model.model, B, L, compile=True, bf16=bf16, backend=args.compile_backend)

            def static(B=B, cond=cond, dec=decoders[label]):
                with torch.inference_mode():
                    return static_raster_decode(model.model, SamplerChain(), cond,
                                                RowRNG(0, torch.arange(B, device=dev)), L, decoder=dec)
            fns[label] = static
        if hf is not None:
            prompt = torch.zeros(B, 1, dtype=torch.long, device=dev)

            def gpt2(prompt=prompt):
                with torch.inference_mode():
                    return hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=0,
                                       max_new_tokens=L, min_new_tokens=L, pad_token_id=0, eos_token_id=None)
            fns["gpt2 generate"] = gpt2
        # the share of tokens the compiled static path draws as the eager one does (also its compile warm-up):
        # 1.0 unless rounding differences of the two kernels' logits flip a draw
        same = float((eager() == fns["ours static+compile"]()).float().mean())
        t = common.interleaved(fns, args.repeats)
        row = {"batch": B, "static_equals_eager": same}
        for name, times in t.items():
            row[name] = {"tokens_per_s": B * L / common.median(times["wall"]), "walls": times["wall"]}
        if hf is not None:
            for name in fns:
                if name != "gpt2 generate":
                    row[name]["vs_gpt2"] = common.paired_ratio(t["gpt2 generate"]["wall"], t[name]["wall"])
        out["rows"].append(row)
        print(f"  decode batch {B:>3}: " + ", ".join(
            f"{n} {row[n]['tokens_per_s']:.0f} tok/s" + (f" ({row[n]['vs_gpt2']:.2f}× GPT-2)" if "vs_gpt2" in row[n]
                                                          else "") for n in fns)
              + f"; static tokens == eager: {same:.4f}", flush=True)
        del decoders
    return out


# ---------------------------------------------------------------------------
# 3. speculative orders
# ---------------------------------------------------------------------------


def speculative_section(args: Any, dev: torch.device, dry: bool) -> dict[str, Any]:
    from tokenloom.config import parse_config
    from tokenloom.pipeline import run

    work = Path(args.work or tempfile.mkdtemp(prefix="tokenloom-gpu-"))
    chain = [{"name": "cfg", "scale": 1.5}, {"name": "top-k", "k": 4}]
    cells = [("raster", {"name": "raster"}),
             ("sjd", {"name": "sjd", "window": 16, "init": "left", "baseline": True}),
             ("speculative", {"name": "speculative", "gamma": 4, "baseline": True, "draft_n_layer": 1,
                              "draft_d_model": 32, "draft_n_head": 2})]
    out: dict[str, Any] = {"work": str(work), "rows": []}
    for label, g in cells:
        cfg = parse_config({
            "seed": 0,
            "data": {"name": "shapes", "size": 16 if not dry else 8, "n": 4000 if not dry else 64,
                     "n_holdout": 500 if not dry else 16},
            "tokenizer": {"name": "pixel", "bits": 1, "pool": 2},
            "generator": g,
            "model": {"n_layer": 3, "d_model": 96, "n_head": 4} if not dry else {"n_layer": 1, "d_model": 16,
                                                                                 "n_head": 2},
            "train": {"steps": 600 if not dry else 2, "batch_size": 32 if not dry else 8, "lr": 1e-3,
                      "warmup": 50 if not dry else 1},
            "sampler": chain,
            "metrics": {"names": ["nll", "cost", "acceptance"], "n_samples": 64 if not dry else 4},
            "device": dev.type,
        }, source=f"bench/gpu.py ({label})")
        t0 = time.perf_counter()
        rec = run(cfg, work, progress=False)
        m = rec["metrics"]
        row = {"generator": label, "nfe": m.get("nfe"), "seconds_per_image": m.get("seconds_per_image"),
               "speedup_nfe": m.get("speedup_nfe"), "speedup_wallclock": m.get("speedup_wallclock"),
               "run_seconds": time.perf_counter() - t0}
        out["rows"].append(row)
        print(f"  speculative {label:<12} NFE {row['nfe']}, speed-up NFE {row['speedup_nfe']}, "
              f"wall-clock {row['speedup_wallclock']}", flush=True)
    return out


# ---------------------------------------------------------------------------


def markdown(res: dict[str, Any]) -> str:
    """The section of docs/benchmarks.md (``bench/report.py`` puts it between the gpu markers)."""
    dev = res["device"]
    parts = [(f"Device: **{dev.get('name', '?')}** (torch {torch.__version__}); `bench/gpu.py` in "
             f"{res['seconds']:.0f} s.")]
    tr = res.get("train")
    if tr:
        s = tr["shape"]
        rows = [[n, f"{r['tokens_per_s']:.0f}", f"{r['mfu'] * 100:.1f} %", "yes" if r["tf32"] else "no",
                 "yes" if r["bf16"] else "no", "yes" if r["fused_adamw"] else "no", "yes" if r["compile"] else "no"]
                for n, r in tr["variants"].items()]
        parts.append(f"**Training** ({s['n_layer']} layers × {s['d_model']}, T = {s['seq_len']}, V = {s['vocab']}, "
                     f"batch {s['batch']}; MFU against the measured bf16 matmul peak "
                     f"{tr['matmul_peak_flops'] / 1e12:.0f} TFLOP/s): ours / bare at the best settings "
                     f"**{tr['ours_vs_bare']:.2f}×** (target ≥ {TRAIN_TARGET}×), in fp32 "
                     f"{tr['ours_vs_bare_fp32']:.2f}×.\n\n"
                     + common.md_table(["trainer", "tokens/s", "MFU", "TF32", "bf16", "fused AdamW", "compile"], rows))
    de = res.get("decode")
    if de:
        names = [n for n in de["rows"][0] if isinstance(de["rows"][0][n], dict)]
        rows = [[r["batch"]] + [f"{r[n]['tokens_per_s']:.0f}" + (f" ({r[n]['vs_gpt2']:.2f}×)" if "vs_gpt2" in r[n]
                                                                 else "") for n in names]
                + [f"{r['static_equals_eager']:.4f}"] for r in de["rows"]]
        parts.append(f"**Decoding** (L = {de['shape']['L']}, V = {de['shape']['V']}; tokens/s, × GPT-2 `generate` "
                     f"in brackets; target ≥ {DECODE_TARGET}× at batch 1):\n\n"
                     + common.md_table(["batch"] + names + ["static = eager (share of tokens)"], rows))
    sp = res.get("speculative")
    if sp:
        rows = [[r["generator"], r["nfe"], common.fx(r["speedup_nfe"]) if r["speedup_nfe"] else "–",
                 common.fx(r["speedup_wallclock"]) if r["speedup_wallclock"] else "–"] for r in sp["rows"]]
        parts.append("**Speculative orders** (shapes, trained on this GPU; paired wall-clock against plain "
                     "next-token decoding):\n\n" + common.md_table(["generator", "NFE", "speed-up NFE",
                                                                     "speed-up wall-clock"], rows))
    for note in res.get("skipped", []):
        parts.append(f"*Skipped:* {note}")
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="every code path at toy sizes on the CPU; no figures")
    ap.add_argument("--out", default=None, help="the JSON (default: bench/results/gpu.json; dry run: a temp file)")
    ap.add_argument("--sections", nargs="+", default=["train", "decode", "speculative"],
                    choices=["train", "decode", "speculative"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--matmul-n", type=int, default=8192)
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip sections that would start after this")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend (dry run: eager)")
    ap.add_argument("--work", default=None, help="run directory of the speculative section (default: temporary)")
    args = ap.parse_args(argv)
    if args.dry_run:
        dev, size = torch.device("cpu"), SIZES["dry"]
        args.repeats, args.matmul_n, args.compile_backend = 1, 64, "eager"
    else:
        if not torch.cuda.is_available():
            print(no_cuda_message(), file=sys.stderr)
            raise SystemExit(2)
        dev, size = torch.device("cuda"), SIZES["full"]
    t0 = time.perf_counter()
    machine = common.machine_info()
    res: dict[str, Any] = {"bench": "gpu", "dry_run": args.dry_run, "machine": machine, "skipped": [],
                           "device": {"type": dev.type, "name": torch.cuda.get_device_name(dev)
                                      if dev.type == "cuda" else "cpu (dry run)"}}
    print(f"bench/gpu.py on {res['device']['name']}{' (dry run: toy sizes, no figures)' if args.dry_run else ''}")
    sections = {"train": lambda: train_section(args, dev, size), "decode": lambda: decode_section(args, dev, size),
                "speculative": lambda: speculative_section(args, dev, args.dry_run)}
    for name in args.sections:
        spent = time.perf_counter() - t0
        if spent > args.budget_s:
            res["skipped"].append(f"{name}: the budget of {args.budget_s:.0f} s was spent ({spent:.0f} s)")
            print(f"  skipping {name}: budget spent", flush=True)
            continue
        print(f"[{name}]", flush=True)
        res[name] = sections[name]()
    res["seconds"] = time.perf_counter() - t0
    summary: dict[str, Any] = {}
    if "train" in res:
        summary["gpu train ours / bare (best settings)"] = common.target(res["train"]["ours_vs_bare"], TRAIN_TARGET)
    if "decode" in res:
        for r in res["decode"]["rows"]:
            ratio = r.get("ours static+compile", {}).get("vs_gpt2")
            if ratio is not None and r["batch"] == 1:
                summary["gpu decode batch 1 static+compile (× GPT-2 generate)"] = common.target(ratio, DECODE_TARGET)
    res["summary"] = summary
    res["command"] = " ".join(["bench/gpu.py"] + (argv if argv is not None else sys.argv[1:]))
    res["args"] = vars(args)
    res["markdown"] = markdown(res)
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp()) / "gpu-dry.json" if args.dry_run
                                           else common.RESULTS / "gpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=str))
    print(f"wrote {out} ({res['seconds']:.0f} s)")
    return res


if __name__ == "__main__":
    main()
