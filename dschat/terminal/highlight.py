"""Syntax highlighting with Pygments, in one place for the whole app: ANSI colours for a colour terminal
(line mode's code blocks, `fim`'s output and diff; NO_COLOR turns them off), and a Pygments style's
colours for the TUI's code blocks (`code_style` in the config file)."""

from __future__ import annotations

import os
import sys

from pygments import highlight
from pygments.formatters import Terminal256Formatter, TerminalFormatter
from pygments.lexers import TextLexer, get_lexer_by_name, get_lexer_for_filename
from pygments.styles import get_style_by_name
from pygments.util import ClassNotFound

from dschat.terminal.text import say


def colour_terminal(out=None) -> bool:
    """Whether `out` (stdout) takes colours: a terminal, and NO_COLOR not set."""
    out = out or sys.stdout
    return out.isatty() and not os.environ.get("NO_COLOR")


def terminal_formatter(style: str | None = None):
    """The terminal's 16 colours, or a Pygments style in 256 colours when the config names one."""
    if style:
        try:
            return Terminal256Formatter(style=style)
        except ClassNotFound:
            say(f"dschat: no Pygments style called {style!r}; using the terminal's colours")
    return TerminalFormatter()


def lexer_for(lang: str | None = None, filename: str | None = None, text: str = ""):
    """A lexer by language name, else by file name; None when neither is known."""
    try:
        if lang:
            return get_lexer_by_name(lang)
        return get_lexer_for_filename(filename, text) if filename else None
    except ClassNotFound:
        return None


def ansi(text: str, lexer, formatter=None) -> str:
    """`text` in terminal colours (plain text without a lexer)."""
    return highlight(text, lexer or TextLexer(), formatter or TerminalFormatter())


def style_colours(style_name: str) -> dict:
    """A Pygments style as {token type: "#colour bold italic underline"} (ClassNotFound for an unknown
    name), for the TUI's highlight theme."""
    styles = {}
    for token, d in get_style_by_name(style_name):
        parts = ([f"#{d['color']}"] if d["color"] else []) + [k for k in ("bold", "italic", "underline") if d[k]]
        if parts:
            styles[token] = " ".join(parts)
    return styles
