"""The sidebar: the saved conversations, newest first. Enter on one posts ConversationList.Opened."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import Label, ListItem, ListView

from dschat.terminal.text import terminal_safe


class ConversationList(Vertical):
    """The conversations it is given (`show`), as plain text. It does not read the history itself: the
    screen does (it knows whether the history may be used now) and hands it the rows."""

    class Opened(Message):
        """A conversation was chosen (Enter or a click): the screen opens it."""

        def __init__(self, conversation_id: str):
            super().__init__()
            self.conversation_id = conversation_id

    def compose(self) -> ComposeResult:
        yield Label("Conversations", classes="heading")
        yield ListView(id="conversations")

    def show(self, rows):
        """`rows`: the history's list (dicts with "id" and "title")."""
        lv = self.query_one(ListView)
        lv.clear()
        # a title is shown as text: no markup (a "[/]" in it would break the sidebar), no control characters
        lv.extend(ListItem(Label(terminal_safe(r["title"]) or "(untitled)", markup=False), name=r["id"]) for r in rows)

    @on(ListView.Selected)
    def _selected(self, event: ListView.Selected):
        event.stop()
        self.post_message(self.Opened(event.item.name))
