"""Errors tokenloom raises on purpose.

Every error a user can cause (a bad config, an unknown component, a broken
plugin, malformed input) is a :class:`TokenloomError`; the CLI prints its
message in one readable block and exits non-zero instead of a traceback.
"""

from __future__ import annotations


class TokenloomError(Exception):
    """Base class of every error tokenloom raises deliberately."""


class ConfigError(TokenloomError, ValueError):
    """A configuration problem. ``problems`` holds one line per problem, each
    starting with the path of the offending key (``sampler[1].k: ...``)."""

    def __init__(self, problems: list[str] | str, *, source: str | None = None):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        self.source = source
        head = f"{source}: " if source else ""
        if len(self.problems) == 1:
            msg = head + self.problems[0]
        else:
            msg = head + f"{len(self.problems)} problems:\n" + "\n".join(
                f"  {p}" for p in self.problems
            )
        super().__init__(msg)


class UnknownComponentError(ConfigError, KeyError):
    """A component name that no loaded plugin registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class PluginError(TokenloomError):
    """A plugin failed to load or registered something invalid (strict mode,
    duplicate names)."""


class InputError(TokenloomError, ValueError):
    """Malformed data handed to a component: wrong shape, dtype or range,
    NaN, codes out of range, an all ``-inf`` logits row."""


class CheckpointError(TokenloomError):
    """A checkpoint that is missing, corrupt (hash mismatch) or was written
    for a different configuration."""
