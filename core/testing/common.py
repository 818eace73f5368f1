"""What every property of the kit shares: hypothesis (imported when a check
runs), the registry of the built-in components the kit builds itself,
clear-error expectations and random images."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

import torch

from ..contract.errors import TokenloomError


def _hypothesis() -> tuple[Any, Any]:
    """``(hypothesis, hypothesis.strategies)``, or an ImportError that names
    the missing development dependency."""
    try:
        import hypothesis
        from hypothesis import strategies
    except ImportError as exc:
        raise ImportError(
            "tokenloom.testing needs 'hypothesis', a development dependency of tokenloom: "
            "pip install 'tokenloom[dev]' (or pip install 'hypothesis>=6.90')"
        ) from exc
    return hypothesis, strategies


def _settings(max_examples: int):
    hypothesis, _ = _hypothesis()
    return hypothesis.settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(hypothesis.HealthCheck),
    )


def _given(**strategies: Any):
    return _hypothesis()[0].given(**strategies)


#: The built-in plugin modules the kit builds its helper components from.
_KIT_PLUGINS = {
    "pixel": "tokenloom.plugins.tokenizers.pixel",
    "top-k": "tokenloom.plugins.samplers.top_k",
    "cfg": "tokenloom.plugins.samplers.cfg",
    "temperature": "tokenloom.plugins.samplers.temperature",
    "raster": "tokenloom.plugins.generators.raster",
}


@functools.cache
def _kit_registry() -> Any:
    """A registry of the few built-in components the kit itself uses, built
    from tokenloom's own plugin modules (never from what happens to be installed)."""
    from ..contract.registry import Registry

    return Registry.from_plugins([(n, importlib.import_module(m)) for n, m in _KIT_PLUGINS.items()],
                                 dist="tokenloom", strict=True)


def _expect_error(what: str, fn: Callable[[], Any]) -> None:
    try:
        fn()
    except TokenloomError:
        return
    except Exception as exc:
        raise AssertionError(
            f"{what}: raised {type(exc).__name__}: {exc} — expected a clear tokenloom.InputError"
        ) from exc
    raise AssertionError(f"{what}: accepted silently — expected a clear tokenloom.InputError")


def random_images(n: int, image_shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    """Smooth-ish random images in [-1, 1] (low-resolution noise upsampled,
    plus flat patches at the extremes), deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = image_shape
    low = torch.randn(n, c, max(1, h // 4), max(1, w // 4), generator=g)
    x = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    x = torch.tanh(x + 0.3 * torch.randn(n, c, h, w, generator=g))
    if n and h >= 2 and w >= 2:
        x[0, :, : h // 2, : w // 2] = 1.0
        x[-1, :, h // 2 :, w // 2 :] = -1.0
    return x.float()


# ---------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------
