"""The chat's input."""

from __future__ import annotations

from textual.message import Message
from textual.widgets import TextArea


class PromptArea(TextArea):
    """The input: Enter sends, Ctrl+J (or Shift/Alt+Enter where the terminal reports them) starts a new
    line, Up in an empty input recalls earlier prompts."""

    class Submitted(Message):
        def __init__(self, text: str):
            super().__init__()
            self.text = text

    def __init__(self, **kw):
        super().__init__(soft_wrap=True, show_line_numbers=False, **kw)
        self.prompts: list[str] = []
        self._recall: int | None = None

    async def _on_key(self, event) -> None:
        if event.key == "enter":
            event.prevent_default()
            event.stop()
            if self.text.strip():
                self.post_message(self.Submitted(self.text))
            return
        if event.key in ("ctrl+j", "shift+enter", "alt+enter"):
            event.prevent_default()
            event.stop()
            self.insert("\n")
            return
        if event.key in ("up", "down") and self.prompts and (not self.text or self._recall is not None):
            if event.key == "up":
                self._recall = len(self.prompts) - 1 if self._recall is None else max(0, self._recall - 1)
            elif self._recall is not None:
                self._recall += 1
                if self._recall >= len(self.prompts):
                    self._recall = None
            event.prevent_default()
            event.stop()
            self.text = "" if self._recall is None else self.prompts[self._recall]
            self.move_cursor(self.document.end)
            return
        self._recall = None
        await super()._on_key(event)
