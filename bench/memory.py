"""Peak memory of training on a streamed folder, and the loader's throughput (issue 15).

    .venv/bin/python bench/memory.py [--sizes 20000 80000] [--cache /tmp/tokenloom-bench-memory]
                                     [--fit-steps 10] [--train-steps 20] [--workers 2] [--no-docs]

1. Generates, once, a folder of 64-px shapes scenes as PNG files (``<cache>/pool``, the ImageNet
   ``<class>/<image>.png`` layout, the class the shape class) and, for every size N, a folder of
   its first N images (hard links) — outside the repository.
2. For every N, two fresh processes run the product path on ``[data] name = "folder"``
   (:func:`tokenloom.pipeline.prepare_data`, :func:`~tokenloom.pipeline.fit_tokenizer`,
   :func:`~tokenloom.pipeline.encode_all`, :func:`~tokenloom.pipeline.train_or_load`):
   **fit** — a VQ tokenizer fitted for ``--fit-steps`` steps on the streamed training split;
   **train** — the training split encoded once into the code store, then a backbone trained
   for ``--train-steps`` steps from the memory-mapped codes. Each reports its peak resident set
   (``ru_maxrss``) and the largest of its DataLoader workers'. Flat figures across N are the
   point; beside them, the memory the old in-memory loader needed for the images alone.
3. The loader's throughput: the streamed set's batches (:meth:`LazyImages.batches`) against a
   bare ``torch.utils.data.DataLoader`` over the same files (PIL decode, to a float tensor), the
   same worker count and batch size, alternated, the median of the repeats.

Writes ``bench/results/memory.json`` and the "Streamed data: peak memory" section of
docs/benchmarks.md (the rest of the file is kept).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
BEGIN, END = "<!-- bench:memory:start -->", "<!-- bench:memory:end -->"
HEADING = "## Streamed data: peak memory and loader throughput — `bench/memory.py`"


# ---------------------------------------------------------------------------
# the image folders
# ---------------------------------------------------------------------------


def _render(job: tuple[str, int, int]) -> int:
    import numpy as np
    from PIL import Image

    from tokenloom.blocks.shapes import SHAPE_CLASSES, render_shapes, shapes_attributes

    pool, start, stop = job
    for i, a in zip(range(start, stop), shapes_attributes(0, range(start, stop))):
        x = render_shapes(a, SIZE)
        arr = ((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        Image.fromarray(arr).save(Path(pool) / SHAPE_CLASSES[a["label"]] / f"{i:06d}.png")
    return stop - start


def make_pool(cache: Path, n: int) -> Path:
    """``cache/pool`` with at least ``n`` images (made once; a count file marks what is done)."""
    from multiprocessing import get_context

    from tokenloom.blocks.shapes import SHAPE_CLASSES

    pool = cache / "pool"
    for c in SHAPE_CLASSES:
        (pool / c).mkdir(parents=True, exist_ok=True)
    done_file = pool / "count.txt"
    have = int(done_file.read_text()) if done_file.is_file() else 0
    if have >= n:
        return pool
    t0 = time.perf_counter()
    chunk = 2000
    jobs = [(str(pool), a, min(a + chunk, n)) for a in range(have, n, chunk)]
    with get_context("fork").Pool(2) as p:
        for k, _ in enumerate(p.imap(_render, jobs)):
            done_file.write_text(str(jobs[k][2]))  # in order: everything below is written
    print(f"[memory] generated {n - have} images in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return pool


def make_folder(cache: Path, pool: Path, n: int) -> Path:
    """``cache/folder-<n>``: the first ``n`` images of the pool, hard-linked."""
    folder = cache / f"folder-{n}"
    mark = folder / ".complete"
    if mark.is_file():
        return folder
    for cls in sorted(p.name for p in pool.iterdir() if p.is_dir()):
        (folder / cls).mkdir(parents=True, exist_ok=True)
        for f in (pool / cls).iterdir():
            if int(f.stem) < n and not (folder / cls / f.name).exists():
                try:
                    os.link(f, folder / cls / f.name)
                except OSError:
                    (folder / cls / f.name).write_bytes(f.read_bytes())
    mark.write_text(str(n))
    return folder


# ---------------------------------------------------------------------------
# one measured phase (a fresh process)
# ---------------------------------------------------------------------------


def run_config(folder: Path, n: int, args: argparse.Namespace, kind: str = "fit") -> dict:
    """The run config of a phase: ``fit`` fits a VQ tokenizer; ``train`` uses the training-free
    ``pixel`` tokenizer (2 bits per channel, 8×8 pooling: 8×8 tokens), so that encoding every
    image — a PNG decode each, the part that scales with N — fits in the time box on 2 shared cores."""
    tokenizer = {"name": "vq", "codebook_size": 256, "downsample": 8, "steps": args.fit_steps, "batch_size": 32}
    if kind == "train":
        tokenizer = {"name": "pixel", "bits": 2, "pool": 8}
    return {
        "seed": 0,
        "device": "cpu",
        "data": {"name": "folder", "path": str(folder), "size": SIZE, "n": n, "n_holdout": 64,
                 "workers": args.workers},
        "tokenizer": tokenizer,
        "generator": {"name": "raster"},
        "model": {"n_layer": 2, "d_model": 128, "n_head": 4},
        "train": {"steps": args.train_steps, "batch_size": 32, "warmup": 2},
        "metrics": {"names": [], "n_samples": 8},
    }


def _peaks() -> dict:
    kb = 1024 if sys.platform != "darwin" else 1
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kb / 2**20,
            "peak_worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * kb / 2**20}


def phase(kind: str, folder: Path, n: int, out: Path, args: argparse.Namespace) -> dict:
    """Run in a fresh process (``--phase``): ``fit`` or ``train`` (see the module docstring)."""
    import torch

    from tokenloom.contract.config import parse_config
    from tokenloom.pipeline import encode_all, fit_tokenizer, prepare_data, train_or_load
    from tokenloom.running.pipeline_check import preflight

    torch.set_num_threads(args.threads)
    base = _peaks()["peak_rss_mb"]
    cfg = parse_config(run_config(folder, n, args, kind))
    parts = preflight(cfg)
    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cpu")
    t0 = time.perf_counter()
    train_set, holdout, data_id = prepare_data(cfg, None)
    t_open = time.perf_counter() - t0
    t0 = time.perf_counter()
    tok, tok_hash, reused = fit_tokenizer(cfg, train_set.images, cache, device=dev, progress=False,
                                          data_id=data_id, tokenizer=parts.tokenizer)
    t_fit = time.perf_counter() - t0
    rec = {"phase": kind, "n": n, "train_images": len(train_set), "import_rss_mb": base,
           "open_seconds": t_open, "fit_seconds": t_fit, "tokenizer_reused": reused}
    if kind == "train":
        t0 = time.perf_counter()
        codes = encode_all(tok, tok_hash, {"train": train_set, "holdout": holdout}, cache,
                           key_extra={"data": data_id, "seed": cfg.seed}, device=dev)
        rec["encode_seconds"] = time.perf_counter() - t0
        rec["codes"] = repr(codes["train"])
        t0 = time.perf_counter()
        _, record, _ = train_or_load(cfg, parts.generator, codes["train"], train_set.labels,
                                     int(train_set.n_classes), tok_hash, cache, device=dev, progress=False,
                                     data_id=data_id)
        rec["train_seconds"] = time.perf_counter() - t0
        rec["final_loss"] = record["final_loss"]
    return {**rec, **_peaks()}


def loader_throughput(folder: Path, args: argparse.Namespace) -> dict:
    """Images/s of the streamed set's batches and of a bare DataLoader over the same files."""
    import numpy as np
    import torch
    from PIL import Image

    from tokenloom.config import DataConfig
    from tokenloom.data import open_dataset

    torch.set_num_threads(args.threads)
    st = open_dataset(DataConfig(name="folder", path=str(folder), size=SIZE, n=10**9, n_holdout=0,
                                 workers=args.workers), split="train")
    images = st.images
    files = [str(images.source.root / images.source.name(i)) for i in range(min(args.loader_images, len(images)))]

    class Bare(torch.utils.data.Dataset):
        def __len__(self):
            return len(files)

        def __getitem__(self, i):
            with Image.open(files[i]) as im:
                arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
            return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1

    bs = 64
    chunks = [list(range(a, min(a + bs, len(files)))) for a in range(0, len(files), bs)]

    def ours() -> float:
        t = time.perf_counter()
        k = sum(x.shape[0] for x in images.batches(chunks, workers=args.workers))
        return k / (time.perf_counter() - t)

    def bare() -> float:
        t = time.perf_counter()
        loader = torch.utils.data.DataLoader(Bare(), batch_size=bs, num_workers=args.workers,
                                             prefetch_factor=2 if args.workers else None)
        k = sum(x.shape[0] for x in loader)
        return k / (time.perf_counter() - t)

    got: dict[str, list[float]] = {"ours": [], "bare": []}
    for _ in range(args.repeats):
        got["ours"].append(ours())
        got["bare"].append(bare())
    med = {k: statistics.median(v) for k, v in got.items()}
    return {"images": len(files), "batch_size": bs, "workers": args.workers, "repeats": args.repeats,
            "ours_images_per_s": med["ours"], "bare_images_per_s": med["bare"],
            "ratio": med["ours"] / med["bare"], "all": got}


def child(kind: str, folder: Path, n: int, out: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--phase", kind, "--folder", str(folder), "--n", str(n), "--out", str(out),
           "--fit-steps", str(args.fit_steps), "--train-steps", str(args.train_steps),
           "--workers", str(args.workers), "--threads", str(args.threads), "--repeats", str(args.repeats),
           "--loader-images", str(args.loader_images)]
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise SystemExit(f"[memory] phase {kind} n={n} failed:\n{res.stdout}\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        BEGIN,
        (f"`bench/memory.py` ({result['date']}, {s['machine']}, {s['cpus']} CPU cores shared with other jobs: "
        f"times are noisy, memory is not). Settings: 64-px shapes scenes as "
        f"PNG in a `folder` data set (`<class>/<image>.png`), `[data] workers = {s['workers']}`, "
        f"torch threads {s['threads']}; **fit**: VQ tokenizer (256 codes, downsample 8: 8×8 tokens), "
        f"{s['fit_steps']} steps of batch 32 on the streamed training split; **train**: the training split "
        f"encoded once by the `pixel` tokenizer (2 bits, 8×8 pooling: 8×8 tokens; a PNG decode per image, in "
        f"the workers) into the code store (uint16 shards, memory-mapped), then a 2-layer width-128 raster "
        f"backbone trained {s['train_steps']} steps of batch 32 from it. Peak RSS is `ru_maxrss` of the "
        "process (a fresh one per phase); workers: the largest DataLoader worker's (forked: it counts the pages "
        "it shares with the parent). `OMP_WAIT_POLICY=PASSIVE`."),
        "",
        ("| images | phase | peak RSS (MB) | after imports (MB) | peak worker RSS (MB) | seconds | "
        "images in memory before (MB) |"),
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["phases"]:
        secs = r["fit_seconds"] + r.get("encode_seconds", 0.0) + r.get("train_seconds", 0.0) + r["open_seconds"]
        detail = (f"{secs:.0f} (open {r['open_seconds']:.0f}, fit {r['fit_seconds']:.0f})" if r["phase"] == "fit"
                  else f"{secs:.0f} (open {r['open_seconds']:.0f}, encode {r['encode_seconds']:.0f}, "
                       f"train {r['train_seconds']:.0f})")
        old = r["train_images"] * 3 * SIZE * SIZE * 4 / 2**20
        lines.append(f"| {r['n']} | {r['phase']} | {r['peak_rss_mb']:.0f} | {r['import_rss_mb']:.0f} | "
                     f"{r['peak_worker_rss_mb']:.0f} | {detail} | {old:.0f} |")
    fits = [r["peak_rss_mb"] for r in result["phases"] if r["phase"] == "fit"]
    trains = [r["peak_rss_mb"] for r in result["phases"] if r["phase"] == "train"]
    lo, hi = min(result["sizes"]), max(result["sizes"])
    lines += [
        "",
        (f"From {lo} to {hi} images ({hi // lo}×) peak RSS changes by {fits[-1] - fits[0]:+.0f} MB when fitting "
        f"and {trains[-1] - trains[0]:+.0f} MB when training: flat (the file names, labels and code store "
        "are the only per-image state: a few bytes each). The last column is what the old in-memory "
        "`folder` loader held for the float32 images alone."),
        "",
    ]
    lt = result["loader"]
    lines += [
        (f"Loader throughput ({lt['images']} images of the {lo}-image folder, batch {lt['batch_size']}, "
        f"{lt['workers']} workers, median of {lt['repeats']} alternated repeats): streamed set "
        f"{lt['ours_images_per_s']:.0f} images/s, a bare `DataLoader` over the same files (PIL decode to a "
        f"float tensor, no checks) {lt['bare_images_per_s']:.0f} images/s: **{lt['ratio']:.2f}×**."),
        END,
    ]
    return "\n".join(lines)


def write_docs(text: str) -> None:
    """Replace the generated part between the markers of docs/benchmarks.md; the first time, add
    the section (heading and markers) before "Targets: met, missed", keeping the rest."""
    path = ROOT / "docs" / "benchmarks.md"
    doc = path.read_text() if path.is_file() else "# Benchmarks\n"
    if BEGIN in doc and END in doc:
        a, b = doc.index(BEGIN), doc.index(END) + len(END)
        doc = doc[:a] + text + doc[b:]
    else:
        section = f"{HEADING}\n\n{text}\n\n"
        anchor = doc.find("## Targets: met, missed")
        doc = doc[:anchor] + section + doc[anchor:] if anchor >= 0 else doc.rstrip("\n") + "\n\n" + section
    path.write_text(doc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[20000, 80000])
    ap.add_argument("--cache", type=Path, default=Path("/tmp/tokenloom-bench-memory"))
    ap.add_argument("--fit-steps", type=int, default=10)
    ap.add_argument("--train-steps", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--loader-images", type=int, default=2048)
    ap.add_argument("--no-docs", action="store_true")
    ap.add_argument("--phase", choices=["fit", "train", "loader"], help=argparse.SUPPRESS)
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        rec = loader_throughput(args.folder, args) if args.phase == "loader" else \
            phase(args.phase, args.folder, args.n, args.out, args)
        print(json.dumps(rec))
        return
    sizes = sorted(args.sizes)
    pool = make_pool(args.cache, max(sizes))
    phases = []
    for n in sizes:
        folder = make_folder(args.cache, pool, n)
        out = args.cache / f"run-{n}"
        if out.exists():
            import shutil

            shutil.rmtree(out)  # measure a cold fit and encode every time
        for kind in ("fit", "train"):
            rec = child(kind, folder, n, out, args)
            print(f"[memory] {n} images, {kind}: peak RSS {rec['peak_rss_mb']:.0f} MB", file=sys.stderr)
            phases.append(rec)
    loader = child("loader", make_folder(args.cache, pool, sizes[0]), sizes[0], args.cache, args)
    result = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "sizes": sizes,
        "settings": {"fit_steps": args.fit_steps, "train_steps": args.train_steps, "workers": args.workers,
                     "threads": args.threads, "cpus": os.cpu_count(), "machine": platform.machine(),
                     "python": platform.python_version()},
        "phases": phases,
        "loader": loader,
    }
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "memory.json").write_text(json.dumps(result, indent=1))
    text = markdown(result)
    print(text)
    if not args.no_docs:
        write_docs(text)


if __name__ == "__main__":
    main()
