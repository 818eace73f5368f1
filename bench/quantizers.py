"""Tokenizers: the quantisation step of ``vq``, ``rq``, ``fsq`` and ``lfq``
against ``vector-quantize-pytorch``'s corresponding layer on the same
latents (our overhead over the raw quantizer), and encode + decode images/s.

    .venv/bin/python bench/quantizers.py [--repeats 5] [--batch 64] [--size 32]

**Quantisation step.** Every tokenizer at its default config on
``size``-px images; the latents are ``batch`` encoder outputs
``z (B, D, h, w)`` (the tokenizer's own, untrained encoder on random
images). Ours is ``tokenizer.quantize(z)`` — the layout conversion, the
quantiser, the code ids in the layout's flat order and the
:class:`~tokenloom.autoencoder.QuantOut`; the peer is the raw layer on the
same ``z`` through its own image path (``accept_image_fmap`` / FSQ's and
LFQ's ``b d h w`` input), except ``rq`` whose image path fails with a shared
codebook in 1.32: it gets ``(B, h·w, D)`` sequences, permuted beforehand:

- ``vq``: ``VectorQuantize(use_cosine_sim=True)`` holding *our* codebook
  (the ids are checked equal); ours is :class:`tokenloom.quantize.VectorQuantizer`
  (LlamaGen's, see its docstring for why it is not the library's);
- ``rq``, ``fsq``, ``lfq``: the very ``ResidualVQ`` / ``FSQ`` / ``LFQ``
  instance the tokenizer wraps.

Two modes: **encode** (eval mode, no gradients: what ``encode`` runs) and
**train** (training mode, forward + backward of the latent's gradient
through the straight-through estimator and the quantiser's own losses). In
train mode ``vq``'s peer is not the same algorithm (the library's cosine
codebook learns by EMA, ours by gradient), so that row is marked.

**Encode + decode.** ``decode(encode(images))`` images/s for ``batch``
images. Peer: the same networks run on the whole batch at once — our
``encode``/``decode`` run them in fixed chunks of
``AutoencoderTokenizer.CHUNK`` images (the last padded) so that image i's
codes do not depend on its batch neighbours (convolution blocking differs
with the batch size), and this column is the price of that guarantee.

Ratios are medians of paired alternating repeats (see ``bench/common.py``).
Target (issue 10): quantisation step ≤ 1.2× the raw layer. Writes
``bench/results/quantizers.json``.
"""

from __future__ import annotations

import argparse
import time
import warnings

import common
import torch

import tokenloom
from tokenloom.testing import random_images

NAMES = ("vq", "rq", "fsq", "lfq")
TARGET = 1.2


def calibrate(fn, seconds: float = 0.15) -> int:
    """How many calls of ``fn`` take about ``seconds``."""
    fn()
    t0 = time.perf_counter()
    fn()
    dt = max(time.perf_counter() - t0, 1e-5)
    return max(1, min(2000, round(seconds / dt)))


def looped(fn, k: int):
    def run():
        for _ in range(k):
            fn()
    return run


def seq(z: torch.Tensor) -> torch.Tensor:
    B, D, h, w = z.shape
    return z.permute(0, 2, 3, 1).reshape(B, h * w, D)


#: Layers whose image path takes ``z (B, D, h, w)`` as it is; ``rq``'s fails with a shared codebook (see rq.py)
FMAP = {"vq", "fsq", "lfq"}


def peer_layer(name: str, tok):
    """The raw layer (its image path for :data:`FMAP`, else ``(B, N, D)`` sequences)."""
    if name == "vq":
        from vector_quantize_pytorch import VectorQuantize

        q = VectorQuantize(dim=tok.config.code_dim, codebook_size=tok.config.codebook_size, use_cosine_sim=True,
                           commitment_weight=tok.config.beta, kmeans_init=False, threshold_ema_dead_code=0,
                           accept_image_fmap=True)
        with torch.no_grad():
            q._codebook.embed.copy_(tok.quantizer.codebook()[None])
        return q
    return {"rq": lambda: tok.rq, "fsq": lambda: tok.fsq, "lfq": lambda: tok.lfq}[name]()


def peer_loss(name: str, out) -> torch.Tensor:
    zq = out[0]
    loss = (zq * zq).mean()  # a downstream loss through the straight-through output
    if name in ("vq", "rq", "lfq"):
        aux = out[2]
        loss = loss + (aux.sum() if aux.dim() else aux)
    return loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--names", nargs="+", default=list(NAMES), choices=list(NAMES))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--name", default="quantizers")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    common.setup_threads(args.threads)
    machine = common.machine_info()
    print(f"tokenizer benchmark: batch {args.batch}, {args.size} px\n  {common.describe_machine(machine)}")
    shape = (3, args.size, args.size)
    images = random_images(args.batch, shape, seed=0)

    q_rows, c_rows, summary, records = [], [], {}, []
    for name in args.names:
        tok = tokenloom.create("tokenizer", name, image_shape=shape).eval()
        with torch.no_grad():
            z = tok.encoder(images)  # (B, D, h, w)
        peer = peer_layer(name, tok).eval()
        zs = z if name in FMAP else seq(z).contiguous()  # the peer's input: the same latents
        rec = {"tokenizer": name, "latents": list(z.shape)}

        # -- encode mode --------------------------------------------------
        with torch.no_grad():
            ours_ids = tok.quantize(z).codes
            pout = peer(zs)
            if name == "vq":  # same codebook, same nearest codes
                rec["ids_equal"] = bool(torch.equal(ours_ids.reshape(-1), pout[1].reshape(-1).long()))

        # Each closure binds this iteration's objects explicitly (all are timed within the iteration).
        def ours_eval(tok=tok, z=z):
            with torch.no_grad():
                tok.quantize(z)

        def peer_eval(peer=peer, zs=zs):
            with torch.no_grad():
                peer(zs)

        k = calibrate(peer_eval)
        t_eval = common.interleaved({"ours": looped(ours_eval, k), "peer": looped(peer_eval, k)}, args.repeats)

        # -- train mode: forward + backward --------------------------------
        tok.train()
        peer.train()
        zt = z.detach().clone().requires_grad_(True)
        zst = zs.detach().clone().requires_grad_(True)

        def ours_train(tok=tok, zt=zt):
            q = tok.quantize(zt)
            loss = (q.latent * q.latent).mean() + q.loss
            loss.backward()
            zt.grad = None

        def peer_train(name=name, peer=peer, zst=zst):
            loss = peer_loss(name, peer(zst))
            loss.backward()
            zst.grad = None

        kt = calibrate(peer_train)
        t_train = common.interleaved({"ours": looped(ours_train, kt), "peer": looped(peer_train, kt)}, args.repeats)
        tok.eval()
        peer.eval()

        for mode, t, kk in (("encode", t_eval, k), ("train", t_train, kt)):
            ratio = common.paired_ratio(t["ours"]["wall"], t["peer"]["wall"])  # our time / peer time
            lo, hi = common.spread(t["ours"]["wall"], t["peer"]["wall"])
            cpu = common.paired_ratio(t["ours"]["cpu"], t["peer"]["cpu"])
            us_ours = common.median(t["ours"]["wall"]) / kk * 1e6
            us_peer = common.median(t["peer"]["wall"]) / kk * 1e6
            rec[mode] = {"ours_us": us_ours, "peer_us": us_peer, "ratio": ratio, "ratio_min": lo, "ratio_max": hi,
                         "ratio_cpu": cpu, "calls_per_repeat": kk, "times": t}
            different = mode == "train" and name == "vq"
            print(f"{name:<4} {mode:<6} ours {us_ours:8.0f} µs  raw layer {us_peer:8.0f} µs  ours/raw {ratio:5.2f}× "
                  f"({lo:.2f}–{hi:.2f}), CPU {cpu:.2f}×" + ("  [peer: EMA codebook]" if different else ""),
                  flush=True)
            q_rows.append([name, mode, f"{tuple(z.shape)}", f"{us_ours:.0f}", f"{us_peer:.0f}",
                           f"**{common.fx(ratio)}** ({lo:.2f}–{hi:.2f})" + (" †" if different else ""),
                           common.fx(cpu), "–" if different else f"≤ {TARGET}×"])
            if not different:
                summary[f"quantize {name} {mode} (× raw layer)"] = common.target(ratio, TARGET, at_most=True)

        # -- encode + decode images/s --------------------------------------
        def ours_codec(tok=tok):
            with torch.no_grad():
                tok.decode(tok.encode(images))

        def batched_codec(tok=tok):
            with torch.no_grad():
                codes = tok.quantize(tok.encoder(images)).codes
                tok.decoder(tok.dequantize(codes)).clamp(-1.0, 1.0)

        t_codec = common.interleaved({"ours": ours_codec, "batched": batched_codec}, max(3, args.repeats // 2))
        ips = args.batch / common.median(t_codec["ours"]["wall"])
        ips_b = args.batch / common.median(t_codec["batched"]["wall"])
        ratio = common.paired_ratio(t_codec["batched"]["wall"], t_codec["ours"]["wall"])
        rec["codec"] = {"ours_images_per_s": ips, "batched_images_per_s": ips_b, "ratio": ratio, "times": t_codec}
        print(f"{name:<4} encode+decode {ips:7.0f} images/s (chunks of 16), batched nets {ips_b:7.0f} images/s, "
              f"ours/batched throughput {ratio:.2f}×", flush=True)
        c_rows.append([name, f"{tok.layout.length}", f"{ips:.0f}", f"{ips_b:.0f}", common.fx(ratio)])
        summary[f"encode+decode {name} images/s"] = round(ips, 1)
        records.append(rec)

    md = (f"Default configs at {args.size} px, {args.batch} images; medians of {args.repeats} alternating repeats. "
          "Ratio = our seconds / raw layer seconds (≤ 1.2× is the target; min–max over repeats).\n\n"
          + common.md_table(["tokenizer", "mode", "latents z", "ours (µs)", "raw layer (µs)", "ours / raw (wall)",
                             "ours / raw (CPU)", "target"], q_rows)
          + "\n\n† `vq` in training mode: the library's cosine-similarity codebook learns by EMA (it refuses a "
            "cosine codebook learned by gradient, which is LlamaGen's and ours), so this is not the same algorithm "
            "and carries no target.\n\n"
          + f"Encode + decode of {args.batch} random {args.size}-px images (untrained networks; speed does not "
            "depend on the weights). *Batched nets*: the same encoder, quantiser and decoder on the whole batch at "
            "once; our `encode`/`decode` run them in fixed chunks of 16 images, the last one padded, on purpose "
            "(image i's codes must not depend on its batch neighbours, bit for bit).\n\n"
          + common.md_table(["tokenizer", "tokens/image", "encode+decode (images/s)", "batched nets (images/s)",
                             "ours / batched (throughput)"], c_rows))
    common.write_result(args.name, common.result("quantizers", args, machine, summary, md, rows=records))


if __name__ == "__main__":
    main()
