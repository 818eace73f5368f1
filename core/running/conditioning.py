"""A run's conditions: the conditioner, the training condition table and the prompts to generate from.

Generators pass ``cond: LongTensor[B]``, an index into the backbone's condition table, and
``model.null_class`` (the table's last row) for unconditional rows. This module builds those
tables from the run's data and ``[conditioner]`` (default: ``class``, the class label):

- training: with a conditioner that reads class labels, the table is one row per class and a
  row's ``cond`` its label — exactly the class token of runs before conditioners were a plugin
  kind (no conditioner object is built at all for a config without ``[conditioner]``); with
  one that reads captions, one row per distinct training condition;
- generation: image *i* gets prompt ``i mod len(prompts)``; the prompts are ``[metrics] prompts``
  (a text file, one per line) or the held-out set's distinct captions (in order of appearance);
- the held-out likelihood reads the held-out images' own conditions.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import attrs
import torch

from ..contract.errors import ConfigError, InputError
from ..contract.interfaces import Condition, Prefix


@attrs.define
class ConditionTable:
    """Conditions encoded for the backbone: ``prefix`` (``len(conditions)`` rows; None when the
    table is the class token's identity table), ``index`` (``LongTensor[N]``: each image's row)
    and the ``conditions`` themselves (``labels`` of the images where known, else None)."""

    conditions: list[Condition]
    index: torch.Tensor
    prefix: Prefix | None
    labels: torch.Tensor | None = None

    @property
    def n_rows(self) -> int:
        return len(self.conditions)


def build_conditioner(cfg: Any, registry: Any, data: Any) -> Any:
    """The run's conditioner for ``data`` (its classes), or None for a config without
    ``[conditioner]`` (class labels through the backbone's own identity table)."""
    from ..contract.registry import build_component

    conditioner = None
    if cfg.conditioner is not None:
        conditioner = build_component(registry, "conditioner", cfg.conditioner.name,
                                      {**cfg.conditioner.options, "n_classes": int(data.n_classes),
                                       "class_names": tuple(data.class_names)}, path="conditioner")
    if getattr(cfg, "prompts", None) is not None and reads_labels(conditioner):
        raise ConfigError([("metrics.prompts: prompts need a conditioner that reads captions ([conditioner] "
                            "name = \"caption\" or \"text-encoder\"); this run is conditioned on class labels")])
    if getattr(cfg, "prompts", None) is not None:
        read_prompts(cfg.prompts)  # a missing or empty prompts file is said before anything trains
    return conditioner


def conditions_of(data: Any) -> list[Condition]:
    """Each image's condition: its class label and, where the data set has them, its caption."""
    captions = getattr(data, "captions", None)
    labels = data.labels.tolist()
    if captions is None:
        return [Condition(label=int(y)) for y in labels]
    return [Condition(label=int(y), caption=str(c)) for y, c in zip(labels, captions)]


def reads_labels(conditioner: Any) -> bool:
    """Whether a conditioner (None: the default, class labels) reads class labels only."""
    return conditioner is None or set(conditioner.needs) <= {"label"}


def _check_captions(conditioner: Any, data: Any, what: str) -> None:
    if "caption" in set(conditioner.needs) and getattr(data, "captions", None) is None:
        raise ConfigError([(f"conditioner: '{what}' reads captions, but the data set has none "
                            "(shapes has them; a folder data set needs a metadata.jsonl with file_name and text)")])


def training_table(conditioner: Any, data: Any, name: str = "conditioner") -> ConditionTable:
    """The training condition table and every training image's row; the conditioner (when there
    is one) is fitted on the training conditions first."""
    if conditioner is None:
        n = int(data.n_classes)
        return ConditionTable([Condition(label=i) for i in range(n)], data.labels.long(), None, data.labels.long())
    _check_captions(conditioner, data, name)
    conds = conditions_of(data)
    conditioner.fit(conds)
    if reads_labels(conditioner):
        n = int(data.n_classes)
        table = [Condition(label=i) for i in range(n)]
        return ConditionTable(table, data.labels.long(), conditioner.encode(table), data.labels.long())
    return _distinct(conditioner, conds, data.labels.long())


def _distinct(conditioner: Any, conds: list[Condition], labels: torch.Tensor | None) -> ConditionTable:
    key = (lambda c: c.caption) if not reads_labels(conditioner) else (lambda c: c.label)
    rows: dict[Any, int] = {}
    table: list[Condition] = []
    index = []
    for c in conds:
        k = key(c)
        if k not in rows:
            rows[k] = len(table)
            table.append(c)
        index.append(rows[k])
    return ConditionTable(table, torch.tensor(index, dtype=torch.long), conditioner.encode(table), labels)


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a text file, one per line (blank lines and ``#`` comments skipped)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError([f"metrics.prompts: no such file: {p}"])
    prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    prompts = [x for x in prompts if x and not x.startswith("#")]
    if not prompts:
        raise ConfigError([f"metrics.prompts: {p} holds no prompts (one per line)"])
    return prompts


def prompt_label(caption: str, class_names: tuple[str, ...]) -> int | None:
    """The class a ``shapes`` prompt asks for (through :func:`tokenloom.data.parse_caption`), or None."""
    from ..blocks.data import parse_caption

    parsed = parse_caption(caption)
    if parsed is None or parsed["class"] not in class_names:
        return None
    return class_names.index(parsed["class"])


def generation_table(conditioner: Any, holdout: Any, n: int, *, prompts: list[str] | None = None,
                     pick: torch.Tensor | None = None) -> ConditionTable:
    """What image ``i`` of ``n`` is generated from: with class labels, class ``i mod n_classes``
    (or the label of held-out image ``pick[i]`` when regenerating a region); with captions,
    prompt ``i mod len(prompts)`` (default prompts: the held-out set's distinct captions;
    ``pick``: held-out image ``pick[i]``'s own caption). ``labels`` are the classes asked for,
    where known (the ``shapes-oracle`` reads them)."""
    if reads_labels(conditioner):
        n_classes = int(holdout.n_classes)
        labels = holdout.labels[pick].long() if pick is not None else torch.arange(n) % n_classes
        table = [Condition(label=i) for i in range(n_classes)]
        prefix = None if conditioner is None else conditioner.encode(table)
        return ConditionTable(table, labels, prefix, labels)
    if pick is not None:
        conds = [conditions_of(holdout)[int(i)] for i in pick]
        return _distinct(conditioner, conds, holdout.labels[pick].long())
    if prompts is None:
        _check_captions(conditioner, holdout, "conditioner")
        seen: dict[str, None] = {}
        for c in holdout.captions:
            seen.setdefault(str(c))
        prompts = list(seen)
    names = tuple(holdout.class_names)
    table = [Condition(caption=p) for p in prompts]
    index = torch.arange(n) % len(table)
    found = [prompt_label(p, names) for p in prompts]
    labels = None if any(x is None for x in found) else torch.tensor(found, dtype=torch.long)[index]
    return ConditionTable(table, index, conditioner.encode(table), labels)


def install(models: list[Any], conditioner: Any, table: ConditionTable) -> None:
    """Make ``table`` the condition table of each backbone (the trained model and its auxiliary
    models; bare or wrapped in :class:`~tokenloom.backbone.instrumented.InstrumentedModel`)."""
    if conditioner is None or table.prefix is None:
        return
    null = conditioner.null()
    for m in models:
        getattr(m, "model", m).set_conditions(table.prefix, null)


def conditioner_state(conditioner: Any) -> str:
    """The conditioner's fitted state as JSON (saved beside the trained model)."""
    return json.dumps(conditioner.state(), sort_keys=True)


def quiet_encode(conditioner: Any, conds: list[Condition]) -> Prefix:
    """``conditioner.encode`` with its warnings silenced (the held-out conditions: unknown
    words there are expected and not the user's prompt)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return conditioner.encode(conds)


def heldout_table(conditioner: Any, holdout: Any) -> ConditionTable:
    """The held-out images' own conditions (for their likelihood)."""
    if reads_labels(conditioner):
        return generation_table(conditioner, holdout, len(holdout), pick=torch.arange(len(holdout)))
    conds = conditions_of(holdout)
    key: dict[str, int] = {}
    table, index = [], []
    for c in conds:
        if c.caption not in key:
            key[c.caption] = len(table)
            table.append(c)
        index.append(key[c.caption])
    return ConditionTable(table, torch.tensor(index, dtype=torch.long), quiet_encode(conditioner, table),
                          holdout.labels.long())


def describe_conditions(conditioner: Any, table: ConditionTable) -> list[str]:
    """A short name per table row (captions, or class names)."""
    if conditioner is None:
        return [str(c.label) for c in table.conditions]
    return [conditioner.describe(c) for c in table.conditions]


def check_index(table: ConditionTable) -> None:
    """Every image's row lies in the table (a bug otherwise, said clearly)."""
    if table.index.numel() and (int(table.index.min()) < 0 or int(table.index.max()) >= table.n_rows):
        raise InputError(f"condition index outside the table of {table.n_rows} rows")


__all__ = [
    "ConditionTable",
    "build_conditioner",
    "conditioner_state",
    "conditions_of",
    "describe_conditions",
    "generation_table",
    "heldout_table",
    "install",
    "prompt_label",
    "read_prompts",
    "reads_labels",
    "training_table",
]
