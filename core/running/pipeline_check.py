"""Checks before any work: composition checks that need the components built
(but nothing trained) — a generator that does not fit its tokenizer, an image
size a tokenizer cannot take — and :func:`preflight`, everything a run refuses
before it trains (a missing ``[generator]``, an unknown data set or a missing
data path, no held-out images, a device that does not exist). Used by
``tokenloom check``, by the ablation planner (per cell) and before any run
starts — which goes on with the components built here (each is built once)."""

from __future__ import annotations

from typing import Any

import attrs

from ..contract.config import RunConfig
from ..contract.errors import ConfigError
from ..contract.registry import build_component, get_registry


def image_shape_of(cfg: RunConfig) -> tuple[int, int, int]:
    """``(C, H, W)`` of the run's images, from ``[data]``."""
    return (cfg.data.channels, cfg.data.size, cfg.data.size)


def build_tokenizer(cfg: RunConfig, registry: Any) -> Any:
    """The run's tokenizer, built (unfitted) for the run's image shape."""
    return build_component(registry, "tokenizer", cfg.tokenizer.name,
                           {**cfg.tokenizer.options, "image_shape": image_shape_of(cfg)}, path="tokenizer")


def build_head(cfg: RunConfig, registry: Any, tokenizer: Any) -> Any:
    """The run's :class:`~tokenloom.interfaces.Head` (``[head]``) for ``tokenizer``: built with
    ``hidden_dim = [model] d_model`` and the tokenizer's ``token_dim`` / ``vocab_size``; a head of
    the other token kind is a ConfigError naming both. None without a ``[head]`` table on a
    discrete tokenizer: the default categorical head is the backbone's own output layer."""
    head_cfg = cfg.head
    continuous = bool(getattr(tokenizer, "continuous", False))
    if head_cfg is None and not continuous:
        return None  # the default: the backbone's own output layer and the sampler chain, as before heads
    if head_cfg is None:
        raise ConfigError([(f"head: tokenizer '{cfg.tokenizer.name}' gives continuous tokens; the default head "
                           "'categorical' models discrete codes: add a [head] table with name = 'diffusion' "
                           "or 'flow'")])
    name, options = head_cfg.name, dict(head_cfg.options)
    cls = registry.get("head", name).cls
    if bool(cls.continuous) != continuous:
        kind = "continuous tokens" if continuous else "discrete codes"
        use = "'diffusion' or 'flow'" if continuous else "'categorical'"
        models = "continuous tokens" if cls.continuous else "discrete codes"
        raise ConfigError([(f"head.name: head '{name}' models {models}, but tokenizer '{cfg.tokenizer.name}' "
                           f"gives {kind} (use head = {use})")])
    return build_component(registry, "head", name, {**options, "hidden_dim": cfg.model.d_model,
                                                    "token_dim": int(getattr(tokenizer, "token_dim", 0) or 0),
                                                    "vocab_size": int(getattr(tokenizer, "vocab_size", 0) or 0)},
                           path="head")


@attrs.define
class Composition:
    """The components of a run, built and checked: the (unfitted) tokenizer, the generator over it
    (None when the config has no ``[generator]``), the sampler chain and the head (None only when
    the tokenizer could not be built)."""

    tokenizer: Any
    generator: Any
    chain: Any
    head: Any = None


def check_composition(cfg: RunConfig, *, source: str | None = None, registry: Any = None) -> Composition:
    """Build the tokenizer, generator and sampler chain (untrained), report
    every composition problem together, and return them."""
    from ..blocks.sampling import build_chain

    registry = registry or get_registry()
    problems: list[str] = []
    tokenizer = generator = chain = None
    try:
        tokenizer = build_tokenizer(cfg, registry)
    except ConfigError as exc:
        problems.extend(exc.problems)
    if cfg.generator is not None and tokenizer is not None:
        try:
            generator = build_component(registry, "generator", cfg.generator.name,
                                        {**cfg.generator.options, "tokenizer": tokenizer}, path="generator")
        except ConfigError as exc:
            problems.extend(exc.problems)
    try:
        chain = build_chain(cfg.sampler, registry=registry)
    except ConfigError as exc:
        problems.extend(exc.problems)
    head = None
    if tokenizer is not None and (cfg.generator is not None or cfg.head is not None):
        # no [generator] and no [head]: a `fit-tokenizer` config, which trains no backbone and needs no head
        try:
            head = build_head(cfg, registry, tokenizer)
        except ConfigError as exc:
            problems.extend(exc.problems)
    if head is not None and head.continuous and chain is not None:
        for i, s in enumerate(chain.samplers):
            if not getattr(s, "continuous_ok", False):
                problems.append(f"sampler[{i}].name: '{cfg.sampler[i].name}' does not apply to the continuous "
                                f"head '{cfg.head_name}' (a continuous head takes only 'cfg' and 'temperature')")
    if problems:
        raise ConfigError(problems, source=source)
    return Composition(tokenizer, generator, chain, head)


def data_problems(cfg: RunConfig) -> list[str]:
    """What :func:`tokenloom.data.load_dataset` and the run would refuse about
    ``[data]``, found without reading any image: an unknown data set name, a
    missing ``path`` (or one that does not exist) for ``folder``/``npz``, and
    ``n_holdout = 0`` (a run scores held-out images)."""
    import difflib
    from pathlib import Path

    from ..blocks.data import DATASETS

    data, problems = cfg.data, []
    if data.name not in DATASETS:
        close = difflib.get_close_matches(str(data.name), DATASETS, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        problems.append(f"data.name: unknown data set {data.name!r} ({hint}available: {', '.join(DATASETS)})")
    elif data.name in ("folder", "npz"):
        what = "a directory '<dir>/<class>/<image>.png'" if data.name == "folder" else "a file '<file>.npz'"
        if not data.path:
            problems.append(f"data.path: the {data.name} data set needs path = {what}")
        else:
            path = Path(data.path).expanduser()
            ok = path.is_dir() if data.name == "folder" else path.is_file()
            if not ok:
                problems.append(f"data.path: no such {'directory' if data.name == 'folder' else 'file'}: {path}")
    if data.n_holdout == 0:
        problems.append("data.n_holdout: the run needs held-out images (for NLL and metrics); set it > 0")
    elif not problems:
        total = _count_images(data)
        if total is not None and data.n_holdout >= total:
            problems.append(f"data.n_holdout: the {data.name} data set has {total} images, so n_holdout = "
                            f"{data.n_holdout} leaves none to train on")
    return problems


def _count_images(data: Any) -> int | None:
    """How many images the data set holds, when that is cheap to know
    without decoding any (``digits``: 1797; ``folder``: the image files of its
    class folders; ``npz``: the shape in the ``images`` array's header);
    None when unknown (``shapes`` is unlimited, an unreadable file is left to
    the loader's own message)."""
    import zipfile
    from pathlib import Path

    import numpy as np

    from ..blocks.data import IMAGE_EXTENSIONS

    if data.name == "digits":
        return 1797
    path = Path(data.path).expanduser() if data.path else None
    try:
        if data.name == "folder" and path is not None:
            return sum(1 for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")
                       for f in d.iterdir() if f.is_file() and not f.name.startswith(".")
                       and f.suffix.lower() in IMAGE_EXTENSIONS)
        if data.name == "npz" and path is not None:
            with zipfile.ZipFile(path) as z, z.open("images.npy") as fh:
                major, _minor = np.lib.format.read_magic(fh)
                read_header = (np.lib.format.read_array_header_1_0 if major == 1
                               else np.lib.format.read_array_header_2_0)
                shape = read_header(fh)[0]  # the header only: no pickle, no data
                return int(shape[0]) if shape else None
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    return None


def preflight(cfg: RunConfig, *, source: str | None = None, registry: Any = None,
              data_given: bool = False, need_generator: bool = True) -> Composition:
    """Everything :func:`tokenloom.pipeline.run` refuses before doing any
    work, reported together (one :class:`ConfigError`): a missing
    ``[generator]`` (there is no default order: a run compares orders, so it
    names one), :func:`data_problems` (skipped when the image sets are handed
    in: ``data_given``), a device that does not exist or is not available,
    and :func:`check_composition`. Returns the built composition.
    ``need_generator=False``: a config for ``tokenloom fit-tokenizer``
    (which trains no backbone)."""
    from .machine import resolve_device

    registry = registry or get_registry()
    problems: list[str] = []
    if cfg.generator is None and need_generator:
        problems.append('generator: a run needs a [generator] table (e.g. name = "raster"); a config for '
                        '`tokenloom fit-tokenizer` needs none: check it with `tokenloom check --fit-tokenizer`')
    if not data_given:
        problems += data_problems(cfg)
    try:
        resolve_device(cfg.device)
    except ConfigError as exc:
        problems.extend(exc.problems)
    parts = None
    try:
        parts = check_composition(cfg, registry=registry)
    except ConfigError as exc:
        problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems, source=source)
    return parts


__all__ = ["Composition", "build_head", "build_tokenizer", "check_composition", "data_problems", "image_shape_of", "preflight"]
