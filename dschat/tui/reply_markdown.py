"""Replies as Markdown whose code blocks are highlighted in the configured Pygments style (`code_style`),
or in the app theme's colours when none is configured."""

from __future__ import annotations

from textual.highlight import HighlightTheme, highlight
from textual.widgets import Markdown
from textual.widgets.markdown import MarkdownFence

from dschat.terminal.highlight import style_colours


def code_theme(style_name: str) -> type[HighlightTheme]:
    """A Textual highlight theme made from a Pygments style (ClassNotFound for an unknown name)."""
    return type(f"PygmentsTheme_{style_name}", (HighlightTheme,), {"STYLES": style_colours(style_name)})


class ReplyFence(MarkdownFence):
    """A code block highlighted by Pygments in the configured style, or in the app theme's colours."""

    def __init__(self, markdown, token, code):
        self.code_theme = getattr(markdown, "code_theme", None)
        super().__init__(markdown, token, code)

    def highlight(self, code, language, ansi=False, dark=False):
        if self.code_theme is None:
            return MarkdownFence.highlight(code, language, ansi=ansi, dark=dark)
        return highlight(code, language=language or None, theme=self.code_theme)


class ReplyMarkdown(Markdown):
    """A reply (or a prompt) as Markdown, its code blocks in the configured style."""

    BLOCKS = {**Markdown.BLOCKS, "fence": ReplyFence, "code_block": ReplyFence}

    def __init__(self, text: str, code_theme=None):
        self.code_theme = code_theme
        super().__init__(text)
