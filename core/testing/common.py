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


def _settings(max_examples: int, shrink: bool = True):
    hypothesis, _ = _hypothesis()
    return hypothesis.settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(hypothesis.HealthCheck),
        **({} if shrink else {"phases": [p for p in hypothesis.Phase if p != hypothesis.Phase.shrink],
                              "report_multiple_bugs": False}),
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
    # continuous tokens: the generator kit's latents and heads
    "patch": "tokenloom.plugins.tokenizers.patch",
    "kl": "tokenloom.plugins.tokenizers.kl",
    "diffusion": "tokenloom.plugins.heads.diffusion",
    "flow": "tokenloom.plugins.heads.flow",
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


def continuous_layout_for(layout: Any, *, token_dim: int = 2) -> tuple[str, dict] | None:
    """The kit's continuous tokenizer ``(name, options)`` (built-in ``patch`` or ``kl``, both
    usable untrained: an order reads only their layout, width and ``scale_inputs``) with the
    grid(s) of ``layout`` (a discrete tokenizer's), ``token_dim`` wide (residual depth dropped):
    one grid ``h × w`` -> ``patch`` with 1-pixel patches of a ``token_dim``-channel ``h × w``
    image; square scales ``s_1 < … < s_K`` -> ``kl`` with ``scales`` (FlowAR's non-residual
    layout, stride 1). None for a layout neither gives (non-square or non-increasing scales)."""
    scales = tuple(tuple(int(v) for v in s) for s in layout.scales)
    if len(scales) == 1:
        (h, w), = scales
        return "patch", {"patch": 1, "image_shape": (token_dim, h, w)}
    sides = [h for h, w in scales]
    if any(h != w for h, w in scales) or sides != sorted(set(sides)):
        return None
    return "kl", {"token_dim": token_dim, "downsample": 1, "channels": 4, "steps": 0, "scales": sides,
                  "image_shape": (3, sides[-1], sides[-1])}


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
