"""How the app reports a problem: one readable line on stderr, and an exit code."""

from __future__ import annotations

from dschat.terminal.text import terminal_safe


class UsageError(Exception):
    """A problem with how dschat was called (exit code 2)."""


def error_text(e: BaseException) -> str:
    """An exception as one line: its message's first line, spaces collapsed, or its type's name; without
    escape sequences or control characters (the message may carry a path, a model file's text, ...)."""
    text = str(e).strip() or type(e).__name__
    text = " ".join(text.split("\n")[0].split()) if "\n" in text else text
    return terminal_safe(text)
