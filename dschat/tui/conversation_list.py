"""The sidebar: the saved conversations, newest first, each with when it was last used (titles that are the
same get a number, oldest first). Enter on one posts ConversationList.Opened; a search filter is shown in
the heading, and Esc in the list (or an empty search) clears it (ConversationList.Cleared)."""

from __future__ import annotations

import time
from collections import Counter

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import Label, ListItem, ListView

from dschat.terminal.text import terminal_safe


def when(t: float, now: float | None = None) -> str:
    """A time shortly, relative while recent: "just now", "5 min ago", "3 h ago" (within 24 h), then by the
    calendar "yesterday", "4 days ago", then the date ("3 Dec", or "3 Dec 2025" in another year)."""
    now = time.time() if now is None else now
    ago = now - t
    if ago < 60:
        return "just now"
    if ago < 3600:
        return f"{int(ago // 60)} min ago"
    if ago < 86400:
        return f"{int(ago // 3600)} h ago"
    day, today = time.localtime(t), time.localtime(now)
    days = round((time.mktime(today[:3] + (0, 0, 0, 0, 0, -1)) - time.mktime(day[:3] + (0, 0, 0, 0, 0, -1))) / 86400)
    if days < 2:
        return "yesterday"
    if days < 7:
        return f"{int(days)} days ago"
    return f"{day.tm_mday} {time.strftime('%b', day)}" + ("" if day.tm_year == today.tm_year else f" {day.tm_year}")


def titles(rows) -> list[str]:
    """The rows' titles as shown: made safe, and numbered where the same title is shown more than once
    ("hello (2)": the second oldest)."""
    shown = [terminal_safe(r["title"]) or "(untitled)" for r in rows]
    count, seen = Counter(shown), Counter()
    out = [""] * len(shown)
    for i in range(len(shown) - 1, -1, -1):  # oldest first (rows are newest first)
        seen[shown[i]] += 1
        out[i] = shown[i] if count[shown[i]] == 1 else f"{shown[i]} ({seen[shown[i]]})"
    return out


class ConversationList(Vertical):
    """The conversations it is given (`show`), as plain text. It does not read the history itself: the
    screen does (it knows whether the history may be used now) and hands it the rows."""

    BINDINGS = [Binding("escape", "clear_search", "Show all", show=False)]

    class Opened(Message):
        """A conversation was chosen (Enter or a click): the screen opens it."""

        def __init__(self, conversation_id: str):
            super().__init__()
            self.conversation_id = conversation_id

    class Cleared(Message):
        """Esc in the list while a search filter is on: the screen lists every conversation again."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.search: str | None = None

    def compose(self) -> ComposeResult:
        yield Label("Conversations", classes="heading", markup=False)
        yield Label("", classes="filter-hint", markup=False)
        yield ListView(id="conversations")

    def show(self, rows, search: str | None = None):
        """`rows`: the history's list (dicts with "id", "title" and "updated"), found by `search` (None: all)."""
        self.search = search
        heading, hint = self.query_one(".heading", Label), self.query_one(".filter-hint", Label)
        if search:  # the filter is on: say so, and how to see everything again
            heading.update(terminal_safe(f"Search: {search}")[:60] + f" ({len(rows)})")
            hint.update("Esc here or empty search: all")
        else:
            heading.update("Conversations")
        hint.display = bool(search)
        heading.set_class(bool(search), "filtered")
        lv = self.query_one(ListView)
        lv.clear()
        now = time.time()
        # a title is shown as text: no markup (a "[/]" in it would break the sidebar), no control characters
        lv.extend(ListItem(Label(title, markup=False, classes="title"),
                           Label(f"{when(r['updated'], now)} · {r['messages']} msgs", markup=False, classes="when"),
                           name=r["id"]) for r, title in zip(rows, titles(rows)))

    def action_clear_search(self):
        if self.search:
            self.post_message(self.Cleared())
        else:  # no filter: Esc does what it does elsewhere (stops a streaming reply)
            self.screen.action_stop()

    @on(ListView.Selected)
    def _selected(self, event: ListView.Selected):
        event.stop()
        self.post_message(self.Opened(event.item.name))
