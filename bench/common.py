"""Helpers shared by the ``bench/`` scripts: what machine and versions a
figure was taken on, interleaved timing of ours against a peer, and the
result files that ``bench/report.py`` turns into ``docs/benchmarks.md``.

Timing protocol (the machine is usually shared): ours and the peer run
*alternately* — ``A B``, then ``B A``, and so on — so a burst of load from
another process hits both; every repeat gives one paired ratio, and the
figure reported is the **median of the paired ratios**. Wall-clock seconds
(``time.perf_counter``) are what count; CPU seconds of this process
(``time.process_time``) are recorded beside them, since on a loaded machine
they are less disturbed by other processes (with one torch thread they are
close to what the run takes on an idle core).

Each script writes ``bench/results/<name>.json`` (``{"machine", "args",
"summary", "markdown", ...}``); ``bench/report.py`` splices the markdown into
the generated sections of ``docs/benchmarks.md`` and, where
``bench/results/<name>.before.json`` exists, a before/after table of the
summaries.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


# ---------------------------------------------------------------------------
# Machine and versions
# ---------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        from importlib import metadata

        return metadata.version(module)
    except Exception:  # noqa: BLE001 - not installed
        return None


def machine_info() -> dict[str, Any]:
    """CPU, core count, torch threads, load average and library versions."""
    import torch

    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "tokenloom": _version("tokenloom"),
        "transformers": _version("transformers"),
        "vector_quantize_pytorch": _version("vector-quantize-pytorch"),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        # OpenMP's wait policy decides what a small kernel costs on a CPU (see docs/benchmarks.md)
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY") or "default",
        # CPULinear's oneDNN kernels (TOKENLOOM_ONEDNN=0: MKL everywhere) decide decoding speed on a CPU
        "tokenloom_onednn": os.environ.get("TOKENLOOM_ONEDNN") or "default",
    }
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        info["load_average"] = None
    return info


def describe_machine(info: dict[str, Any]) -> str:
    """One line: ``AMD EPYC, 2 cores, 1 torch thread, load 6.1 / 6.5 / 6.8, torch 2.14.1, ...``."""
    parts = [info["cpu"], f"{info['cores']} cores", f"{info['torch_threads']} torch thread"
             + ("s" if info["torch_threads"] != 1 else "")]
    if info.get("load_average"):
        parts.append("load average " + " / ".join(f"{x:.1f}" for x in info["load_average"]))
    if info.get("cuda"):
        parts.append(info["cuda"])
    if info.get("omp_wait_policy"):
        parts.append(f"OMP_WAIT_POLICY {info['omp_wait_policy']}")
    if info.get("tokenloom_onednn"):
        parts.append(f"TOKENLOOM_ONEDNN {info['tokenloom_onednn']}")
    for k in ("torch", "transformers", "vector_quantize_pytorch", "tokenloom"):
        if info.get(k):
            parts.append(f"{k.replace('_', '-')} {info[k]}")
    parts.append(info["date"])
    return ", ".join(parts)


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """``(wall seconds, CPU seconds of this process)`` of one call."""
    sync()
    w, c = time.perf_counter(), time.process_time()
    fn()
    sync()
    return time.perf_counter() - w, time.process_time() - c


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, *, warmup: int = 1) -> dict[str, dict[str, list]]:
    """Run every function ``repeats`` times, alternating their order on each
    repeat (``A B C``, ``C B A``, ...), after ``warmup`` untimed rounds.
    Returns ``{name: {"wall": [...], "cpu": [...]}}`` in repeat order."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    out = {n: {"wall": [], "cpu": []} for n in names}
    for r in range(repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            w, c = timed(fns[n])
            out[n]["wall"].append(w)
            out[n]["cpu"].append(c)
    return out


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over repeats of ``num[i] / den[i]`` — e.g. peer seconds over
    our seconds: our speed-up (> 1: we are faster)."""
    return median([a / b for a, b in zip(num, den) if b > 0])


def spread(num: list[float], den: list[float]) -> tuple[float, float]:
    """The smallest and largest paired ratio (how noisy the median is)."""
    rs = [a / b for a, b in zip(num, den) if b > 0]
    return (min(rs), max(rs)) if rs else (float("nan"), float("nan"))


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------


def write_result(name: str, result: dict[str, Any]) -> Path:
    """Write ``bench/results/<name>.json`` atomically; returns its path."""
    from tokenloom.checkpoint import write_json

    path = RESULTS / f"{name}.json"
    write_json(path, result)
    return path


def result(name: str, args: Any, machine: dict[str, Any], summary: dict[str, Any], markdown: str,
           **extra: Any) -> dict[str, Any]:
    """The JSON record of one benchmark run. ``summary`` holds the headline
    figures (``{label: {"value", "target", "met"}}`` or plain numbers),
    ``markdown`` the section ``report.py`` puts into docs/benchmarks.md."""
    return {"bench": name, "command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
            "args": vars(args) if args is not None else {}, "machine": machine, "summary": summary,
            "markdown": markdown, **extra}


def target(value: float, goal: float, *, at_most: bool = False) -> dict[str, Any]:
    """A headline figure with its target (``value >= goal``, or ``<=`` with ``at_most``)."""
    met = value <= goal if at_most else value >= goal
    return {"value": round(float(value), 4), "target": ("≤ " if at_most else "≥ ") + f"{goal:g}", "met": bool(met)}


def md_table(head: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def fx(x: float | None, digits: int = 2) -> str:
    """A ratio as ``1.23×`` (``–`` for none)."""
    return "–" if x is None or math.isnan(x) else f"{x:.{digits}f}×"


def setup_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
