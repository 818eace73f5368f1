"""Composition checks that need the components built (but nothing trained):
a generator that does not fit its tokenizer, an image size a tokenizer cannot
take. Used by ``tokenloom check`` and before any run starts."""

from __future__ import annotations

from typing import Any

from ..contract.config import RunConfig, build_component
from ..contract.errors import ConfigError
from ..contract.registry import get_registry


def image_shape_of(cfg: RunConfig) -> tuple[int, int, int]:
    return (cfg.data.channels, cfg.data.size, cfg.data.size)


def check_composition(cfg: RunConfig, *, source: str | None = None, registry: Any = None) -> None:
    """Build the tokenizer, generator and sampler chain (untrained) and report
    every composition problem together."""
    from ..blocks.sampling import build_chain

    registry = registry or get_registry()
    problems: list[str] = []
    tokenizer = None
    try:
        tokenizer = build_component(
            registry, "tokenizer", cfg.tokenizer.name,
            {**cfg.tokenizer.options, "image_shape": image_shape_of(cfg)}, path="tokenizer",
        )
    except ConfigError as exc:
        problems.extend(exc.problems)
    if cfg.generator is not None and tokenizer is not None:
        try:
            build_component(registry, "generator", cfg.generator.name,
                            {**cfg.generator.options, "tokenizer": tokenizer}, path="generator")
        except ConfigError as exc:
            problems.extend(exc.problems)
    try:
        build_chain(cfg.sampler, registry=registry)
    except ConfigError as exc:
        problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems, source=source)
