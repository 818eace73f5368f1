"""The results files of a run directory: ``results.json`` (runs merged by id, so several configs
can share one directory and one table), ``results.md`` and ``records/<run-id>.json`` (each run's
record on its own, written first, so ``results.json`` can always be rebuilt); :func:`format_number`,
the one way a number is written in every table tokenloom prints (runs, ablations, tokenizer fits);
and :func:`safe_name` / :func:`inside`, how a file name derived from configuration is made safe and
checked to stay inside the output directory.

Nothing written is lost: a ``results.json`` that cannot be read (truncated, not JSON, not a
results file) is reported on stderr, moved aside to ``results.json.corrupt`` (``.corrupt.1``, ...
when that exists already) and rebuilt from ``records/``; a corrupt record is reported and moved
aside the same way (its row stays in ``results.json``)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..contract.checkpoint import write_json, write_text
from ..contract.errors import InputError

#: The folder of per-run records in a run directory.
RECORDS_DIR = "records"


def safe_name(text: str, *, limit: int = 80) -> str:
    """``text`` as a file name that cannot leave its folder: every character
    outside ``A-Z a-z 0-9 . _ + - [ ]`` becomes ``_``, leading dots are
    dropped (no ``..``, no hidden files), at most ``limit`` characters, never
    empty. Names made of safe characters only are kept as they are."""
    name = re.sub(r"[^A-Za-z0-9._+\-\[\]]", "_", str(text)).lstrip(".")[:limit]
    return name or "_"


def inside(root: str | Path, path: str | Path) -> Path:
    """``path`` when it resolves inside ``root`` (symbolic links followed),
    else an :class:`~tokenloom.errors.InputError`: nothing tokenloom writes
    may land outside its output directory."""
    root_r, path_r = Path(root).resolve(), Path(path).resolve()
    if path_r != root_r and root_r not in path_r.parents:
        raise InputError(f"refusing to write {path}: it resolves to {path_r}, outside the output directory "
                         f"{root_r} (a file name derived from the configuration, or a symbolic link)")
    return Path(path)


def move_aside(path: Path, why: str, consequence: str) -> Path:
    """Report ``path`` on stderr as unreadable (``why``), rename it to
    ``<name>.corrupt`` (``.corrupt.1``, ... so an earlier copy is never
    overwritten) and return the new path. ``consequence``: what happens next."""
    bad = path.with_name(path.name + ".corrupt")
    n = 0
    while bad.exists():
        n += 1
        bad = path.with_name(f"{path.name}.corrupt.{n}")
    os.replace(path, bad)
    print(f"[tokenloom] warning: {path} is unreadable ({why}) — moved aside to {bad.name}; {consequence}",
          file=sys.stderr, flush=True)
    return bad


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


def record_path(out: Path, run_id: str) -> Path:
    """``out/records/<run-id>.json``, checked to stay inside ``out``."""
    return inside(out, out / RECORDS_DIR / f"{safe_name(run_id)}.json")


def read_records(out: Path) -> list[dict]:
    """Every readable per-run record under ``out/records`` (oldest first); an
    unreadable one is reported and moved aside."""
    folder = out / RECORDS_DIR
    if not folder.is_dir():
        return []
    found = []
    for path in folder.glob("*.json"):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(record, dict) or not isinstance(record.get("id"), str) \
                    or not isinstance(record.get("metrics"), dict):
                raise TypeError("not a run record")
        except (UnicodeDecodeError, ValueError, TypeError) as exc:
            move_aside(path, str(exc), "results.json keeps its row if it has one")
            continue
        found.append((path.stat().st_mtime_ns, path.name, record))
    return [r for _, _, r in sorted(found, key=lambda t: (t[0], t[1]))]


def read_runs(out: Path) -> list[dict]:
    """The runs of ``out/results.json``, completed from ``out/records``: a run
    with a record but no row (a process killed between the two writes) is
    added; an unreadable ``results.json`` is reported, moved aside and
    rebuilt from the records."""
    path = out / "results.json"
    runs: list[dict] = []
    if path.is_file():
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            runs = doc.get("runs") if isinstance(doc, dict) else None
            if not isinstance(runs, list) or not all(isinstance(r, dict) and "id" in r for r in runs):
                raise TypeError("not a results file: no list of runs with ids")
        except (UnicodeDecodeError, ValueError, TypeError) as exc:
            n = len(list((out / RECORDS_DIR).glob("*.json"))) if (out / RECORDS_DIR).is_dir() else 0
            move_aside(path, str(exc), f"rebuilding it from the {n} per-run record{'' if n == 1 else 's'} in "
                                       f"{RECORDS_DIR}/")
            runs = []
    have = {r["id"] for r in runs}
    return runs + [r for r in read_records(out) if r["id"] not in have]


def write_results(out: Path, record: dict) -> list[dict]:
    """Write ``record`` to ``out/records/<id>.json``, merge it into
    ``out/results.json`` (replacing a run of the same id; see
    :func:`read_runs`) and rewrite ``results.md``. Returns every run."""
    from .. import __version__

    out = Path(out)
    write_json(record_path(out, record["id"]), record)
    with results_lock(out):  # concurrent runs into one directory: one read-merge-write at a time
        runs = [r for r in read_runs(out) if r.get("id") != record["id"]] + [record]
        write_json(out / "results.json", {"tokenloom_version": __version__, "runs": runs})
        write_text(out / "results.md", "# tokenloom results\n\n" + results_markdown(runs))
    return runs


@contextlib.contextmanager
def results_lock(out: Path) -> Iterator[None]:
    """An exclusive lock on ``out/.results.lock`` (``flock``; where there is
    none, no lock) held while ``results.json`` is read, merged and written, so
    that runs finishing at the same time into one ``--out`` keep every row."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".results.lock", "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


__all__ = ["RECORDS_DIR", "format_number", "inside", "move_aside", "read_records", "read_runs", "record_path",
           "results_lock", "results_markdown", "safe_name", "write_results"]
