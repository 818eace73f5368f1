"""Eval cards: when are two numbers comparable?

Every metric's ``compute`` returns its numbers together with their eval card
(a :class:`~tokenloom.MetricResult`); the card is a JSON-able dict describing
the protocol behind the numbers (backend and version, feature extractor and
weights hash, reference set and size, number of samples, resize/crop, IS
splits, seed, ...). Two numbers are comparable exactly when their cards
match. A results table whose cells were computed under different cards
needs a footnote saying what differs — the common cause of "FID does not
match the paper" is an unrecorded protocol difference.

For a results.md writer::

    from tokenloom.evalcard import card_footnotes

    notes = card_footnotes(runs)          # runs: results.json "runs" records
    header = [name + notes.marks.get(name, "") for name in metric_names]
    ...
    text += "\\n".join(notes.lines)

``runs`` are mappings with an ``"id"`` and ``"eval_cards"`` ({metric name:
card}); ``notes.marks`` maps a metric name to a Markdown footnote reference
(``"[^1]"``) for each metric whose cards differ between runs, and
``notes.lines`` holds the footnotes (``"[^1]: fid: eval cards differ — ..."``).
Metrics whose cards agree get no mark.

:func:`evaluate` is how a run computes one metric: it also accepts a metric
written against the first contract (``compute`` returning a plain mapping and
``eval_card()`` describing the last call).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from ..contract.errors import PluginError
from ..contract.interfaces import MetricContext, MetricResult


def evaluate(metric: Any, ctx: MetricContext) -> MetricResult:
    """``metric.compute(ctx)`` as a :class:`~tokenloom.MetricResult`. A metric
    of the first contract, whose ``compute`` returns a plain mapping, is
    accepted here (and only here): its card is its ``eval_card()`` read right
    after the call, or, without one, :meth:`~tokenloom.Metric.card` (its
    configuration). Anything else is a :class:`~tokenloom.errors.PluginError`."""
    out = metric.compute(ctx)
    if isinstance(out, MetricResult):
        return out
    name = type(metric).__name__
    if not isinstance(out, Mapping):
        raise PluginError(f"metric {name}: compute must return a MetricResult (values and eval card), "
                          f"got {type(out).__name__}")
    legacy = getattr(metric, "eval_card", None)
    if callable(legacy):
        card = legacy()
    elif callable(getattr(metric, "card", None)):
        card = metric.card()
    else:
        card = {"metric": name}
    if not isinstance(card, Mapping):
        raise PluginError(f"metric {name}: eval_card() must return a dict, got {type(card).__name__}")
    return MetricResult(out, card)


def flatten_card(card: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``, leaves rendered as compact
    JSON so that any two cards compare field by field."""
    out: dict[str, str] = {}
    for key, value in card.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_card(value, f"{name}."))
        else:
            out[name] = json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))
    return out


def card_differences(cards: Mapping[str, Mapping[str, Any] | None]) -> dict[str, dict[str, list[str]]]:
    """For one metric's cards by run id: ``{field: {value: [run ids]}}`` for
    each (flattened) field whose value is not the same in every card (a field
    missing from a card counts as the value ``"(absent)"``)."""
    flat = {rid: flatten_card(card or {}) for rid, card in cards.items()}
    fields = sorted({f for f_ in flat.values() for f in f_})
    diffs: dict[str, dict[str, list[str]]] = {}
    for field in fields:
        by_value: dict[str, list[str]] = {}
        for rid, f_ in flat.items():
            by_value.setdefault(f_.get(field, "(absent)"), []).append(rid)
        if len(by_value) > 1:
            diffs[field] = by_value
    return diffs


@attrs.frozen
class Footnotes:
    """``marks``: metric name -> Markdown footnote reference; ``lines``: the
    footnotes, one per metric whose cards differ; ``differences``: metric
    name -> :func:`card_differences`."""

    marks: dict[str, str]
    lines: list[str]
    differences: dict[str, dict[str, dict[str, list[str]]]]


def _short(value: str, limit: int = 40) -> str:
    v = value.strip('"')
    return v if len(v) <= limit else v[: limit - 1] + "…"


def card_footnotes(runs: Sequence[Mapping[str, Any]] | Iterable[Mapping[str, Any]], *,
                   max_fields: int = 4) -> Footnotes:
    """Footnotes for a table whose rows are ``runs`` (each with ``"id"`` and
    ``"eval_cards"``): one per metric whose eval cards are not identical in
    every run that computed it, naming up to ``max_fields`` differing fields
    and which runs had which value."""
    cards_by_metric: dict[str, dict[str, Mapping[str, Any] | None]] = {}
    for i, run in enumerate(runs):
        rid = str(run.get("id", f"row {i + 1}"))
        for metric, card in (run.get("eval_cards") or {}).items():
            cards_by_metric.setdefault(metric, {})[rid] = card
    marks: dict[str, str] = {}
    lines: list[str] = []
    differences: dict[str, dict[str, dict[str, list[str]]]] = {}
    for metric in sorted(cards_by_metric):
        diffs = card_differences(cards_by_metric[metric])
        if not diffs:
            continue
        n = len(marks) + 1
        marks[metric] = f"[^{n}]"
        differences[metric] = diffs
        parts = []
        for field in list(diffs)[:max_fields]:
            values = "; ".join(f"{_short(v)} ({', '.join(ids)})" for v, ids in diffs[field].items())
            parts.append(f"{field}: {values}")
        more = f"; and {len(diffs) - max_fields} more field(s)" if len(diffs) > max_fields else ""
        lines.append(f"[^{n}]: {metric}: eval cards differ between cells, so these numbers are not directly "
                     f"comparable — {' | '.join(parts)}{more}")
    return Footnotes(marks, lines, differences)


__all__ = ["Footnotes", "card_differences", "card_footnotes", "evaluate", "flatten_card"]
