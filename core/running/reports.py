"""Ablation reports: one table, Pareto plots and an overview image.

:func:`write_ablation_report` turns the finished cells of an ablation
(:mod:`tokenloom.ablation`) into

- ``results.json`` — ``runs`` (one pipeline record per cell, as DESIGN.md's
  run directory describes, plus its ``cell``, ``row`` and grid ``labels``),
  ``rows`` (cells that differ only in their seed aggregated: every metric
  as ``{"mean", "std", "n"}``), ``skipped`` cells with their reasons, the
  ``plan``, which way each metric is better and the eval-card footnotes;
- ``results.md`` — one row per composition, metric columns with ↓/↑, the
  best value of each column in bold, ``mean ± std`` over seeds, a footnote
  wherever the metrics' eval cards differ between rows, the skipped cells;
- ``plots/<quality>-vs-<cost>.png`` — each quality metric against NFE and
  against seconds per image, the Pareto front highlighted;
- ``plots/<quality>-vs-train-flops.png`` — when a grid sweeps
  ``train.steps`` (and the ``cost`` metric reports ``train_flops``): each
  quality metric against training FLOPs, one line per composition;
- ``overview.png`` — a row of samples per table row, labelled.

Which way is better is decided in one place, :data:`DIRECTIONS`.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..contract.checkpoint import atomic_write, write_json, write_text
from .grid import SEED_AXIS, describe_labels
from .images import GRID_LAYOUT_KEY, GRID_NCOL, GRID_PAD
from .results import format_number, move_aside

#: Which way a metric key is better, first matching pattern wins: "lower",
#: "higher", or None (no "best" mark: spreads, baselines, properties of the
#: real data or of the oracle rather than of the cell).
DIRECTIONS: tuple[tuple[str, str | None], ...] = (
    ("*_std", None),
    ("*_real", None),
    ("shapes_oracle_accuracy", None),
    ("prompt_alignment_reconstructed", None),  # the tokenizer's ceiling, not the composition's result
    ("uniform_bits_*", None),
    ("train_tokens", None),
    ("drafted_per_image", None),
    ("fid*", "lower"),
    ("kid*", "lower"),
    ("nll*", "lower"),
    ("*nfe*", "lower"),
    ("*seconds*", "lower"),
    ("mse", "lower"),
    ("*_bytes", "lower"),
    ("*flops", "lower"),
    ("isc*", "higher"),
    ("precision", "higher"),
    ("recall", "higher"),
    ("f_score", "higher"),
    ("*oracle*", "higher"),
    ("shapes_*", "higher"),
    ("prompt_*", "higher"),
    ("psnr*", "higher"),
    ("tokens_per_second", "higher"),
    ("codebook_*", "higher"),
    ("acceptance_rate", "higher"),
    ("mean_accepted_length", "higher"),
    ("speedup*", "higher"),
)

#: Metric keys that measure the machine (time, memory) rather than the
#: composition: they differ between two runs of the same cell.
TIMING_KEYS: tuple[str, ...] = ("seconds_per_image", "tokens_per_second", "peak_memory_bytes",
                                "baseline_seconds_per_image", "speculative_seconds_per_image", "speedup_wallclock")

#: Quality metrics plotted against the cost axes (when present in the table).
QUALITY_KEYS: tuple[str, ...] = ("fid", "kid", "isc", "precision", "recall", "shapes_valid", "prompt_alignment",
                                  "nll_bits_per_image")
#: Cost axes of the Pareto plots, with their axis labels.
COST_KEYS: dict[str, str] = {"nfe": "NFE (backbone forward passes per batch)",
                             "seconds_per_image": "seconds per image (generation)"}

#: Column order of the table: quality first, then cost, then the rest.
_ORDER = QUALITY_KEYS + ("nll_bits_per_dim", "nll_bits_per_token", "uniform_bits_per_image") + tuple(COST_KEYS)



def direction(key: str) -> str | None:
    """``"lower"``, ``"higher"`` or None for a metric key (see :data:`DIRECTIONS`)."""
    for pattern, way in DIRECTIONS:
        if fnmatch.fnmatchcase(key, pattern):
            return way
    return None


def mean_std(values: Iterable[float | None]) -> dict[str, float | int | None]:
    """``{"mean", "std", "n"}`` over the values that are not None or NaN;
    ``std`` is the sample standard deviation (n - 1), None for n < 2."""
    xs = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    n = len(xs)
    if n == 0:
        return {"mean": None, "std": None, "n": 0}
    mean = math.fsum(xs) / n
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n}


def pareto_front(costs: Sequence[float], qualities: Sequence[float], *, higher_is_better: bool) -> list[bool]:
    """For each point, whether no other point is at least as cheap and at
    least as good, and strictly better in one of the two (lower cost is
    better; quality as ``higher_is_better`` says)."""
    sign = -1.0 if higher_is_better else 1.0
    q = [sign * float(v) for v in qualities]  # lower is better on both axes now
    out = []
    for i in range(len(costs)):
        dominated = any(costs[j] <= costs[i] and q[j] <= q[i] and (costs[j] < costs[i] or q[j] < q[i])
                        for j in range(len(costs)) if j != i)
        out.append(not dominated)
    return out


# ---------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------


def metric_keys(records: Iterable[dict]) -> list[str]:
    """Every metric key of ``records``, in table order."""
    seen: list[str] = []
    for r in records:
        seen += [k for k in r.get("metrics", {}) if k not in seen]
    first = [k for k in _ORDER if k in seen]
    return first + [k for k in seen if k not in first]


def aggregate_rows(plan: Any, records: dict[str, dict]) -> list[dict]:
    """One row per composition (cells that differ only in their seed), in
    plan order, over the finished cells in ``records`` (cell id -> record)."""
    rows: dict[str, dict] = {}
    for pc in plan.cells:
        rec = records.get(pc.id)
        if rec is None:
            continue
        row = rows.setdefault(pc.row, {
            "id": pc.row,
            "labels": {k: v for k, v in pc.cell.labels.items() if k != SEED_AXIS},
            "cells": [], "runs": [], "seeds": [], "samples": rec["artifacts"]["samples"], "_records": [],
        })
        row["cells"].append(pc.id)
        row["runs"].append(rec["id"])
        row["seeds"].append(pc.cfg.seed)
        row["_records"].append(rec)
    keys = metric_keys(records.values())
    out = []
    for i, row in enumerate(rows.values()):
        recs = row.pop("_records")
        row["n"] = i + 1
        row["label"] = " · ".join(row["labels"].values()) or recs[0]["id"]
        row["metrics"] = {k: mean_std(r["metrics"].get(k) for r in recs) for k in keys}
        out.append(row)
    return out


#: Keys with a direction that are never marked best: on the CPU ``peak_memory_bytes`` is the
#: process's peak resident set size, which grows over an ablation whatever the cell does.
NO_BEST: frozenset[str] = frozenset({"peak_memory_bytes"})


def best_rows(rows: list[dict]) -> dict[str, list[str]]:
    """For each metric key with a direction (except :data:`NO_BEST`), the ids
    of the rows whose mean is best (ties all count); only when at least two
    rows have a value and not all of them are equal."""
    best: dict[str, list[str]] = {}
    keys = {k for r in rows for k in r["metrics"] if k not in NO_BEST}
    for k in keys:
        way = direction(k)
        vals = [(r["id"], r["metrics"][k]["mean"]) for r in rows if r["metrics"][k]["mean"] is not None]
        if way is None or len(vals) < 2 or len({v for _, v in vals}) == 1:
            continue
        target = min(v for _, v in vals) if way == "lower" else max(v for _, v in vals)
        best[k] = [rid for rid, v in vals if v == target]
    return best


# ---------------------------------------------------------------------------
# Eval cards
# ---------------------------------------------------------------------------


def _footnotes(runs: list[dict]) -> tuple[dict[str, str], list[str]]:
    """(metric name -> footnote mark, footnote lines) for metrics whose eval
    cards differ between cells (:mod:`tokenloom.evalcard`). A cell where a
    metric gave no number at all (the likelihood of a masked order) does not
    take part in the comparison of that metric's cards."""
    try:
        from ..evaluation.evalcard import card_footnotes
    except ImportError:  # pragma: no cover - evalcard ships with tokenloom
        return {}, []
    compared = []
    for run in runs:
        cards = dict(run.get("eval_cards") or {})
        for name in list(cards):
            mine = [v for k, v in (run.get("metrics") or {}).items() if _metric_of_key(k, [name])]
            if mine and all(v is None for v in mine):
                del cards[name]
        compared.append({"id": run.get("id"), "eval_cards": cards})
    notes = card_footnotes(compared)
    return dict(notes.marks), list(notes.lines)


def _metric_of_key(key: str, names: Iterable[str]) -> str | None:
    """Which metric (component name) a table column most likely came from,
    for placing its footnote mark: ``fid`` -> fid, ``kid_std`` -> kid,
    ``precision`` -> precision-recall, ``shapes_valid`` -> shapes-oracle."""
    for name in names:
        norm = name.replace("-", "_")
        parts = norm.split("_")
        if key == norm or key in parts or key.startswith((norm + "_", parts[0] + "_")):
            return name
    return None


# ---------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------


def _cell(m: dict) -> str:
    if m["mean"] is None:
        return "–"
    return format_number(m["mean"]) if m["std"] is None else f"{format_number(m['mean'])} ± {format_number(m['std'])}"


def _esc(text: str) -> str:
    return str(text).replace("|", "\\|")


def results_markdown(report: dict) -> str:
    """``results.md`` of an ablation report (see :func:`write_ablation_report`)."""
    rows, best = report["rows"], report["best"]
    marks = report.get("footnote_marks", {})
    axes: list[str] = []
    for r in rows:
        axes += [k for k in r["labels"] if k not in axes]
    keys = [k for k in metric_keys(report["runs"]) if any(r["metrics"].get(k, {}).get("mean") is not None
                                                          for r in rows)]
    constant = {}
    if len(rows) > 1:  # a column with one value in every row becomes a line under the table
        for k in keys:
            ms = [r["metrics"][k] for r in rows]
            if len({m["mean"] for m in ms}) == 1 and all(not m["std"] for m in ms):
                constant[k] = ms[0]["mean"]
        keys = [k for k in keys if k not in constant]
    many_seeds = any(len(r["seeds"]) > 1 for r in rows)
    plan = report["plan"]
    lines = [f"# Ablation{': ' + Path(report['grid']).name if report.get('grid') else ''}", "",
             f"Plan: {plan['summary']}. Finished: {sum(len(r['cells']) for r in rows)} of {plan['cells']} cells.", ""]
    head = ["#"] + axes + (["seeds"] if many_seeds else [])
    arrows = {"lower": " ↓", "higher": " ↑", None: ""}
    names = sorted({n for r in report["runs"] for n in (r.get("eval_cards") or {})})
    for k in keys:
        metric = _metric_of_key(k, marks) if marks else None
        head.append(f"{k}{arrows[direction(k)]}{marks.get(metric, '') if metric else ''}")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"[{r['n']}]({r['samples']})"] + [_esc(r["labels"].get(a, "")) for a in axes]
        if many_seeds:
            cells.append(",".join(str(s) for s in r["seeds"]))
        for k in keys:
            text = _cell(r["metrics"][k])
            cells.append(f"**{text}**" if r["id"] in best.get(k, ()) else text)
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    notes = ["**Bold**: the best value of its column (↓ lower is better, ↑ higher is better)."]
    if many_seeds:
        notes.append("Cells that differ only in their seed share a row: mean ± sample standard deviation over "
                     "the seeds listed.")
    notes.append("`#` links each row's sample grid. Time and memory columns measure the machine, not the "
                 "composition" + ("" if report.get("world_size", 1) == 1 else
                                  f" ({report['world_size']} processes: generation seconds summed over them)") + ".")
    if names:
        notes.append(f"Metrics: {', '.join(names)}.")
    if constant:
        notes.append("The same in every row: " + ", ".join(f"{k} = {format_number(v)}" for k, v in constant.items()) + ".")
    lines += [" ".join(notes), ""]
    if report.get("pending"):
        lines += [f"Not finished yet: {len(report['pending'])} cell(s) — run the same command again to continue.",
                  ""]
    if report["skipped"]:
        lines += ["## Skipped cells", ""]
        lines += [f"- {_esc(s['cell'])}: {_esc(s['reason'])}" for s in report["skipped"]]
        lines.append("")
    if report.get("plots") or report.get("overview"):
        lines += ["## Plots", ""]
        lines += [f"![{Path(p).stem}]({p})" for p in report.get("plots", [])]
        if report.get("overview"):
            lines.append(f"![overview: a row of samples per table row]({report['overview']})")
        lines.append("")
    if report.get("footnotes"):
        lines += report["footnotes"] + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    with atomic_write(path) as fh:
        fig.savefig(fh, format="png", dpi=110, bbox_inches="tight")


def plot_pareto(rows: list[dict], quality: str, cost: str, path: Path) -> bool:
    """``quality`` against ``cost`` with one point per row (error bars: the
    standard deviation over seeds), numbered as in the table, the Pareto
    front in red. Returns False (and draws nothing) with fewer than 2 points."""
    pts = [(r["n"], r["metrics"][cost], r["metrics"][quality]) for r in rows
           if r["metrics"].get(cost, {}).get("mean") is not None and r["metrics"].get(quality, {}).get("mean") is not None]
    if len(pts) < 2:
        return False
    plt = _pyplot()
    way = direction(quality)
    xs = [c["mean"] for _, c, _ in pts]
    ys = [q["mean"] for _, _, q in pts]
    front = pareto_front(xs, ys, higher_is_better=way == "higher")
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    offsets = [(6, -10), (-14, -10), (6, 4), (-14, 4)]  # labels of points at one cost: low ones below, alternating sides
    for k, ((n, c, q), on) in enumerate(zip(pts, front)):
        ax.errorbar(c["mean"], q["mean"], xerr=c["std"] or None, yerr=q["std"] or None, fmt="o",
                    color="tab:red" if on else "0.55", markersize=8 if on else 6, capsize=2, zorder=3 if on else 2)
        same = sorted((y, j) for j, (x, y) in enumerate(zip(xs, ys)) if x == c["mean"])
        ax.annotate(str(n), (c["mean"], q["mean"]), textcoords="offset points", fontsize=8,
                    xytext=offsets[[j for _, j in same].index(k) % len(offsets)])
    fx = sorted((x, y) for x, y, on in zip(xs, ys, front) if on)
    ax.step([x for x, _ in fx], [y for _, y in fx], where="post", color="tab:red", lw=1.5, label="Pareto front",
            zorder=1)
    ax.scatter([], [], color="0.55", label="dominated")
    if min(xs) > 0 and max(xs) / min(xs) > 8:
        from matplotlib.ticker import FuncFormatter, LogLocator

        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(LogLocator(base=2))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.set_xlabel(COST_KEYS.get(cost, cost))
    better = {"lower": "lower is better", "higher": "higher is better"}.get(way or "", "")
    ax.set_ylabel(f"{quality} ({better})" if better else quality)
    ax.set_title(f"{quality} vs {cost} — points numbered as the rows of results.md", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(fig, path)
    plt.close(fig)
    return True


def plot_vs_train_flops(rows: list[dict], quality: str, path: Path, *, axis: str = "train.steps") -> bool:
    """``quality`` against the backbone's training FLOPs (``train_flops``), one
    line per composition that differs only in the grid label ``axis`` (a
    ``train.steps`` sweep: each composition's quality-against-compute curve),
    error bars the standard deviation over seeds. Returns False (and draws
    nothing) unless some composition has two or more training budgets."""
    groups: dict[str, list[tuple[float, dict]]] = {}
    for r in rows:
        f, q = r["metrics"].get("train_flops", {}), r["metrics"].get(quality, {})
        if f.get("mean") is None or q.get("mean") is None:
            continue
        name = " · ".join(v for k, v in r["labels"].items() if k != axis) or "base"
        groups.setdefault(name, []).append((f["mean"], q))
    if not any(len({x for x, _ in pts}) > 1 for pts in groups.values()):
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 4.4))
    for name, pts in groups.items():
        pts.sort(key=lambda p: p[0])
        ax.errorbar([x for x, _ in pts], [q["mean"] for _, q in pts], yerr=[q["std"] or 0.0 for _, q in pts],
                    marker="o", markersize=4, capsize=2, lw=1.2, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs of the backbone (train_flops)")
    better = {"lower": "lower is better", "higher": "higher is better"}.get(direction(quality) or "", "")
    ax.set_ylabel(f"{quality} ({better})" if better else quality)
    ax.set_title(f"{quality} against training compute, one line per composition", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(fig, path)
    plt.close(fig)
    return True


def first_row_of_grid(png: Path) -> Any:
    """The first row of a pipeline sample grid (``numpy`` ``[h, W, 3]``)."""
    import numpy as np
    from PIL import Image

    with Image.open(png) as im:
        layout = im.info.get(GRID_LAYOUT_KEY)
        a = np.asarray(im.convert("RGB"))
    try:  # the layout save_grid recorded: the first row whatever the number of columns
        spec = json.loads(layout)
        height = int(spec["cell"][0]) + 2 * int(spec["pad"])
    except (TypeError, ValueError, KeyError, IndexError):  # a grid written before the layout was recorded
        height = (a.shape[1] - GRID_PAD) // GRID_NCOL - GRID_PAD + 2 * GRID_PAD
    return a[: min(a.shape[0], height)]


def overview_image(rows: list[dict], out: Path, path: Path) -> bool:
    """One labelled row of samples (the first seed's) per table row."""
    strips = []
    for r in rows:
        png = out / r["samples"]
        if png.is_file():
            strips.append((f"{r['n']}. {r['label']}", first_row_of_grid(png)))
    if not strips:
        return False
    plt = _pyplot()
    h, w = strips[0][1].shape[:2]
    width = 7.5
    row_h = width * h / w + 0.28
    fig, axes = plt.subplots(len(strips), 1, figsize=(width, row_h * len(strips)), squeeze=False)
    for ax, (label, img) in zip(axes[:, 0], strips):
        ax.imshow(img, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(label if len(label) <= 110 else label[:109] + "…", loc="left", fontsize=7, pad=2)
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - 0.3 / (row_h * len(strips)), bottom=0.01, hspace=0.35)
    _save(fig, path)
    plt.close(fig)
    return True


def _slug(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key)


# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------


def write_ablation_report(out: str | Path, plan: Any, records: dict[str, dict], *, meta: dict | None = None,
                          plots: bool = True) -> dict:
    """Write ``results.json`` and ``results.md`` (and with ``plots``, the
    Pareto plots and ``overview.png``) for the finished cells ``records``
    (cell id -> pipeline record) of ``plan``. Returns the report."""
    from .. import __version__

    out = Path(out)
    runs = [records[pc.id] for pc in plan.cells if pc.id in records]
    rows = aggregate_rows(plan, records)
    best = best_rows(rows)
    for r in rows:
        r["best"] = sorted(k for k, ids in best.items() if r["id"] in ids)
    marks, footnotes = _footnotes(runs)
    report: dict[str, Any] = {
        "tokenloom_version": __version__,
        **(meta or {}),
        "directions": {k: direction(k) for k in metric_keys(runs)},
        "timing_keys": list(TIMING_KEYS),
        "rows": rows,
        "best": best,
        "runs": runs,
        "skipped": [{"cell": describe_labels(s.labels), "labels": dict(s.labels), "reason": s.reason}
                    for s in plan.skipped],
        "pending": [pc.id for pc in plan.cells if pc.id not in records],
        "footnote_marks": marks,
        "footnotes": footnotes,
        "plots": [],
        "overview": None,
    }
    previous = out / "results.json"
    if not plots and previous.is_file():  # keep the figures of an earlier invocation listed until redrawn
        try:
            old = json.loads(previous.read_text(encoding="utf-8"))
            report["plots"] = [p for p in old.get("plots", []) if (out / p).is_file()]
            report["overview"] = old.get("overview") if old.get("overview") and (out / old["overview"]).is_file() \
                else None
        except (UnicodeDecodeError, ValueError, AttributeError, TypeError) as exc:
            move_aside(previous, str(exc) or type(exc).__name__, "rebuilding it from the cell records in cells/")
    if plots and rows:
        drawn = []
        keys = [k for k in QUALITY_KEYS if any(r["metrics"].get(k, {}).get("mean") is not None for r in rows)]
        for q in keys:
            for c in COST_KEYS:
                rel = f"plots/{_slug(q)}-vs-{_slug(c)}.png"
                if plot_pareto(rows, q, c, out / rel):
                    drawn.append(rel)
            rel = f"plots/{_slug(q)}-vs-train-flops.png"
            if plot_vs_train_flops(rows, q, out / rel):
                drawn.append(rel)
        report["plots"] = drawn
        report["overview"] = "overview.png" if overview_image(rows, out, out / "overview.png") else None
    write_json(out / "results.json", report)
    write_text(out / "results.md", results_markdown(report))
    return report


__all__ = [
    "COST_KEYS",
    "DIRECTIONS",
    "NO_BEST",
    "QUALITY_KEYS",
    "TIMING_KEYS",
    "aggregate_rows",
    "best_rows",
    "direction",
    "mean_std",
    "metric_keys",
    "overview_image",
    "pareto_front",
    "plot_pareto",
    "plot_vs_train_flops",
    "results_markdown",
    "write_ablation_report",
]
