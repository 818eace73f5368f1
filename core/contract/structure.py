"""Structuring config tables into attrs classes through cattrs, every problem reported.

:func:`structure_config` turns one table (a ``dict`` from TOML or keyword
arguments) into an attrs class — a component's nested ``Config`` or a
``[data]``/``[model]``/``[train]`` section — and raises one
:class:`~tokenloom.errors.ConfigError` listing every problem, one line each,
starting with the key's path. Types are strict: ``3.5`` is not an int, ``"3"``
is not a number, ``1`` is not a bool; unknown keys are errors.

Used by the registry (building a component, :func:`tokenloom.create`) and by
the run config (:mod:`tokenloom.config`); it imports neither.
"""

from __future__ import annotations

import difflib
from typing import Any

import attrs
import cattrs
from cattrs.errors import ClassValidationError, IterableValidationError

from .errors import ConfigError


class _Mismatch(TypeError):
    """A value of the wrong primitive type (its message is shown as is)."""


def describe(value: Any) -> str:
    """How a config value is named in an error message: ``a table``, ``a list`` or its repr."""
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def _strict_int(value: Any, _t: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Mismatch(f"expected int, got {describe(value)}")
    return value


def _strict_float(value: Any, _t: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Mismatch(f"expected float, got {describe(value)}")
    return float(value)


def _strict_bool(value: Any, _t: Any) -> bool:
    if not isinstance(value, bool):
        raise _Mismatch(f"expected bool (true/false), got {describe(value)}")
    return value


def _strict_str(value: Any, _t: Any) -> str:
    if not isinstance(value, str):
        raise _Mismatch(f"expected string, got {describe(value)}")
    return value


def make_converter() -> cattrs.Converter:
    """The cattrs converter used for every config table: strict primitives,
    unknown keys forbidden, detailed validation."""
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    conv.register_structure_hook(int, _strict_int)
    conv.register_structure_hook(float, _strict_float)
    conv.register_structure_hook(bool, _strict_bool)
    conv.register_structure_hook(str, _strict_str)
    return conv


converter = make_converter()


def format_error(exc: BaseException, path: str) -> list[str]:
    """Flatten a cattrs exception tree (or any exception) into ``path: message`` lines."""
    if isinstance(exc, (ClassValidationError, IterableValidationError)):
        lines: list[str] = []

        def fmt(e: BaseException, _type: Any) -> str:
            return str(e) if isinstance(e, (_Mismatch, ValueError, TypeError)) else f"{type(e).__name__}: {e}"

        for msg in cattrs.transform_error(exc, path=path, format_exception=fmt):
            if " @ " in msg:
                text, where = msg.rsplit(" @ ", 1)
                lines.append(f"{where}: {text}")
            else:
                lines.append(msg)
        return lines
    return [f"{path}: {exc}"]


def structure_config(cls: type, table: Any, path: str) -> Any:
    """Structure ``table`` into the attrs class ``cls``, checking every key.

    All problems (unknown keys, wrong types, failed validators) are collected
    and raised together as one :class:`ConfigError`."""
    if not isinstance(table, dict):
        raise ConfigError([f"{path}: expected a table, got {describe(table)}"])
    attrs.resolve_types(cls)
    fields = {f.name: f for f in attrs.fields(cls) if f.init}
    aliases = {f.alias if getattr(f, "alias", None) else f.name: f for f in fields.values()}
    problems: list[str] = []
    values: dict[str, Any] = {}
    for key, value in table.items():
        f = aliases.get(key)
        if f is None:
            close = difflib.get_close_matches(key, list(aliases), n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'? " if close else ""
            known = ", ".join(sorted(aliases)) or "none"
            problems.append(f"{path}.{key}: unknown key ({hint}known keys: {known})")
            continue
        try:
            if attrs.has(f.type) if isinstance(f.type, type) else False:
                v = structure_config(f.type, value, f"{path}.{key}")
            else:
                v = converter.structure(value, f.type) if f.type is not None else value
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        except Exception as exc:  # noqa: BLE001 - cattrs raises many kinds
            problems.extend(format_error(exc, f"{path}.{key}"))
            continue
        if f.validator is not None:
            try:
                f.validator(None, f, v)
            except (ValueError, TypeError) as exc:
                problems.append(f"{path}.{key}: {exc}")
                continue
        values[key] = v
    if problems:
        raise ConfigError(problems)
    try:
        return cls(**values)
    except ConfigError as exc:
        raise ConfigError([p if p.startswith(path) else f"{path}: {p}" for p in exc.problems]) from None
    except (ValueError, TypeError) as exc:
        raise ConfigError([f"{path}: {exc}"]) from None


__all__ = ["converter", "describe", "format_error", "make_converter", "structure_config"]
