"""Run configuration: TOML -> attrs through cattrs, every problem reported.

:func:`load_config` reads a TOML file and returns a :class:`RunConfig`, or
raises one :class:`~tokenloom.errors.ConfigError` listing *all* problems of
the file, one line each, starting with the path of the key::

    tokenizer.codebook_size: expected int, got 'big'
    sampler[1].name: unknown sampler 'topk' (did you mean 'top-k'? available: ...)
    train.stpes: unknown key (did you mean 'steps'?)

Component tables (``[tokenizer]``, ``[generator]``, ``[[sampler]]``, ``[head]``,
``[metrics.<name>]``) are structured into the registered class's nested
``Config``; unknown keys are errors. Types are strict: ``3.5`` is not an int,
``"3"`` is not a number, ``1`` is not a bool (see :mod:`tokenloom.contract.structure`).
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path
from typing import Any

import attrs

from .errors import ConfigError, TokenloomError
from .registry import build_component, get_registry  # build_component: re-exported (its old path)
from .structure import describe, structure_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@attrs.frozen
class ComponentConfig:
    """A component table: its registered ``name``, the raw ``options`` as
    written (for hashing and reports) and the structured ``config``."""

    name: str
    options: dict[str, Any] = attrs.field(factory=dict, eq=False)
    config: Any = attrs.field(default=None, eq=False)

    def table(self) -> dict[str, Any]:
        """The table as a user would write it."""
        return {"name": self.name, **self.options}


# ---------------------------------------------------------------------------
# The run config
# ---------------------------------------------------------------------------


def _positive(_inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"must be > 0, got {value}")


def _non_negative(_inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value < 0:
        raise ValueError(f"must be >= 0, got {value}")


def _one_of(*choices: str):
    def check(_inst: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value not in choices:
            close = difflib.get_close_matches(str(value), choices, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ValueError(f"must be one of {', '.join(choices)}; got {value!r} {hint}".rstrip())

    return check


@attrs.frozen
class DataConfig:
    """``[data]``: which images to train on and evaluate against."""

    name: str = "shapes"
    size: int = attrs.field(default=32, validator=_positive)
    n: int = attrs.field(default=4000, validator=_positive)
    n_holdout: int = attrs.field(default=500, validator=_non_negative)
    path: str | None = None
    channels: int = attrs.field(default=3, validator=_positive)
    #: ``shapes``: combinations ("red square", "3 triangles", "blue circle") whose images are left out of
    #: the training split (the held-out split keeps them): compositional generalisation
    holdout_combos: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    # streamed data sets (``folder``, ``hf``; :mod:`tokenloom.blocks.streaming`):
    #: a file that cannot be read as an image: ``"error"`` (the default) or ``"skip"`` (left out, counted)
    unreadable: str = attrs.field(default="error", validator=_one_of("error", "skip"))
    #: an image smaller than ``size``: ``"upscale"`` (the default; counted in a warning) or ``"error"``
    small: str = attrs.field(default="upscale", validator=_one_of("upscale", "error"))
    #: ``"bilinear"`` (centre-crop to a square, bilinear resize; the in-memory folder's) or ``"adm"``
    #: (ADM/LlamaGen ``center_crop_arr``: box halving, bicubic resize, centre crop)
    resize: str = attrs.field(default="bilinear", validator=_one_of("bilinear", "adm"))
    #: random horizontal flips of the images a tokenizer is fitted on (streamed sets only)
    flip: bool = False
    #: DataLoader worker processes that decode streamed images (0: in the main process); not in any key
    workers: int = attrs.field(default=2, validator=_non_negative)
    #: ``hf``: the image, label and caption columns (None: found by feature type or name)
    image_column: str | None = None
    label_column: str | None = None
    caption_column: str | None = None


#: ``[data]`` options of the streamed data sets, left out of config dicts and cache keys at their defaults
STREAM_OPTIONS: tuple[str, ...] = ("unreadable", "small", "resize", "flip", "workers", "image_column",
                                   "label_column", "caption_column")
_DATA_DEFAULTS = {k: attrs.fields_dict(DataConfig)[k].default for k in STREAM_OPTIONS}


@attrs.frozen
class ModelConfig:
    """``[model]``: the backbone transformer."""

    n_layer: int = attrs.field(default=4, validator=_positive)
    d_model: int = attrs.field(default=256, validator=_positive)
    n_head: int = attrs.field(default=4, validator=_positive)
    dropout: float = attrs.field(default=0.0, validator=_non_negative)
    #: positions: LlamaGen's 2-D RoPE, or ``"learned"`` (an embedding per flat code position; on a
    #: multi-scale layout, with the per-scale embedding every layout gets, VAR's ``pos_1LC`` +
    #: ``lvl_embed``, the class token's no-position row its ``pos_start``)
    pos: str = attrs.field(default="rope2d", validator=_one_of("rope2d", "learned"))
    #: how the condition reaches the blocks: ``"prefix"`` (the conditioner's prefix in front of the
    #: sequence only) or ``"adaln"`` (the prefix, and VAR's adaptive LayerNorm in every block and
    #: before the heads from the condition vector: tokenloom.backbone.adaln)
    cond: str = attrs.field(default="prefix", validator=_one_of("prefix", "adaln"))

    def key(self) -> dict:
        """The config as cache keys read it: every field, except options added
        later while they have their default (so existing runs keep their keys)."""
        out = attrs.asdict(self)
        for name, default in _MODEL_LATER_DEFAULTS.items():
            if out.get(name) == default:
                del out[name]
        return out

    def __attrs_post_init__(self) -> None:
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")


#: ``[model]`` options added after cache keys were first written, with the default that leaves them out
_MODEL_LATER_DEFAULTS = {"cond": "prefix"}


@attrs.frozen
class TrainConfig:
    """``[train]``: optimisation of the backbone."""

    steps: int = attrs.field(default=2000, validator=_positive)
    batch_size: int = attrs.field(default=64, validator=_positive)
    lr: float = attrs.field(default=3e-4, validator=_positive)
    weight_decay: float = attrs.field(default=0.05, validator=_non_negative)
    warmup: int = attrs.field(default=100, validator=_non_negative)
    grad_clip: float = attrs.field(default=1.0, validator=_non_negative)
    label_dropout: float = attrs.field(default=0.1, validator=_non_negative)
    bf16: bool = False
    compile: bool = False


@attrs.frozen
class RunConfig:
    """A whole run: one tokenizer, one generator, a sampler chain, metrics."""

    seed: int = 0
    data: DataConfig = DataConfig()
    tokenizer: ComponentConfig = ComponentConfig("pixel")
    generator: ComponentConfig | None = None
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    sampler: tuple[ComponentConfig, ...] = ()
    metrics: tuple[ComponentConfig, ...] = ()
    n_samples: int = 64
    device: str = "auto"
    #: ``[conditioner]``: what a row is conditioned on (None: ``class``, the class label)
    conditioner: ComponentConfig | None = None
    #: ``[metrics] prompts``: a text file of prompts (one per line) to generate from, or None
    prompts: str | None = None
    #: ``[head]``: what turns the backbone's hidden state into a token (None: ``categorical``, the
    #: linear layer + sampler chain of every discrete run); ``diffusion``/``flow`` for continuous tokens
    head: ComponentConfig | None = None

    @property
    def head_name(self) -> str:
        """The run's head (``categorical`` unless ``[head]`` names another)."""
        return "categorical" if self.head is None else self.head.name


_TOP_KEYS = ("seed", "data", "tokenizer", "generator", "model", "train", "sampler", "metrics", "device",
             "conditioner", "head")


def _component(registry: Any, kind: str, table: Any, path: str, problems: list[str]) -> ComponentConfig | None:
    if not isinstance(table, dict):
        problems.append(f"{path}: expected a table with a 'name' key, got {describe(table)}")
        return None
    if "name" not in table:
        problems.append(f"{path}.name: missing (available: {', '.join(registry.available(kind)) or 'none'})")
        return None
    name = table["name"]
    if not isinstance(name, str):
        problems.append(f"{path}.name: expected string, got {describe(name)}")
        return None
    options = {k: v for k, v in table.items() if k != "name"}
    try:
        entry = registry.get(kind, name)
    except TokenloomError as exc:
        problems.append(f"{path}.name: {exc}")
        return None
    try:
        cfg = structure_config(entry.cls.Config, options, path)
    except ConfigError as exc:
        problems.extend(exc.problems)
        return None
    return ComponentConfig(name, options, cfg)


def _section(cls: type, raw: dict[str, Any], key: str, problems: list[str]) -> Any:
    if key not in raw:
        return cls()
    try:
        return structure_config(cls, raw[key], key)
    except ConfigError as exc:
        problems.extend(exc.problems)
        return cls()


def parse_config(raw: dict[str, Any], *, registry: Any = None, source: str | None = None) -> RunConfig:
    """Structure a parsed TOML document into a :class:`RunConfig`, collecting
    every problem into one :class:`ConfigError`."""
    registry = registry or get_registry()
    problems: list[str] = []
    for key in raw:
        if key not in _TOP_KEYS:
            close = difflib.get_close_matches(key, _TOP_KEYS, n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'? " if close else ""
            problems.append(f"{key}: unknown key ({hint}known keys: {', '.join(_TOP_KEYS)})")

    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        problems.append(f"seed: expected a non-negative int, got {describe(seed)}")
        seed = 0
    device = raw.get("device", "auto")
    if not isinstance(device, str):
        problems.append(f"device: expected string ('auto', 'cpu', 'cuda', 'cuda:1'), got {describe(device)}")
        device = "auto"

    data = _section(DataConfig, raw, "data", problems)
    model = _section(ModelConfig, raw, "model", problems)
    train = _section(TrainConfig, raw, "train", problems)

    tokenizer = _component(registry, "tokenizer", raw.get("tokenizer", {"name": "pixel"}), "tokenizer", problems)
    generator = None
    if "generator" in raw:
        generator = _component(registry, "generator", raw["generator"], "generator", problems)
    conditioner = None
    if "conditioner" in raw:
        conditioner = _component(registry, "conditioner", raw["conditioner"], "conditioner", problems)
    head = None
    if "head" in raw:
        head = _component(registry, "head", raw["head"], "head", problems)

    samplers: list[ComponentConfig] = []
    chain = raw.get("sampler", [])
    if isinstance(chain, dict):
        chain = [chain]
    if not isinstance(chain, list):
        problems.append(f"sampler: expected an array of tables ([[sampler]]), got {describe(chain)}")
        chain = []
    for i, table in enumerate(chain):
        c = _component(registry, "sampler", table, f"sampler[{i}]", problems)
        if c is not None:
            samplers.append(c)
    n_accept = [c.name for c in samplers if registry.get("sampler", c.name).cls.role == "acceptance"]
    if len(n_accept) > 1:
        problems.append(f"sampler: a chain holds at most one acceptance rule, got {', '.join(n_accept)}")

    metrics: list[ComponentConfig] = []
    n_samples = 64
    mraw = raw.get("metrics", {})
    if not isinstance(mraw, dict):
        problems.append(f"metrics: expected a table, got {describe(mraw)}")
        mraw = {}
    names = mraw.get("names", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        problems.append(f"metrics.names: expected a list of strings, got {describe(names)}")
        names = []
    prompts = mraw.get("prompts")
    if prompts is not None and not isinstance(prompts, str):
        problems.append(f"metrics.prompts: expected a path to a text file (one prompt per line), got "
                        f"{describe(prompts)}")
        prompts = None
    if "n_samples" in mraw:
        n_samples = mraw["n_samples"]
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples <= 0:
            problems.append(f"metrics.n_samples: expected a positive int, got {describe(n_samples)}")
            n_samples = 64
    for key, value in mraw.items():
        if key in ("names", "n_samples", "prompts"):
            continue
        if not isinstance(value, dict):
            problems.append(f"metrics.{key}: unknown key (known keys: names, n_samples, prompts, or a "
                            "[metrics.<name>] table)")
        elif key not in names:
            problems.append(f"metrics.{key}: options for a metric that is not in metrics.names")
    for i, name in enumerate(names):
        table = {"name": name, **(mraw.get(name) or {})}
        path = f"metrics.{name}" if name in mraw else f"metrics.names[{i}]"
        c = _component(registry, "metric", table, path, problems)
        if c is not None:
            metrics.append(c)

    if problems:
        raise ConfigError(problems, source=source)
    return RunConfig(
        seed=seed,
        data=data,
        tokenizer=tokenizer,
        generator=generator,
        model=model,
        train=train,
        sampler=tuple(samplers),
        metrics=tuple(metrics),
        n_samples=n_samples,
        device=device,
        conditioner=conditioner,
        prompts=prompts,
        head=head,
    )


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file; a missing file, a directory, a syntax error or
    bytes that are not UTF-8 are a ConfigError."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError([f"no such file: {path}"]) from None
    except IsADirectoryError:
        raise ConfigError([f"expected a TOML file, got a directory: {path}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"invalid TOML: {exc}"], source=str(path)) from None
    except UnicodeDecodeError as exc:
        bad = exc.object[exc.start:exc.start + 1].hex()
        raise ConfigError([(f"not UTF-8 text (byte 0x{bad} at position {exc.start}): TOML files are UTF-8; "
                            "save the file as UTF-8")], source=str(path)) from None


def load_config(path: str | Path, *, registry: Any = None) -> RunConfig:
    """Read and validate a run config file (see the module docstring). An
    empty file, and a grid file (it has a ``[grid]`` table: ``tokenloom
    ablate`` runs it), are a ConfigError."""
    raw = read_toml(path)
    if not raw:
        raise ConfigError([("the file is empty: a run needs at least [data], [tokenizer] and [generator] tables "
                            "(see the README's Configuration section)")], source=str(path))
    if "grid" in raw:
        raise ConfigError([("grid: this is a grid file (it has a [grid] table): run it with `tokenloom ablate`, "
                            "check it with `tokenloom check`")], source=str(path))
    return parse_config(raw, registry=registry, source=str(path))


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """A JSON/TOML-able dict that :func:`parse_config` maps back to ``cfg``."""
    out: dict[str, Any] = {
        "seed": cfg.seed,
        "device": cfg.device,
        "data": attrs.asdict(cfg.data),
        "model": cfg.model.key(),  # options added later: absent at their defaults (run ids as before)
        "train": attrs.asdict(cfg.train),
        "tokenizer": cfg.tokenizer.table(),
        "sampler": [s.table() for s in cfg.sampler],
        "metrics": {"names": [m.name for m in cfg.metrics], "n_samples": cfg.n_samples},
    }
    if out["data"]["path"] is None:
        del out["data"]["path"]
    if not out["data"]["holdout_combos"]:  # absent unless used: run ids as before
        del out["data"]["holdout_combos"]
    else:
        out["data"]["holdout_combos"] = list(out["data"]["holdout_combos"])
    for k in STREAM_OPTIONS:  # the streamed data sets' options: absent at their defaults (run ids as before)
        if out["data"][k] == _DATA_DEFAULTS[k]:
            del out["data"][k]
    if cfg.generator is not None:
        out["generator"] = cfg.generator.table()
    if cfg.conditioner is not None:  # absent = class labels (the dict, and so every run id, as before)
        out["conditioner"] = cfg.conditioner.table()
    if cfg.prompts is not None:
        out["metrics"]["prompts"] = cfg.prompts
    if cfg.head is not None and (cfg.head.name != "categorical" or cfg.head.options):
        out["head"] = cfg.head.table()  # absent for the default head: run ids as before heads
    for m in cfg.metrics:
        if m.options:
            out["metrics"][m.name] = dict(m.options)
    return out


__all__ = [
    "ComponentConfig",
    "DataConfig",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "build_component",
    "config_to_dict",
    "load_config",
    "parse_config",
    "read_toml",
    "structure_config",
]
