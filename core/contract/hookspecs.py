"""Hook specifications: the six hooks a tokenloom plugin may implement.

A plugin is a module (or object) named by an entry point in the group
``tokenloom``. The registry imports it on first use (never at
``import tokenloom``), then calls each hook it implements exactly once with a
``register`` callable. Mark implementations with :data:`tokenloom.hookimpl`::

    @tokenloom.hookimpl
    def register_samplers(register):
        register("my-sampler", MySampler)

``register(name, cls)`` rules, for every hook:

- ``name`` is the component's public name: lower case letters, digits, ``-``,
  ``_`` and ``.``, starting with a letter or digit; configs refer to it as
  ``name = "..."``;
- ``cls`` must be a class deriving from the kind's base in
  :mod:`tokenloom.interfaces` and have a nested attrs class ``Config`` (the
  configuration structured from the TOML table; unknown keys are errors);
- registering a name that another plugin already registered for the same kind
  is an error naming both distributions; anything else invalid is recorded
  as a load failure of *your* plugin, shown by ``tokenloom plugins``, while
  the other plugins keep working (``TOKENLOOM_STRICT_PLUGINS=1`` makes it fatal);
- a hook may register any number of components; an exception it raises is
  recorded as a failure of your plugin and what it registered before the
  exception is discarded.

Hooks must be cheap: import heavy dependencies inside the component's
methods, not at module level, so that ``tokenloom plugins`` starts fast.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

PROJECT = "tokenloom"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[[str, type], None]


@hookspec
def register_tokenizers(register: Register) -> None:
    """Register tokenizer classes (subclasses of
    :class:`tokenloom.Tokenizer`): ``register("vq", VQTokenizer)``.

    Called once when the registry is first used. The class is built as
    ``cls(cls.Config(...), image_shape=(C, H, W))`` and must pass
    ``tokenloom.testing.check("tokenizer", name)``."""


@hookspec
def register_generators(register: Register) -> None:
    """Register generation orders (subclasses of
    :class:`tokenloom.Generator`): ``register("raster", RasterGenerator)``.

    Called once when the registry is first used. The class is built as
    ``cls(cls.Config(...), tokenizer=tokenizer)`` and must raise
    :class:`tokenloom.ConfigError` when the tokenizer does not fit."""


@hookspec
def register_samplers(register: Register) -> None:
    """Register logits processors and acceptance rules (subclasses of
    :class:`tokenloom.Sampler` / :class:`tokenloom.AcceptanceRule`):
    ``register("top-k", TopK)``.

    Called once when the registry is first used. The class is built as
    ``cls(cls.Config(...))``; processors never modify their input."""


@hookspec
def register_metrics(register: Register) -> None:
    """Register metrics (subclasses of :class:`tokenloom.Metric`):
    ``register("fid", FID)``.

    Called once when the registry is first used. The class is built as
    ``cls(cls.Config(...))``; heavy imports (torch-fidelity) belong inside
    ``compute``."""


@hookspec
def register_conditioners(register: Register) -> None:
    """Register conditioners (subclasses of :class:`tokenloom.Conditioner`):
    ``register("caption", CaptionConditioner)``.

    Called once when the registry is first used. The class is built as
    ``cls(cls.Config(...), n_classes=..., class_names=...)`` and must pass
    ``tokenloom.testing.check("conditioner", name)``."""


@hookspec
def register_heads(register: Register) -> None:
    """Register heads (subclasses of :class:`tokenloom.Head`): what turns
    the backbone's hidden state into a token — ``register("diffusion",
    DiffusionHead)``.

    Called once when the registry is first used. The class is built as
    ``cls(cls.Config(...), hidden_dim=C, token_dim=D, vocab_size=V)`` and
    must pass ``tokenloom.testing.check("head", name)``; it must raise
    :class:`tokenloom.ConfigError` for a token kind it does not model."""


HOOKS: dict[str, str] = {
    "tokenizer": "register_tokenizers",
    "generator": "register_generators",
    "sampler": "register_samplers",
    "metric": "register_metrics",
    "conditioner": "register_conditioners",
    "head": "register_heads",
}
