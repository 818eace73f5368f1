"""KV-cached sampling throughput: tokenloom's backbone against Hugging Face
``transformers`` GPT-2 ``generate`` at the same depth, width, heads,
vocabulary, batch and length.

    .venv/bin/pip install -e '.[bench]'      # transformers: benchmark only
    .venv/bin/python bench/decode.py [--shapes demo wide | --layers 8 --width 512 --heads 8] [--repeats 3]

Ours is the product path: the ``raster`` generator decoding a ``pixel``
tokenizer's grid (V = 2^(3·bits), L = grid²) through the instrumented
backbone with its static KV cache, plain categorical sampling (an empty
sampler chain, counter-based RNG). GPT-2 is ``GPT2LMHeadModel.generate`` with
``do_sample=True, top_k=0`` from a one-token prompt for exactly L new tokens
(its default dynamic cache, its default SDPA attention). Both models are
randomly initialised (speed does not depend on the weights) and run in the
same process on the same device, *alternately* (see ``bench/common.py``);
the figure is the median over repeats of the paired ratio GPT-2 seconds /
our seconds (> 1: we are faster). Rows: two model shapes — the demo's
backbone (4 layers × 128) and a wider one (4 × 256) — at batch 1 and 32, with
learned positions (GPT-2's own) and with 2-D RoPE (our default). Targets
(issue 10): ≥ 3× at batch 1, ≥ 2× at batch 32.

``--static plain|compile`` adds a third peer: the static-KV-cache decoder that ``bench/gpu.py``
measures on a GPU (``tokenloom.backbone.kvcache.static_raster_decode``), eager or compiled.

Writes ``bench/results/decode.json``. A benchmark, not a test: numbers
depend on the machine and its load; ``--repeats 7`` for steadier medians.
"""

from __future__ import annotations

import argparse

import common
import torch

import tokenloom
from tokenloom.config import ModelConfig
from tokenloom.model import InstrumentedModel, build_model
from tokenloom.rng import RowRNG
from tokenloom.sampling import SamplerChain

TARGETS = {1: 3.0, 32: 2.0}


class BareDecoder(torch.nn.Module):
    """The floor of eager PyTorch: a plain ~40-line KV-cache sampling loop
    (GPT-2 blocks, learned positions, a preallocated cache, one
    ``torch.multinomial`` per token, no checks, no instrumentation) — the
    second peer, to show how much of the gap to GPT-2 is left to any eager
    implementation on this machine."""

    def __init__(self, n_layer: int, d: int, n_head: int, V: int, L: int):
        super().__init__()
        nn = torch.nn
        self.n_layer, self.d, self.n_head, self.V, self.L = n_layer, d, n_head, V, L
        self.wte, self.wpe = nn.Embedding(V, d), nn.Embedding(L + 1, d)
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "ln1": nn.LayerNorm(d), "qkv": nn.Linear(d, 3 * d), "o": nn.Linear(d, d),
            "ln2": nn.LayerNorm(d), "fc": nn.Linear(d, 4 * d), "p": nn.Linear(4 * d, d)}) for _ in range(n_layer))
        self.lnf, self.head = nn.LayerNorm(d), nn.Linear(d, V, bias=False)

    @torch.inference_mode()
    def generate(self, B: int) -> torch.Tensor:
        F, d, H, L = torch.nn.functional, self.d, self.n_head, self.L
        K = torch.zeros(self.n_layer, B, H, L + 1, d // H)
        Vc = torch.zeros_like(K)
        tok, out = torch.zeros(B, 1, dtype=torch.long), torch.empty(B, L, dtype=torch.long)
        for t in range(L):
            x = self.wte(tok) + self.wpe.weight[t]  # (B, 1, d)
            for i, b in enumerate(self.blocks):
                q, k, v = F.linear(F.layer_norm(x, (d,), b.ln1.weight, b.ln1.bias), b.qkv.weight, b.qkv.bias
                                   ).view(B, 1, 3, H, d // H).permute(2, 0, 3, 1, 4)  # (B, H, 1, hd) each
                K[i, :, :, t : t + 1], Vc[i, :, :, t : t + 1] = k, v
                y = F.scaled_dot_product_attention(q, K[i, :, :, : t + 1], Vc[i, :, :, : t + 1])
                x = x + F.linear(y.transpose(1, 2).reshape(B, 1, d), b.o.weight, b.o.bias)
                h = F.layer_norm(x, (d,), b.ln2.weight, b.ln2.bias)
                x = x + F.linear(F.gelu(F.linear(h, b.fc.weight, b.fc.bias), approximate="tanh"), b.p.weight, b.p.bias)
            logits = self.head(F.layer_norm(x[:, -1], (d,), self.lnf.weight, self.lnf.bias))
            tok = torch.multinomial(torch.softmax(logits, -1), 1)
            out[:, t : t + 1] = tok
        return out


#: Model shapes measured by default: the demo's backbone (``tokenloom demo``: 4 layers × 128) and a wider
#: one (4 × 256), both decoding L = 256 tokens from a V = 512 vocabulary.
SHAPES = {"demo": (4, 128, 4), "wide": (4, 256, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), help=f"named shapes {SHAPES} (layers, width, heads)")
    ap.add_argument("--layers", type=int, help="a custom shape instead: layers (with --width, --heads)")
    ap.add_argument("--width", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--grid", type=int, default=16, help="L = grid²")
    ap.add_argument("--bits", type=int, default=3, help="V = 2^(3·bits)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--positions", nargs="+", default=["learned", "rope2d"], choices=["learned", "rope2d"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-bare", action="store_true", help="leave out the bare-loop peer")
    ap.add_argument("--peer-inference-mode", action=argparse.BooleanOptionalAction, default=True,
                    help="run GPT-2 generate under torch.inference_mode as well (default: yes, as ours runs)")
    ap.add_argument("--name", default="decode", help="result file bench/results/<name>.json")
    ap.add_argument("--static", choices=["plain", "compile"], default=None,
                    help="also time the static-KV-cache decoder (tokenloom.backbone.kvcache.static_raster_decode), "
                         "eager or under torch.compile (CUDA graphs on CUDA) — a peer column, off by default")
    args = ap.parse_args()
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise SystemExit("bench/decode.py needs transformers: .venv/bin/pip install -e '.[bench]'") from None
    hf_logging.set_verbosity_error()
    common.setup_threads(args.threads)
    dev = torch.device(args.device)
    machine = common.machine_info()
    if args.layers or args.width or args.heads:
        if not (args.layers and args.width and args.heads):
            raise SystemExit("bench/decode.py: a custom shape needs --layers, --width and --heads")
        shapes = {f"{args.layers}×{args.width}": (args.layers, args.width, args.heads)}
    else:
        unknown = [n for n in args.shapes if n not in SHAPES]
        if unknown:
            raise SystemExit(f"bench/decode.py: unknown shape(s) {unknown}; known: {sorted(SHAPES)}")
        shapes = {n: SHAPES[n] for n in args.shapes}

    tok = tokenloom.create("tokenizer", "pixel", bits=args.bits, image_shape=(3, args.grid, args.grid))
    gen = tokenloom.create("generator", "raster", tokenizer=tok)
    V, L = tok.vocab_size, tok.layout.length
    print(f"decode benchmark: V = {V}, L = {L}, device {dev}\n  {common.describe_machine(machine)}")
    print(f"{'shape':<14} {'positions':<10} {'batch':>5} {'ours tok/s':>11} {'gpt2 tok/s':>11} {'wall ratio':>10} "
          f"{'(min–max)':>13} {'cpu ratio':>9}")

    def ours(model, batch):
        cond = torch.zeros(batch, dtype=torch.long, device=dev)

        def run():
            with torch.inference_mode():  # as tokenloom.pipeline.generate_codes runs it
                gen.generate(model, SamplerChain(), cond, rng=RowRNG(0, torch.arange(batch, device=dev)))
        return run

    def static_peer(model, batch, compile):
        from tokenloom.backbone.kvcache import StaticDecoder, static_raster_decode

        cond = torch.zeros(batch, dtype=torch.long, device=dev)
        decoder = StaticDecoder(model.model, batch, L, compile=compile)  # made once: compiled once

        def run():
            with torch.inference_mode():
                static_raster_decode(model.model, SamplerChain(), cond, RowRNG(0, torch.arange(batch, device=dev)), L,
                                     decoder=decoder)
        return run

    def gpt2(hf, batch):
        prompt = torch.zeros(batch, 1, dtype=torch.long, device=dev)

        def run():
            with torch.inference_mode() if args.peer_inference_mode else torch.no_grad():
                out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=0,
                                  max_new_tokens=L, min_new_tokens=L, pad_token_id=0, eos_token_id=None)
            assert out.shape == (batch, L + 1)
        return run

    rows, summary, records, params = [], {}, [], []
    for shape_name, (n_layer, width, heads) in shapes.items():
        hf = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=L + 1, n_embd=width, n_layer=n_layer,
                                        n_head=heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                        bos_token_id=0, eos_token_id=None)).to(dev).eval()
        n_hf = sum(p.numel() for n, p in hf.named_parameters() if "wte" not in n and "wpe" not in n)
        bare = BareDecoder(n_layer, width, heads, V, L).eval()
        label = f"{shape_name} ({n_layer}×{width})"
        for pos in args.positions:
            cfg = ModelConfig(n_layer=n_layer, d_model=width, n_head=heads, pos=pos)
            model = InstrumentedModel(build_model(gen.model_spec(), cfg, n_classes=1).to(dev).eval())
            n_ours = model.model.n_params(non_embedding=True)
            for batch in args.batches:
                fns = {"ours": ours(model, batch), "gpt2": gpt2(hf, batch)}
                if pos == "learned" and not args.no_bare and dev.type == "cpu":
                    fns["bare"] = lambda batch=batch, bare=bare: bare.generate(batch)
                if args.static:
                    fns["static"] = static_peer(model, batch, args.static == "compile")
                t = common.interleaved(fns, args.repeats)
                wall = common.paired_ratio(t["gpt2"]["wall"], t["ours"]["wall"])
                lo, hi = common.spread(t["gpt2"]["wall"], t["ours"]["wall"])
                cpu = common.paired_ratio(t["gpt2"]["cpu"], t["ours"]["cpu"])
                a = batch * L / common.median(t["ours"]["wall"])
                b = batch * L / common.median(t["gpt2"]["wall"])
                bare_ratio = common.paired_ratio(t["gpt2"]["wall"], t["bare"]["wall"]) if "bare" in t else None
                static_ratio = common.paired_ratio(t["gpt2"]["wall"], t["static"]["wall"]) if "static" in t else None
                print(f"{label:<14} {pos:<10} {batch:>5} {a:>11.0f} {b:>11.0f} {wall:>9.2f}× "
                      f"{f'({lo:.2f}–{hi:.2f})':>13} {cpu:>8.2f}×"
                      + (f"   bare loop {bare_ratio:.2f}× GPT-2" if bare_ratio else "")
                      + (f"   static ({args.static}) {static_ratio:.2f}× GPT-2" if static_ratio else ""), flush=True)
                records.append({"shape": shape_name, "n_layer": n_layer, "width": width, "heads": heads,
                                "positions": pos, "batch": batch, "ours_tokens_per_s": a, "gpt2_tokens_per_s": b,
                                "ratio_wall": wall, "ratio_wall_min": lo, "ratio_wall_max": hi, "ratio_cpu": cpu,
                                "bare_ratio_wall": bare_ratio, "static_ratio_wall": static_ratio, "times": t})
                rows.append([label, pos + (" (GPT-2's)" if pos == "learned" else " (our default)"), batch,
                             f"{a:.0f}", f"{b:.0f}", f"**{common.fx(wall)}** ({lo:.2f}–{hi:.2f})", common.fx(cpu),
                             common.fx(bare_ratio), f"≥ {TARGETS[batch]:g}×" if batch in TARGETS else "–"])
                if batch in TARGETS:
                    summary[f"decode {shape_name} {pos} batch {batch} (× GPT-2 generate)"] = common.target(
                        wall, TARGETS[batch])
        params.append(f"{label}: ours {n_ours:,}, GPT-2 {n_hf:,}")
    print("(non-embedding parameters: " + "; ".join(params) + "; GPT-2 ties its output head to wte)")

    md = (f"V = {V}, L = {L}; tokens/s are medians over {args.repeats} alternating repeats; ratio = median of the "
          "paired ratios GPT-2 seconds / our seconds (min–max over the repeats); CPU ratio: the same with this "
          "process's CPU seconds; *bare loop*: a plain eager KV-cache loop of the same shape (learned positions, "
          "`torch.multinomial`, no checks — `BareDecoder` in the script), the floor of eager PyTorch here. "
          f"GPT-2 `generate` runs under `torch.{'inference_mode' if args.peer_inference_mode else 'no_grad'}`.\n\n"
          + common.md_table(["model", "positions", "batch", "ours (tok/s)", "GPT-2 generate (tok/s)",
                             "ours / GPT-2 (wall)", "ours / GPT-2 (CPU)", "bare loop / GPT-2 (wall)", "target"], rows)
          + "\n\nNon-embedding parameters: " + "; ".join(params) + " (GPT-2 ties its output head to the input "
          "embedding; ours has a separate width × V head).")
    common.write_result(args.name, common.result("decode", args, machine, summary, md, rows=records))


if __name__ == "__main__":
    main()
