"""Composition checks that need the components built (but nothing trained):
a generator that does not fit its tokenizer, an image size a tokenizer cannot
take. Used by ``tokenloom check``, by the ablation planner and before any run
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


@attrs.define
class Composition:
    """The components of a run, built and checked: the (unfitted) tokenizer, the generator over it
    (None when the config has no ``[generator]``) and the sampler chain."""

    tokenizer: Any
    generator: Any
    chain: Any


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
    if problems:
        raise ConfigError(problems, source=source)
    return Composition(tokenizer, generator, chain)


__all__ = ["Composition", "build_tokenizer", "check_composition", "image_shape_of"]
