"""Typed errors. Every error a user can cause derives from :class:`DecodekitError`."""

from __future__ import annotations


class DecodekitError(Exception):
    """Base class of every decodekit error."""


class PluginError(DecodekitError):
    """A plugin failed to load, registered a name twice, or a name is unknown."""


class ModelLoadError(DecodekitError):
    """A checkpoint could not be loaded: unsupported architecture, missing/corrupt file, bad shape.

    The message names the file and, where relevant, the tensor at fault.
    """


class TokenizerError(DecodekitError):
    """A tokenizer could not be loaded or used."""


class InvalidRequestError(DecodekitError, ValueError):
    """A request was rejected before it touched engine state (bad prompt or parameters)."""


class ConfigError(DecodekitError, ValueError):
    """An engine or pipeline configuration is invalid."""


class ConstraintError(DecodekitError, ValueError):
    """A grammar, JSON Schema, regex or choice list cannot be compiled into a constraint.

    The message names the rule, terminal or JSON pointer at fault and what is wrong with it.
    """


class ConstraintTimeoutError(ConstraintError, TimeoutError):
    """Compiling a constraint took longer than its time limit."""
