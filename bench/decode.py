"""KV-cached sampling throughput: tokenloom's backbone against Hugging Face
``transformers`` GPT-2 ``generate`` at the same depth, width, heads,
vocabulary and length.

    .venv/bin/pip install -e '.[bench]'      # transformers: benchmark only
    .venv/bin/python bench/decode.py [--layers 4 --width 256 --heads 4 --grid 16 --bits 3 --repeats 3]

Ours is the product path: the ``raster`` generator decoding a ``pixel``
tokenizer's grid (V = 2^(3·bits), L = grid²) through the instrumented
backbone with its static KV cache, plain categorical sampling (an empty
sampler chain, counter-based RNG). GPT-2 is ``GPT2LMHeadModel.generate`` with
``do_sample=True, top_k=0`` from a one-token prompt for exactly L new tokens
(its default dynamic cache). Both models are randomly initialised (speed
does not depend on the weights), run in the same process, alternately, on
the same device; the best of ``--repeats`` runs is kept. Printed: tokens/s
of each and ours/GPT-2 (> 1: we are faster), at batch 1 and 32, with
learned positions (GPT-2's own) and with 2-D RoPE (our default). A benchmark,
not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import os
import time

# both libraries share one OpenMP runtime: on a shared CPU, threads that spin
# while waiting slow small kernels ~100x (see tokenloom/__init__.py)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import tokenloom
import torch
from tokenloom.config import ModelConfig
from tokenloom.model import InstrumentedModel, build_model
from tokenloom.rng import RowRNG
from tokenloom.sampling import SamplerChain


def ours(gen, model: InstrumentedModel, batch: int, seed: int) -> float:
    cond = torch.zeros(batch, dtype=torch.long, device=model.device)
    t0 = time.perf_counter()
    codes = gen.generate(model, SamplerChain(), cond, rng=RowRNG(seed, torch.arange(batch)))
    if codes.is_cuda:
        torch.cuda.synchronize()
    return codes.numel() / (time.perf_counter() - t0)


def gpt2(model, batch: int, length: int, device) -> float:
    prompt = torch.zeros(batch, 1, dtype=torch.long, device=device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=0,
                             max_new_tokens=length, min_new_tokens=length, pad_token_id=0, eos_token_id=None)
    if out.is_cuda:
        torch.cuda.synchronize()
    assert out.shape == (batch, length + 1)
    return batch * length / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--grid", type=int, default=16, help="L = grid²")
    ap.add_argument("--bits", type=int, default=3, help="V = 2^(3·bits)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise SystemExit("bench/decode.py needs transformers: .venv/bin/pip install -e '.[bench]'") from None
    hf_logging.set_verbosity_error()
    dev = torch.device(args.device)

    tok = tokenloom.create("tokenizer", "pixel", bits=args.bits, image_shape=(3, args.grid, args.grid))
    gen = tokenloom.create("generator", "raster", tokenizer=tok)
    V, L = tok.vocab_size, tok.layout.length
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=L + 1, n_embd=args.width, n_layer=args.layers,
                                    n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                    bos_token_id=0, eos_token_id=None)).to(dev).eval()
    print(f"decode benchmark: {args.layers} layers, width {args.width}, {args.heads} heads, V = {V}, L = {L}, "
          f"device {dev}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'positions':<10} {'batch':>5} {'ours tok/s':>12} {'gpt2 tok/s':>12} {'ratio':>7}")
    for pos in ("learned", "rope2d"):
        cfg = ModelConfig(n_layer=args.layers, d_model=args.width, n_head=args.heads, pos=pos)
        model = InstrumentedModel(build_model(gen.model_spec(), cfg, n_classes=1).to(dev).eval())
        n_ours = model.model.n_params(non_embedding=True)
        n_hf = sum(p.numel() for n, p in hf.named_parameters() if "wte" not in n and "wpe" not in n)
        for batch in args.batches:
            ours(gen, model, batch, 0)  # warm-up
            gpt2(hf, batch, L, dev)
            a = max(ours(gen, model, batch, r) for r in range(args.repeats))
            b = max(gpt2(hf, batch, L, dev) for _ in range(args.repeats))
            print(f"{pos:<10} {batch:>5} {a:>12.0f} {b:>12.0f} {a / b:>6.2f}×")
    print(f"(non-embedding parameters: ours {n_ours:,}, GPT-2 {n_hf:,}; GPT-2 ties its output head to wte)")


if __name__ == "__main__":
    main()
