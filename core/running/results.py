"""The results files of a run directory: ``results.json`` (runs merged by id, so several configs
can share one directory and one table) and ``results.md``, and :func:`format_number`, the one way
a number is written in every table tokenloom prints (runs, ablations, tokenizer fits)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..contract.checkpoint import write_json, write_text


def format_number(v: Any) -> str:
    """A number for a Markdown table: ``–`` for None, ``nan``, four significant digits, or
    scientific notation for magnitudes >= 1e5 or below 1e-3 (zero stays ``0``); anything that is
    not a number as its ``str``."""
    if v is None:
        return "–"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if math.isnan(v):
        return "nan"
    v = float(v)
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.3e}"
    return f"{v:.4g}"


def results_markdown(runs: list[dict]) -> str:
    """The table of ``results.md``: one row per run, one column per metric any run reports."""
    keys: list[str] = []
    for r in runs:
        keys += [k for k in r["metrics"] if k not in keys]
    regions = any(r.get("region") for r in runs)  # inpainting/outpainting runs: say which region
    head = ["id", "tokenizer", "generator", "sampler"] + (["region"] if regions else []) + keys
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        c = r["components"]
        cells = [r["id"], c["tokenizer"], c["generator"], " → ".join(c["sampler"]) or "(plain)"]
        cells += [r.get("region") or "–"] if regions else []
        cells += [format_number(r["metrics"].get(k)) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(out: Path, record: dict) -> list[dict]:
    """Merge ``record`` into ``out/results.json`` (replacing a run of the
    same id) and rewrite ``results.md``. Returns every run."""
    from .. import __version__

    path = out / "results.json"
    runs: list[dict] = []
    if path.is_file():
        try:
            runs = json.loads(path.read_text()).get("runs", [])
        except (json.JSONDecodeError, AttributeError):
            runs = []
    runs = [r for r in runs if r.get("id") != record["id"]] + [record]
    write_json(path, {"tokenloom_version": __version__, "runs": runs})
    write_text(out / "results.md", "# tokenloom results\n\n" + results_markdown(runs))
    return runs


__all__ = ["format_number", "results_markdown", "write_results"]
