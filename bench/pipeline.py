"""The pipeline end to end: wall time of ``make demo`` (``tokenloom demo``)
and of ``examples/ablation-small.toml`` (``tokenloom ablate``), split by
stage, against the 5-minute target for the demo.

    .venv/bin/python bench/pipeline.py [--ablation] [--keep DIR]

Each command runs as a subprocess in a fresh run directory (nothing cached,
as on a first ``make demo``), exactly as a user types it, with
``--no-progress``; the demo is then run a second time in the same directory
(every stage from the cache). The split by stage comes from the run records'
``timings`` (``tokenloom.pipeline.run`` books the wall seconds of data,
tokenizer, encode, train, auxiliary, generate, nll, decode, each metric and
report); for the ablation they are summed over its cells. CPU seconds are
the children's user + system time: on a loaded shared machine the wall time
is stretched by other processes, the CPU time much less.

The demo takes minutes and the ablation tens of minutes on a 2-core CPU, so
the ablation only runs with ``--ablation`` (``make bench-long``); its last
figures stay in ``bench/results/pipeline-ablation.json``. Writes
``bench/results/pipeline.json`` (and ``pipeline-ablation.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

TARGET_DEMO_S = 300.0
STAGE_ORDER = ["data", "tokenizer", "encode", "train", "auxiliary", "generate", "nll", "decode", "metric:nll",
               "metric:cost", "metric:fid", "metric:shapes-oracle", "report"]


def run(cmd: list[str]) -> dict:
    """Run ``cmd``; wall seconds and the child's CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=common.ROOT, capture_output=True, text=True, check=False,
                          env={**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")})
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"bench/pipeline.py: {' '.join(cmd)} failed with exit status {proc.returncode}")
    return {"wall": wall, "cpu": cpu, "stdout_tail": proc.stdout[-2000:]}


def stage_table(timings: dict[str, float], total: float) -> list[list[str]]:
    keys = [k for k in STAGE_ORDER if k in timings] + sorted(k for k in timings if k not in STAGE_ORDER)
    rows = [[k, f"{timings[k]:.1f}", f"{100 * timings[k] / total:.0f} %"] for k in keys]
    rest = total - sum(timings.values())
    rows.append(["(start-up, plan, outside the stages)", f"{rest:.1f}", f"{100 * rest / total:.0f} %"])
    return rows


def summed(records: list[dict]) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in records:
        for k, v in (r.get("timings") or {}).items():
            out[k] = out.get(k, 0.0) + float(v)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ablation", action="store_true", help="also run examples/ablation-small.toml (tens of minutes)")
    ap.add_argument("--no-demo", action="store_true", help="skip the demo (e.g. to time the ablation alone)")
    ap.add_argument("--grid", default="examples/ablation-small.toml")
    ap.add_argument("--keep", default=None, help="run directories go here (default: a temporary directory, removed)")
    ap.add_argument("--name", default="pipeline")
    ap.add_argument("--ablation-name", default=None, help="default: pipeline-ablation (<name>-ablation)")
    args = ap.parse_args()
    machine = common.machine_info()
    print(f"pipeline benchmark\n  {common.describe_machine(machine)}")
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="tokenloom-bench-"))
    py = [sys.executable, "-m", "tokenloom"]
    try:
        if not args.no_demo:
            out = base / "demo"
            shutil.rmtree(out, ignore_errors=True)
            first = run(py + ["demo", "--out", str(out), "--no-progress"])
            rec = json.loads((out / "results.json").read_text())["runs"][-1]  # before the re-run replaces it
            again = run(py + ["demo", "--out", str(out), "--no-progress"])
            timings = rec.get("timings") or {}
            inside = float(rec.get("seconds", first["wall"]))
            print(f"demo: {first['wall']:.0f} s wall, {first['cpu']:.0f} CPU s; cached re-run {again['wall']:.0f} s; "
                  f"target 300 s: {first['wall'] / TARGET_DEMO_S:.2f}× of it")
            for k, v, pct in stage_table(timings, first["wall"]):
                print(f"  {k:<40} {v:>7} s  {pct:>5}")
            summary = {"demo wall seconds (≤ 300)": common.target(first["wall"], TARGET_DEMO_S, at_most=True),
                       "demo CPU seconds": round(first["cpu"], 1), "demo cached re-run seconds": round(again["wall"], 1)}
            md = (f"`tokenloom demo` (what `make demo` runs) in a fresh run directory: **{first['wall']:.0f} s** wall "
                  f"({first['wall'] / TARGET_DEMO_S:.2f}× the 300 s target), {first['cpu']:.0f} CPU seconds "
                  f"(user + system, both threads); the pipeline itself {inside:.0f} s; a second run in the same "
                  f"directory (every stage cached) {again['wall']:.0f} s.\n\n"
                  + common.md_table(["stage", "seconds", "share of wall"], stage_table(timings, first["wall"])))
            common.write_result(args.name, common.result("pipeline", args, machine, summary, md,
                                                         demo={"first": first, "cached": again, "record_seconds": inside,
                                                               "timings": timings}))
        if args.ablation:
            out = base / "ablation"
            shutil.rmtree(out, ignore_errors=True)
            res = run(py + ["ablate", args.grid, "--out", str(out), "--no-progress"])
            cells = [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))]
            records = [c.get("record", c) for c in cells]
            timings = summed(records)
            reused = sum(1 for r in records if (r.get("cache") or {}).get("model_reused"))
            print(f"ablation {args.grid}: {res['wall']:.0f} s wall, {res['cpu']:.0f} CPU s, {len(records)} cells "
                  f"({reused} reused a trained model)")
            for k, v, pct in stage_table(timings, res["wall"]):
                print(f"  {k:<40} {v:>7} s  {pct:>5}")
            summary = {"ablation-small wall seconds": round(res["wall"], 1),
                       "ablation-small CPU seconds": round(res["cpu"], 1)}
            md = (f"`tokenloom ablate {args.grid}` in a fresh directory: **{res['wall']:.0f} s** wall, "
                  f"{res['cpu']:.0f} CPU seconds, {len(records)} generation cells ({reused} of them reused a "
                  "model trained for an earlier cell). Stage seconds summed over the cells:\n\n"
                  + common.md_table(["stage", "seconds", "share of wall"], stage_table(timings, res["wall"])))
            common.write_result(args.ablation_name or f"{args.name}-ablation", common.result(
                "pipeline-ablation", args, machine, summary, md,
                ablation={"run": res, "timings": timings, "cells": len(records), "per_cell": [
                    {"id": r.get("cell", r.get("id")), "timings": r.get("timings")} for r in records]}))
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
