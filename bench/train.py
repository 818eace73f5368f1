"""Training throughput: tokenloom's trainer against a bare nanoGPT-style
transformer of the same shape, and both as a fraction of this machine's
fp32 matmul peak (model FLOP utilisation, MFU).

    .venv/bin/python bench/train.py [--repeats 3] [--models demo wide] [--threads 0]

Three things run alternately in one process (see ``bench/common.py``):

- **ours**: the product path — ``tokenloom.train.make_batch`` (the raster
  generator's teacher-forcing batch, label dropout, per-step seeding) and
  ``tokenloom.train.train_step`` (forward, cross-entropy, backward, gradient
  clipping, AdamW) on tokenloom's backbone with its default 2-D RoPE, and
  the same with learned positions;
- **bare**: the reference written below — nanoGPT's ``model.py`` reduced to
  its core (token + position embeddings, pre-norm blocks with fused QKV,
  causal SDPA and a 4× GELU MLP, final LayerNorm, an untied head), the same
  AdamW groups, betas, clipping and batch indexing, no framework around it;
- **matmul**: a loop of square fp32 matmuls (``--matmul-n``, default 1024) —
  the machine's achievable fp32 peak *at that moment*, so each repeat's MFU
  is computed against the peak measured next to it.

FLOPs per token (both models): ``6·N + 12·n_layer·d·T`` with ``N`` the
non-embedding parameters (Kaplan et al. 2020; PaLM appendix B). Models:
``demo`` is the demo's backbone (4 layers, width 128, 4 heads, a 4×4 VQ
grid: T = 16, V = 64, batch 64); ``wide`` is 4 layers, width 512, 8 heads,
T = 64 (an 8×8 grid), V = 512, batch 32 (``--models ablation`` adds the
2-layer, width-64 backbone of ``examples/ablation-small.toml``). Target
(issue 10): ours ≥ 0.8× the
bare transformer's throughput for both. Writes ``bench/results/train.json``.
"""

from __future__ import annotations

import argparse

import common
import torch
import torch.nn.functional as F
from torch import nn

import tokenloom
from tokenloom.config import ModelConfig, TrainConfig
from tokenloom.model import build_model
from tokenloom.train import batch_indices, configure_optimizer, lr_at, make_batch, train_step

MODELS = {
    # name: (n_layer, d_model, n_head, tokenizer kwargs, batch, steps per repeat)
    "demo": (4, 128, 4, {"name": "vq", "codebook_size": 64, "downsample": 4, "image_shape": (3, 16, 16)}, 64, 10),
    "wide": (4, 512, 8, {"name": "pixel", "bits": 3, "image_shape": (3, 8, 8)}, 32, 2),
    # examples/ablation-small.toml's backbone (not run by default)
    "ablation": (2, 64, 4, {"name": "pixel", "bits": 1, "pool": 2, "image_shape": (3, 16, 16)}, 32, 20),
}
DEFAULT_MODELS = ["demo", "wide"]
TARGET = 0.8


# ---------------------------------------------------------------------------
# The bare reference: nanoGPT's model.py, reduced to its core
# ---------------------------------------------------------------------------


class BareBlock(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class BareGPT(nn.Module):
    def __init__(self, n_layer: int, d: int, n_head: int, vocab: int, block: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.h = nn.ModuleList(BareBlock(d, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.n_layer, self.d = n_layer, d

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))

    def flops_per_token(self, T: int) -> int:
        n = sum(p.numel() for p in self.parameters()) - self.wte.weight.numel() - self.wpe.weight.numel()
        return 6 * n + 12 * self.n_layer * self.d * T


# ---------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(MODELS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps-scale", type=float, default=1.0, help="multiply the steps per repeat")
    ap.add_argument("--matmul-n", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--name", default="train")
    args = ap.parse_args()
    common.setup_threads(args.threads)
    machine = common.machine_info()
    print(f"training benchmark\n  {common.describe_machine(machine)}")

    n = args.matmul_n
    a, b = torch.randn(n, n), torch.randn(n, n)

    rows, summary, records = [], {}, []
    for name in args.models:
        n_layer, d, n_head, tok_kw, B, steps = MODELS[name]
        steps = max(1, round(steps * args.steps_scale))
        tok_kw = dict(tok_kw)
        tok = tokenloom.create("tokenizer", tok_kw.pop("name"), **tok_kw)
        gen = tokenloom.create("generator", "raster", tokenizer=tok)
        spec = gen.model_spec()
        T, V = spec.seq_len, tok.vocab_size
        g = torch.Generator().manual_seed(0)
        codes = torch.randint(0, V, (4096, T), generator=g)
        labels = torch.randint(0, 10, (4096,), generator=g)
        cfg = TrainConfig(steps=10_000, batch_size=B, lr=1e-3, warmup=10)

        runners, fpt = {}, {}
        for pos in ("rope2d", "learned"):
            model = build_model(spec, ModelConfig(n_layer=n_layer, d_model=d, n_head=n_head, pos=pos),
                                n_classes=10).train()
            opt = configure_optimizer(model, cfg)
            fpt[f"ours-{pos}"] = model.flops_per_token(T)
            state = {"step": 0}

            def ours(model=model, opt=opt, state=state, steps=steps, codes=codes, labels=labels, B=B,
                     gen=gen, cfg=cfg):
                for _ in range(steps):
                    s = state["step"]
                    idx = batch_indices(codes.shape[0], B, seed=0, step=s)
                    batch = make_batch(gen, codes, labels, idx, seed=0, step=s, n_steps=cfg.steps,
                                       label_dropout=cfg.label_dropout, null_class=10)
                    train_step(model, opt, batch, lr=lr_at(s, cfg), grad_clip=cfg.grad_clip)
                    state["step"] = s + 1
            runners[f"ours-{pos}"] = ours

        torch.manual_seed(0)
        bare = BareGPT(n_layer, d, n_head, V, T).train()
        bare_opt = configure_optimizer(bare, cfg)  # nanoGPT's groups: decay on matrices only
        fpt["bare"] = bare.flops_per_token(T)

        # Bound explicitly: the runners of this model are timed before the loop moves on.
        def bare_steps(bare=bare, bare_opt=bare_opt, steps=steps, codes=codes, B=B, cfg=cfg):
            for s in range(steps):
                idx = batch_indices(codes.shape[0], B, seed=1, step=s)
                x = codes[idx]
                inputs = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1)
                for group in bare_opt.param_groups:
                    group["lr"] = lr_at(s, cfg)
                loss = bare(inputs, x)
                bare_opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(bare.parameters(), 1.0)
                bare_opt.step()
        runners["bare"] = bare_steps

        n_mm = max(4, round(steps * B * T * fpt["bare"] / (2 * n**3) / 4))  # ~1/4 of a bare repeat's FLOPs

        def matmul(n_mm=n_mm):
            for _ in range(n_mm):
                torch.mm(a, b)
        runners["matmul"] = matmul

        t = common.interleaved(runners, args.repeats)
        tokens = steps * B * T
        peak = [n_mm * 2 * n**3 / w for w in t["matmul"]["wall"]]  # FLOP/s next to each repeat
        rec = {"model": name, "n_layer": n_layer, "d_model": d, "n_head": n_head, "seq_len": T, "vocab": V,
               "batch": B, "steps_per_repeat": steps, "matmul_peak_flops": common.median(peak), "times": t}
        for who in ("ours-rope2d", "ours-learned", "bare"):
            w = t[who]["wall"]
            mfu = common.median([tokens * fpt[who] / wi / pk for wi, pk in zip(w, peak)])
            rec[who] = {"tokens_per_s": tokens / common.median(w), "mfu": mfu, "flops_per_token": fpt[who]}
        for who in ("ours-rope2d", "ours-learned"):
            # throughput ratio: bare seconds / our seconds for the same tokens
            rec[who]["vs_bare"] = common.paired_ratio(t["bare"]["wall"], t[who]["wall"])
            rec[who]["vs_bare_minmax"] = common.spread(t["bare"]["wall"], t[who]["wall"])
            rec[who]["vs_bare_cpu"] = common.paired_ratio(t["bare"]["cpu"], t[who]["cpu"])
        records.append(rec)
        print(f"{name}: {n_layer} layers × width {d}, {n_head} heads, T = {T}, V = {V}, batch {B}; "
              f"matmul peak {rec['matmul_peak_flops'] / 1e9:.1f} GFLOP/s (n = {n})")
        for who in ("ours-rope2d", "ours-learned", "bare"):
            r = rec[who]
            extra = (f"  vs bare {r['vs_bare']:.2f}× ({r['vs_bare_minmax'][0]:.2f}–{r['vs_bare_minmax'][1]:.2f}), "
                     f"CPU {r['vs_bare_cpu']:.2f}×") if who != "bare" else ""
            print(f"  {who:<13} {r['tokens_per_s']:>9.0f} tok/s  MFU {r['mfu'] * 100:5.1f} %{extra}", flush=True)
            rows.append([f"{name} ({d} wide)", who, f"{r['tokens_per_s']:.0f}", f"{r['mfu'] * 100:.1f} %",
                         f"**{common.fx(r['vs_bare'])}** ({r['vs_bare_minmax'][0]:.2f}–{r['vs_bare_minmax'][1]:.2f})"
                         if who != "bare" else "1", common.fx(r["vs_bare_cpu"]) if who != "bare" else "1",
                         f"≥ {TARGET}×" if who != "bare" else "–"])
        for who in ("ours-rope2d", "ours-learned"):
            summary[f"train {name} (width {d}) {who} (× bare)"] = common.target(rec[who]["vs_bare"], TARGET)
        summary[f"train {name} MFU ours-rope2d"] = round(rec["ours-rope2d"]["mfu"], 4)
        summary[f"train {name} MFU bare"] = round(rec["bare"]["mfu"], 4)

    shapes = "; ".join(f"**{r['model']}**: {r['n_layer']} layers × width {r['d_model']}, {r['n_head']} heads, "
                       f"T = {r['seq_len']}, V = {r['vocab']}, batch {r['batch']}, fp32 matmul peak "
                       f"{r['matmul_peak_flops'] / 1e9:.0f} GFLOP/s" for r in records)
    md = (f"{shapes}. MFU = model FLOPs (6·N + 12·n_layer·d·T per token) per second over the fp32 matmul peak "
          f"measured next to each repeat ({n}×{n} `torch.mm`); ratio = median over {args.repeats} alternating "
          "repeats of bare seconds / our seconds (min–max).\n\n"
          + common.md_table(["model", "trainer", "tokens/s", "MFU", "× bare (wall)", "× bare (CPU)", "target"], rows))
    common.write_result(args.name, common.result("train", args, machine, summary, md, rows=records))


if __name__ == "__main__":
    main()
