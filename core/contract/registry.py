"""The component registry: discovers plugins through entry points, one at a
time, so that one broken plugin is recorded instead of taking the host down.

The global registry is built lazily by :func:`get_registry` on first use —
never at ``import tokenloom``. Tests and embedders can build their own from
named plugin modules with :meth:`Registry.from_plugins`.

Environment:

- ``TOKENLOOM_STRICT_PLUGINS=1``: any load failure raises :class:`PluginError`
  naming the plugin and its distribution (a value other than
  ``1/true/yes/on/0/false/no/off`` is warned about and counts as off);
- ``TOKENLOOM_DISABLE_PLUGINS=a,b``: skip the entry points named ``a`` and ``b``
  (a name that is no installed plugin is warned about, with the closest
  name; a disabled component asked for is reported as disabled, not unknown).
"""

from __future__ import annotations

import difflib
import os
import re
import threading
from collections.abc import Iterable
from importlib import metadata
from typing import Any

import attrs
import pluggy

from . import hookspecs
from .errors import ConfigError, PluginError, TokenloomError, UnknownComponentError
from .interfaces import BASES, KINDS
from .structure import structure_config

GROUP = "tokenloom"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


@attrs.frozen
class Entry:
    """One registered component and where it came from."""

    kind: str
    name: str
    cls: type
    plugin: str
    dist: str
    version: str

    @property
    def module(self) -> str:
        return self.cls.__module__

    def as_dict(self) -> dict[str, str]:
        return {
            "kind": self.kind,
            "name": self.name,
            "class": f"{self.cls.__module__}.{self.cls.__qualname__}",
            "module": self.module,
            "plugin": self.plugin,
            "distribution": self.dist,
            "version": self.version,
        }


@attrs.frozen
class Failure:
    """A plugin that could not be loaded, or something it registered that was
    rejected."""

    plugin: str
    dist: str
    version: str
    value: str
    stage: str  # "import", "register-plugin", "hook", "component", "duplicate"
    error: str

    def describe(self) -> str:
        return f"plugin '{self.plugin}' ({self.dist} {self.version}, {self.value}): {self.stage}: {self.error}"

    def as_dict(self) -> dict[str, str]:
        return attrs.asdict(self)


@attrs.frozen
class PluginSource:
    """A plugin to load: its entry point name, distribution and a loader."""

    name: str
    dist: str
    version: str
    value: str
    load: Any  # () -> module or object with hook implementations


def _validate_component(kind: str, name: Any, cls: Any) -> str | None:
    """Why ``cls`` cannot be registered as ``name``, or None if it can."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        return (
            f"invalid {kind} name {name!r}: use lower case letters, digits, '-', '_' and '.', "
            "starting with a letter or digit"
        )
    base = BASES[kind]
    if not isinstance(cls, type):
        return f"{kind} '{name}': expected a class deriving from tokenloom.{base.__name__}, got {cls!r}"
    if not issubclass(cls, base):
        return f"{kind} '{name}': class {cls.__qualname__} does not derive from tokenloom.{base.__name__}"
    config = getattr(cls, "Config", None)
    if not (isinstance(config, type) and attrs.has(config)):
        return f"{kind} '{name}': class {cls.__qualname__} has no nested attrs class 'Config'"
    if kind == "sampler" and getattr(cls, "role", None) not in ("processor", "acceptance"):
        return f"sampler '{name}': role must be 'processor' or 'acceptance', got {getattr(cls, 'role', None)!r}"
    if kind == "head":
        for flag in ("continuous", "exact_likelihood"):
            if not isinstance(getattr(cls, flag, None), bool):
                return f"head '{name}': class attribute {flag} must be a bool, got {getattr(cls, flag, None)!r}"
    return None


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


def _warn(message: str) -> None:
    import sys

    print(f"[tokenloom] warning: {message}", file=sys.stderr, flush=True)


def env_flag(name: str) -> bool:
    """A yes/no environment variable: ``1/true/yes/on`` or ``0/false/no/off``
    (any case; unset = no). Anything else is warned about on stderr (naming
    the values it takes) and counts as no."""
    value = os.environ.get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value not in _FALSE:
        _warn(f"{name}={os.environ[name]!r} is not a yes/no value (1, true, yes, on / 0, false, no, off): "
              "taken as off")
    return False


class Registry:
    """Components by kind and name, with the record of what failed to load."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Entry]] = {k: {} for k in KINDS}
        self._conflicts: dict[tuple[str, str], list[Entry]] = {}
        self.failures: list[Failure] = []
        self.plugins: list[PluginSource] = []
        self.disabled: list[str] = []
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)

    # -- building -----------------------------------------------------------

    @classmethod
    def from_entry_points(
        cls,
        group: str = GROUP,
        *,
        disabled: Iterable[str] | None = None,
        strict: bool | None = None,
    ) -> Registry:
        """Walk the entry points of ``group`` one by one (defaults from the
        environment variables described in the module docstring)."""
        if disabled is None:
            disabled = [s.strip() for s in os.environ.get("TOKENLOOM_DISABLE_PLUGINS", "").split(",") if s.strip()]
        if strict is None:
            strict = env_flag("TOKENLOOM_STRICT_PLUGINS")
        disabled = set(disabled)
        sources = []
        reg = cls()
        points = sorted(metadata.entry_points(group=group), key=lambda e: e.name)
        for ep in points:
            dist = getattr(ep, "dist", None)
            dname = dist.metadata["Name"] if dist is not None else "unknown"
            dver = dist.version if dist is not None else "unknown"
            if ep.name in disabled:
                reg.disabled.append(ep.name)
                continue
            sources.append(PluginSource(ep.name, dname, dver, ep.value, ep.load))
        names = [ep.name for ep in points]
        for typo in sorted(disabled - set(names)):  # a typo would otherwise disable nothing, silently
            close = difflib.get_close_matches(typo, names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            _warn(f"TOKENLOOM_DISABLE_PLUGINS names '{typo}', which is no installed plugin{hint}; "
                  "`tokenloom plugins` lists them")
        reg._load(sources, strict=strict)
        return reg

    @classmethod
    def from_plugins(
        cls, plugins: Iterable[tuple[str, Any]], *, dist: str = "local", version: str = "0", strict: bool = False
    ) -> Registry:
        """Build a registry from ``(name, module_or_object)`` pairs — what the
        test suite uses so that it does not depend on whatever happens to be
        installed."""
        sources = [
            PluginSource(name, dist, version, getattr(obj, "__name__", repr(obj)), (lambda o=obj: o))
            for name, obj in plugins
        ]
        reg = cls()
        reg._load(sources, strict=strict)
        return reg

    def _fail(self, src: PluginSource, stage: str, error: str) -> None:
        self.failures.append(Failure(src.name, src.dist, src.version, src.value, stage, error))

    def _load(self, sources: list[PluginSource], *, strict: bool) -> None:
        loaded: list[tuple[PluginSource, Any]] = []
        for src in sources:
            try:
                obj = src.load()
            except BaseException as exc:  # a plugin may raise anything, even SystemExit
                if isinstance(exc, KeyboardInterrupt):
                    raise
                self._fail(src, "import", f"{type(exc).__name__}: {exc}")
                continue
            try:
                self.pm.register(obj, name=src.name)
            except Exception as exc:  # noqa: BLE001
                self._fail(src, "register-plugin", f"{type(exc).__name__}: {exc}")
                continue
            self.plugins.append(src)
            loaded.append((src, obj))

        for kind in KINDS:
            caller = getattr(self.pm.hook, hookspecs.HOOKS[kind])
            impls = {impl.plugin_name: impl for impl in caller.get_hookimpls()}
            for src, _obj in loaded:
                impl = impls.get(src.name)
                if impl is None:
                    continue
                pending: list[tuple[str, type]] = []

                def register(name: str, component: type, _pending=pending) -> None:
                    _pending.append((name, component))

                try:
                    impl.function(**{arg: register for arg in impl.argnames})
                except Exception as exc:  # noqa: BLE001
                    self._fail(src, "hook", f"{hookspecs.HOOKS[kind]} raised {type(exc).__name__}: {exc}")
                    continue
                for name, component in pending:
                    problem = _validate_component(kind, name, component)
                    if problem:
                        self._fail(src, "component", problem)
                        continue
                    self._add(Entry(kind, name, component, src.name, src.dist, src.version))

        if strict and self.failures:
            raise PluginError(
                "plugin loading failed (TOKENLOOM_STRICT_PLUGINS is set):\n"
                + "\n".join(f"  {f.describe()}" for f in self.failures)
            )

    def _add(self, entry: Entry) -> None:
        table = self._entries[entry.kind]
        key = (entry.kind, entry.name)
        if key in self._conflicts:
            self._conflicts[key].append(entry)
        elif entry.name in table:
            first = table.pop(entry.name)
            self._conflicts[key] = [first, entry]
        else:
            table[entry.name] = entry
            return
        entries = self._conflicts[key]
        who = " and ".join(f"distribution '{e.dist}' (plugin '{e.plugin}')" for e in entries)
        src = PluginSource(entry.plugin, entry.dist, entry.version, entry.module, None)
        self._fail(src, "duplicate", f"{entry.kind} name '{entry.name}' is registered by {who}")

    # -- queries ------------------------------------------------------------

    @staticmethod
    def check_kind(kind: str) -> str:
        """``kind`` as registered (``"samplers"`` -> ``"sampler"``); an unknown kind raises
        :class:`~tokenloom.UnknownComponentError` listing the kinds."""
        if kind not in KINDS:
            singular = kind.removesuffix("s")
            if singular in KINDS:
                return singular
            raise UnknownComponentError(f"unknown component kind {kind!r} (kinds: {', '.join(KINDS)})")
        return kind

    def available(self, kind: str) -> list[str]:
        kind = self.check_kind(kind)
        return sorted(self._entries[kind])

    def entries(self, kind: str | None = None) -> list[Entry]:
        kinds = KINDS if kind is None else (self.check_kind(kind),)
        return [e for k in kinds for _, e in sorted(self._entries[k].items())]

    def unknown_message(self, kind: str, name: Any) -> str:
        kind = self.check_kind(kind)
        if name in self.disabled:
            return (f"{kind} '{name}' is disabled by TOKENLOOM_DISABLE_PLUGINS (remove '{name}' from it to use "
                    "this component)")
        names = self.available(kind)
        close = difflib.get_close_matches(str(name), names, n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'? " if close else ""
        listing = ", ".join(names) if names else "none registered"
        return f"unknown {kind} {name!r} ({hint}available: {listing})"

    def get(self, kind: str, name: str) -> Entry:
        kind = self.check_kind(kind)
        if (kind, name) in self._conflicts:
            who = " and ".join(f"'{e.dist}' (plugin '{e.plugin}')" for e in self._conflicts[(kind, name)])
            raise PluginError(
                f"{kind} '{name}' is registered by several distributions: {who}; "
                "uninstall one or skip it with TOKENLOOM_DISABLE_PLUGINS=<plugin>"
            )
        try:
            return self._entries[kind][name]
        except KeyError:
            raise UnknownComponentError(self.unknown_message(kind, name)) from None

    def report(self) -> dict[str, Any]:
        """What was loaded, from which distribution and version, and what failed."""
        plugins = []
        for src in self.plugins:
            comps = {k: sorted(e.name for e in self._entries[k].values() if e.plugin == src.name) for k in KINDS}
            plugins.append(
                {
                    "name": src.name,
                    "distribution": src.dist,
                    "version": src.version,
                    "value": src.value,
                    "components": {k: v for k, v in comps.items() if v},
                }
            )
        return {
            "components": {k: [e.as_dict() for e in self.entries(k)] for k in KINDS},
            "plugins": plugins,
            "failures": [f.as_dict() for f in self.failures],
            "disabled": sorted(self.disabled),
        }


# ---------------------------------------------------------------------------
# Building a component
# ---------------------------------------------------------------------------

_CONTEXT_KEYS = {"tokenizer": ("image_shape",), "generator": ("tokenizer",), "sampler": (), "metric": (),
                 "conditioner": ("n_classes", "class_names"),
                 "head": ("hidden_dim", "token_dim", "vocab_size")}


def build_component(registry: Any, kind: str, name: Any, table: dict[str, Any], *, path: str) -> Any:
    """Look up ``name`` of ``kind`` in ``registry``, structure ``table`` into
    its ``Config`` and build it (see :func:`tokenloom.create`)."""
    kind = registry.check_kind(kind)
    table = dict(table)
    ctx = {k: table.pop(k) for k in _CONTEXT_KEYS[kind] if k in table}
    entry = registry.get(kind, name)
    cfg = structure_config(entry.cls.Config, table, path)
    if kind == "tokenizer":
        ctx.setdefault("image_shape", (3, 32, 32))
    if kind == "generator" and "tokenizer" not in ctx:
        raise ConfigError([f"{path}: a generator needs tokenizer=<a Tokenizer instance>"])
    if kind == "head" and "hidden_dim" not in ctx:
        raise ConfigError([f"{path}: a head needs hidden_dim=<the backbone width> (and token_dim or vocab_size)"])
    try:
        return entry.cls(cfg, **ctx)
    except ConfigError as exc:
        raise ConfigError([p if p.startswith(path) else f"{path}: {p}" for p in exc.problems]) from None
    except (ValueError, TypeError) as exc:
        if isinstance(exc, TokenloomError):
            raise
        raise ConfigError([f"{path} ({name}): {exc}"]) from None


_lock = threading.Lock()
_registry: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, built from entry points on first call."""
    global _registry
    if _registry is None:
        with _lock:
            if _registry is None:
                _registry = Registry.from_entry_points()
    return _registry


def set_registry(registry: Registry | None) -> Registry | None:
    """Replace the process-wide registry (None: rebuild on next use). Returns
    the previous one — for tests and embedders."""
    global _registry
    with _lock:
        previous, _registry = _registry, registry
    return previous


def available(kind: str) -> list[str]:
    """Names of the registered components of ``kind``."""
    return get_registry().available(kind)


def plugin_report() -> dict[str, Any]:
    """What was loaded, from which distribution and version, and what failed."""
    return get_registry().report()


def create(kind: str, name: str, /, **config: Any) -> Any:
    """Build a component from its name and configuration keys.

    Reserved keyword arguments by kind: ``image_shape=(C, H, W)`` for
    tokenizers (default ``(3, 32, 32)``), ``tokenizer=`` for generators. The
    rest is structured into the class's ``Config``; problems raise
    :class:`~tokenloom.errors.ConfigError` listing each with its key.
    """
    return build_component(get_registry(), kind, name, config, path=kind)
