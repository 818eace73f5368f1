"""tokenloom: comparable experiments in autoregressive visual generation.

Public API::

    import tokenloom
    tokenloom.available("sampler")                 # ['greedy', 'min-p', ...]
    tok = tokenloom.create("tokenizer", "pixel", bits=3, image_shape=(3, 16, 16))
    tokenloom.plugin_report()                      # what loaded, from where, what failed

Plugins implement the hooks in :mod:`tokenloom.hookspecs` (marked with
:data:`tokenloom.hookimpl`) and derive from the bases in
:mod:`tokenloom.interfaces`. The plugin manager is built on first use, never
at import.
"""

from __future__ import annotations

from importlib import metadata as _metadata

from .errors import (
    CheckpointError,
    ConfigError,
    InputError,
    PluginError,
    TokenloomError,
    UnknownComponentError,
)
from .hookspecs import hookimpl, hookspec
from .interfaces import (
    AcceptanceRule,
    Generator,
    Known,
    Metric,
    MetricContext,
    ModelSpec,
    MultiScaleInputs,
    Sampler,
    SamplerContext,
    StepInfo,
    Tokenizer,
    TokenLayout,
    TrainBatch,
    check_codes,
    check_images,
    check_logits,
    read_stat,
)
from .registry import available, create, get_registry, plugin_report

#: Position id of a token without a grid position (the class token); see
#: :class:`tokenloom.ModelSpec`.
NO_POSITION = -1

try:
    __version__ = _metadata.version("tokenloom")
except _metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = [
    "NO_POSITION",
    "AcceptanceRule",
    "CheckpointError",
    "ConfigError",
    "Generator",
    "InputError",
    "Known",
    "Metric",
    "MetricContext",
    "ModelSpec",
    "MultiScaleInputs",
    "PluginError",
    "Sampler",
    "SamplerContext",
    "StepInfo",
    "TokenLayout",
    "Tokenizer",
    "TokenloomError",
    "TrainBatch",
    "UnknownComponentError",
    "__version__",
    "available",
    "check_codes",
    "check_images",
    "check_logits",
    "create",
    "get_registry",
    "hookimpl",
    "hookspec",
    "plugin_report",
    "read_stat",
]
