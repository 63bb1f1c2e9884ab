"""Dialogs: a one-line question (system prompt, title, search, model, where to export) and a yes/no one."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label


class AskScreen(ModalScreen[str | None]):
    """A one-line question: Enter answers, Esc cancels."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, question: str, value: str = ""):
        super().__init__()
        self.question, self.value = question, value

    def compose(self) -> ComposeResult:
        with Vertical(id="ask"):
            yield Label(self.question)
            yield Input(value=self.value, id="answer")

    @on(Input.Submitted)
    def answered(self, event: Input.Submitted):
        self.dismiss(event.value)

    def action_cancel(self):
        self.dismiss(None)


class ConfirmScreen(ModalScreen[bool]):
    """A yes/no question (deleting a conversation): y says yes; n, Esc and Enter say no."""

    BINDINGS = [Binding("y", "answer(True)", "Yes"), Binding("n,escape,enter", "answer(False)", "No")]

    def __init__(self, question: str):
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(id="ask"):
            yield Label(self.question, markup=False)  # a title in it is text, not markup
            yield Label("y: yes    n or Esc: no", classes="keys")

    def action_answer(self, yes: bool):
        self.dismiss(yes)
