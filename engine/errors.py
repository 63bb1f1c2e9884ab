"""Errors the engine raises for bad input: each message is one readable line naming what and where. A setting
is named by its Engine.from_pretrained argument in backticks (`fp8="keep"`, `cache_gb`), never by a flag of the
app's command line: the app shows its own flag there (dschat/errors.py)."""


class ModelError(Exception):
    """A model that cannot be used: missing, unreadable, truncated, inconsistent or unsupported."""


class ContextLengthError(ValueError):
    """A prompt plus max_tokens that does not fit the model's context window."""
