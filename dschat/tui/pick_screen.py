"""A list to pick one from (a code block to copy): the items numbered, the last highlighted; Enter or an item's
number picks it, Esc picks none."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, OptionList
from textual.widgets.option_list import Option

from dschat.terminal.text import terminal_safe


class PickScreen(ModalScreen[int | None]):
    """Dismissed with the index of the item picked, or None."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, question: str, items: list[str]):
        super().__init__()
        self.question, self.items = question, items

    def compose(self) -> ComposeResult:
        with Vertical(id="ask"):
            yield Label(self.question, markup=False)
            yield OptionList(*[Option(f"{i + 1:>2}  {terminal_safe(item)}", id=str(i))
                               for i, item in enumerate(self.items)], id="pick", markup=False)
            yield Label("Enter or a number: pick    Esc: none", classes="keys")

    def on_mount(self):
        options = self.query_one(OptionList)
        options.highlighted = len(self.items) - 1
        options.focus()

    @on(OptionList.OptionSelected)
    def selected(self, event: OptionList.OptionSelected):
        self.dismiss(int(event.option.id))

    def on_key(self, event):
        if event.character and event.character.isdigit():
            n = int(event.character)
            if 1 <= n <= min(len(self.items), 9):
                event.stop()
                self.dismiss(n - 1)

    def action_cancel(self):
        self.dismiss(None)
