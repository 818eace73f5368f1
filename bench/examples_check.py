"""Do the example configs give the same numbers? — the check that a refactor keeps results.

Runs every example config (``examples/quick.toml``, ``examples/orders/*.toml``, the ``tokenloom demo``
config and the ``examples/ablation-small.toml`` grid) at a shrunk budget (fewer images, training and
tokenizer steps, samples) on one thread, and writes every metric that does not measure time or
memory to a JSON file; with ``--check FILE`` it compares against an earlier snapshot and exits 1
on any difference (exact for integers and strings, relative 1e-6 for floats)::

    python bench/examples_check.py --write bench/results/examples-snapshot.json   # before
    python bench/examples_check.py --check bench/results/examples-snapshot.json   # after

A documented fix that changes results is re-snapshotted in the same commit that makes it.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
#: metric keys that measure the machine rather than the method
VOLATILE = re.compile(r"seconds|latency|time|wall|peak|rss|memory|throughput|per_second")


def shrink(raw: dict[str, Any]) -> dict[str, Any]:
    """The same config at a budget that runs in seconds."""
    raw = json.loads(json.dumps(raw))
    data = raw.setdefault("data", {})
    data["n"] = min(int(data.get("n", 600)), 600)
    data["n_holdout"] = min(int(data.get("n_holdout", 64)), 64)
    tok = raw.get("tokenizer", {})
    if "steps" in tok:
        tok["steps"] = min(int(tok["steps"]), 40)
    train = raw.setdefault("train", {})
    train["steps"] = min(int(train.get("steps", 40)), 40)
    train["batch_size"] = min(int(train.get("batch_size", 16)), 16)
    train["warmup"] = min(int(train.get("warmup", 0)), 5)
    metrics = raw.setdefault("metrics", {})
    metrics["n_samples"] = min(int(metrics.get("n_samples", 16)), 16)
    return raw


def stable_numbers(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in sorted(metrics.items()) if not VOLATILE.search(k)}


def snapshot() -> dict[str, Any]:
    import tokenloom
    from tokenloom.ablation import run_ablation
    from tokenloom.config import parse_config, read_toml
    from tokenloom.pipeline import DEMO, run

    torch.set_num_threads(1)
    registry = tokenloom.get_registry()
    configs = {str(p.relative_to(ROOT)): read_toml(p) for p in
               [EXAMPLES / "quick.toml", *sorted((EXAMPLES / "orders").glob("*.toml"))]}
    configs["tokenloom demo"] = json.loads(json.dumps(DEMO)) | {
        "metrics": {"names": ["nll", "cost", "shapes-oracle"], "n_samples": 16}}
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, raw in configs.items():
            print(f"== {name}", flush=True)
            cfg = parse_config(shrink(raw), registry=registry, source=name)
            record = run(cfg, Path(tmp) / "runs", progress=False, registry=registry)
            out[name] = stable_numbers(record["metrics"])
        grid = read_toml(EXAMPLES / "ablation-small.toml")
        grid = shrink(grid)
        print("== examples/ablation-small.toml", flush=True)
        report = run_ablation(grid, Path(tmp) / "ablation", progress=False, registry=registry,
                              echo=lambda _m: None, plots=False)
        for row in report["rows"]:
            key = "ablation-small: " + (row.get("label") or json.dumps(row.get("labels"), sort_keys=True))
            out[key] = {k: (v.get("mean") if isinstance(v, dict) else v)
                        for k, v in sorted(row.get("metrics", {}).items()) if not VOLATILE.search(k)}
    return out


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    problems = []
    for name in sorted(set(old) | set(new)):
        if name not in new or name not in old:
            problems.append(f"{name}: only in the {'old' if name in old else 'new'} snapshot")
            continue
        for key in sorted(set(old[name]) | set(new[name])):
            a, b = old[name].get(key), new[name].get(key)
            same = a == b or (isinstance(a, float) and isinstance(b, float)
                              and (math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
                                   or (math.isnan(a) and math.isnan(b))))
            if not same:
                problems.append(f"{name}: {key}: {a!r} -> {b!r}")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", type=Path, help="write a snapshot here")
    group.add_argument("--check", type=Path, help="compare with this snapshot")
    args = ap.parse_args(argv)
    snap = snapshot()
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(json.dumps(snap, indent=1, sort_keys=True) + "\n")
        print(f"wrote {args.write} ({len(snap)} configs)")
        return 0
    problems = differences(json.loads(args.check.read_text()), snap)
    for p in problems:
        print(p)
    print(f"{len(snap)} configs: " + ("identical" if not problems else f"{len(problems)} differences"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
