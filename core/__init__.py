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

import importlib as _importlib
import sys as _sys
from importlib import abc as _abc
from importlib import metadata as _metadata
from importlib import util as _util

from .contract.errors import (
    CheckpointError,
    ConfigError,
    InputError,
    PluginError,
    TokenloomError,
    UnknownComponentError,
)
from .contract.hookspecs import hookimpl, hookspec
from .contract.interfaces import (
    NO_POSITION,
    RNG,
    AcceptanceRule,
    Backbone,
    Cache,
    Chain,
    Condition,
    Conditioner,
    Generator,
    Head,
    Known,
    Metric,
    MetricContext,
    MetricResult,
    ModelSpec,
    MultiScaleInputs,
    Prefix,
    Sampler,
    SamplerContext,
    StepInfo,
    Tokenizer,
    TokenLayout,
    TrainBatch,
    check_codes,
    check_images,
    check_latents,
    check_logits,
    read_stat,
)
from .contract.registry import available, create, get_registry, plugin_report

#: The layer each module lives in (``core/<layer>/<module>.py``). ``tokenloom.<module>`` — the
#: import path plugins and users have always written — stays valid: it is the same module object as
#: ``tokenloom.<layer>.<module>``, imported on first use (see :class:`_ModuleAlias`).
LAYOUT = {
    "contract": ("errors", "hookspecs", "interfaces", "registry", "config", "checkpoint"),
    "blocks": ("rng", "data", "shapes", "orders", "sampling", "speculative", "quantize", "convnet", "autoencoder",
               "tokenizer_train"),
    "backbone": ("model", "train", "dist"),
    "evaluation": ("extractor", "fidelity", "frechet", "evalcard"),
    "running": ("pipeline", "pipeline_check", "ablation", "grid", "reports", "tokenizer_fit", "cli"),
}
_MOVED = {f"{__name__}.{module}": f"{__name__}.{layer}.{module}"
          for layer, modules in LAYOUT.items() for module in modules}


class _ModuleAlias(_abc.MetaPathFinder, _abc.Loader):
    """Resolves ``tokenloom.<module>`` to ``tokenloom.<layer>.<module>``: the import returns the real
    module (one object under both names, so attributes and patches agree), lazily."""

    def find_spec(self, fullname: str, path: object = None, target: object = None):
        if fullname in _MOVED:
            return _util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        module = _importlib.import_module(_MOVED[spec.name])
        spec.loader_state = module.__spec__
        return module

    def exec_module(self, module) -> None:
        # the import machinery stamped the alias spec on the module: give it back its own
        alias = module.__spec__
        if alias is not None and alias.loader is self and alias.loader_state is not None:
            module.__spec__ = alias.loader_state


if not any(isinstance(f, _ModuleAlias) for f in _sys.meta_path):
    _sys.meta_path.append(_ModuleAlias())

try:
    __version__ = _metadata.version("tokenloom")
except _metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = [
    "NO_POSITION",
    "RNG",
    "AcceptanceRule",
    "Backbone",
    "Cache",
    "Chain",
    "CheckpointError",
    "Condition",
    "Conditioner",
    "ConfigError",
    "Generator",
    "Head",
    "InputError",
    "Known",
    "Metric",
    "MetricContext",
    "MetricResult",
    "ModelSpec",
    "MultiScaleInputs",
    "PluginError",
    "Prefix",
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
    "check_latents",
    "check_logits",
    "create",
    "get_registry",
    "hookimpl",
    "hookspec",
    "plugin_report",
    "read_stat",
]
