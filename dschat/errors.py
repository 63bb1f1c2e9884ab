"""How the app reports a problem: one readable line on stderr, and an exit code."""

from __future__ import annotations

import re

from dschat.terminal.text import terminal_safe

# The engine names a setting by its Engine.from_pretrained argument, in backticks (`fp8="keep"`, `cache_gb`);
# the app shows the flag that sets it (--fp8 keep, --cache-gb).
_SETTINGS = ("cache_gb", "device", "draft_tokens", "dtype", "fp8", "quant", "speculative", "threads", "compile")
_SETTING = re.compile(r'`(%s)(?:="([^"`]*)")?`' % "|".join(_SETTINGS))


def flag_hints(text: str) -> str:
    """The engine's setting names in `text` as dschat's flags."""
    return _SETTING.sub(lambda m: "--" + m[1].replace("_", "-") + (f" {m[2]}" if m[2] is not None else ""), text)


class UsageError(Exception):
    """A problem with how dschat was called (exit code 2)."""


def error_text(e: BaseException) -> str:
    """An exception as one line: its message's first line, spaces collapsed, or its type's name; without
    escape sequences or control characters (the message may carry a path, a model file's text, ...)."""
    text = flag_hints(str(e).strip()) or type(e).__name__
    text = " ".join(text.split("\n")[0].split()) if "\n" in text else text
    return terminal_safe(text)
