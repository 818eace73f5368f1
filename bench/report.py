"""Write the generated sections of ``docs/benchmarks.md`` from
``bench/results/*.json`` (what ``make bench`` runs last).

    .venv/bin/python bench/report.py [--doc docs/benchmarks.md]

Generated text sits between ``<!-- bench:<name>:start -->`` and
``<!-- bench:<name>:end -->`` markers; everything outside them is
hand-written and left as it is. A section whose markers are missing is
appended at the end. Sections:

- ``summary``: every headline figure with a target, from the latest results;
- ``before-after``: the summaries of ``<bench>.before.json`` (taken with the
  code before the performance pass) next to the latest ``<bench>.json``;
- one section per benchmark (``decode``, ``train``, ``quantizers``,
  ``orders``, ``pipeline``, ``pipeline-ablation``, ``gpu``): its table, the command
  and the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import common

BENCHES = ["decode", "train", "quantizers", "orders", "pipeline", "pipeline-ablation", "gpu"]


def load(name: str) -> dict | None:
    path = common.RESULTS / f"{name}.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def fmt_value(v) -> str:
    if isinstance(v, dict):
        v = v.get("value")
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "–" if v is None else str(v)


def summary_section(results: dict[str, dict]) -> str:
    rows = []
    for name in BENCHES:
        r = results.get(name)
        if not r:
            continue
        for label, v in r["summary"].items():
            if isinstance(v, dict) and "target" in v:
                rows.append([label, fmt_value(v), v["target"], "met" if v["met"] else "**not met**",
                             r["machine"]["date"]])
    if not rows:
        return "_No results yet: run `make bench`._"
    return common.md_table(["figure", "measured", "target", "", "taken"], rows)


def before_after_section(results: dict[str, dict]) -> str:
    rows = []
    for name in BENCHES:
        before, after = load(f"{name}.before"), results.get(name)
        if not before or not after:
            continue
        for label, v in after["summary"].items():
            if label not in before["summary"]:
                continue
            b, a = before["summary"][label], v
            rows.append([label, fmt_value(b), fmt_value(a), a.get("target", "–") if isinstance(a, dict) else "–"])
    if not rows:
        return "_No before/after pair: run a benchmark with `--name <bench>.before` on the older code._"
    return ("Each figure is a ratio against its peer measured in the same run (or a time), so before and after "
            "were taken at different moments of the machine's load; compare the ratios, not absolute speeds.\n\n"
            + common.md_table(["figure", "before", "after", "target"], rows))


def bench_section(r: dict) -> str:
    m = r["machine"]
    return (r["markdown"] + f"\n\n<sub>`{r['command']}` — {common.describe_machine(m)}</sub>")


def splice(doc: str, name: str, body: str) -> str:
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(doc):
        return pattern.sub(lambda _m: block, doc)
    return doc.rstrip() + f"\n\n## {name} (generated)\n\n{block}\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--doc", default=str(common.ROOT / "docs" / "benchmarks.md"))
    args = ap.parse_args()
    doc_path = Path(args.doc)
    doc = doc_path.read_text() if doc_path.is_file() else "# Benchmarks\n"
    results = {n: r for n in BENCHES if (r := load(n))}
    doc = splice(doc, "summary", summary_section(results))
    doc = splice(doc, "before-after", before_after_section(results))
    for name in BENCHES:
        if name in results:
            doc = splice(doc, name, bench_section(results[name]))
    from tokenloom.checkpoint import write_text

    write_text(doc_path, doc)
    print(f"wrote {doc_path} ({', '.join(results) or 'no results'})")


if __name__ == "__main__":
    main()
