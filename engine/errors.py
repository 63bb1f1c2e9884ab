"""Errors the engine raises for bad input: each message is one readable line naming what and where."""


class ModelError(Exception):
    """A model that cannot be used: missing, unreadable, truncated, inconsistent or unsupported."""


class ContextLengthError(ValueError):
    """A prompt plus max_tokens that does not fit the model's context window."""
