"""The TUI's sidebar as a new user found it: no dates, conversations with the same title told apart by
nothing, and no sign that a search filter was on (a search that found nothing looked like an empty history;
the filter was dropped silently after the next turn)."""

from __future__ import annotations

import time

from helpers import answer, make_app, ready, send, until

from dschat.history.store import Store
from dschat.tui.conversation_list import when


def saved(title: str, age_s: float) -> str:
    with Store() as s:
        cid = s.create(model="m", title=title)
        s.add_message(cid, "user", f"{title}?")
        s.add_message(cid, "assistant", "yes")
        with s.transaction():
            s.db.execute("UPDATE conversations SET updated = ?, created = ? WHERE id = ?",
                         (time.time() - age_s, time.time() - age_s, cid))
    return cid


def sidebar(app) -> list[tuple[str, str]]:
    return [(str(i.query_one(".title").render()), str(i.query_one(".when").render()))
            for i in app.query("#conversations ListItem")]


def heading(app) -> str:
    return str(app.query_one("#sidebar .heading").render())


async def test_dates_numbered_titles_and_the_search_filter(chat_models):
    saved("other", 40 * 86400)
    saved("hello", 2 * 86400)
    saved("hello", 2 * 3600)
    app = make_app(chat_models["v3"], "-n", "2")
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        rows = sidebar(app)
        assert [t for t, _ in rows] == ["hello (2)", "hello (1)", "other"]  # the same title: numbered, oldest 1
        assert [w for _, w in rows][:2] == ["2 h ago · 2 msgs", "2 days ago · 2 msgs"]
        assert rows[2][1] == when(time.time() - 40 * 86400) + " · 2 msgs" and "ago" not in rows[2][1]
        assert heading(app) == "Conversations" and not app.query_one("#sidebar .filter-hint").display

        app.chat_screen.action_search()
        await answer(pilot, app, "hello")
        assert heading(app) == "Search: hello (2)"  # the filter is on, and says so
        hint = app.query_one("#sidebar .filter-hint")
        assert hint.display and "Esc" in str(hint.render())
        assert [t for t, _ in sidebar(app)] == ["hello (2)", "hello (1)"]
        await send(pilot, app, "a new question")  # the filter stays on after a turn (it was dropped)
        assert heading(app) == "Search: hello (2)" and len(sidebar(app)) == 2

        app.query_one("#conversations").focus()  # Esc in the list clears it
        await pilot.press("escape")
        await until(pilot, lambda: heading(app) == "Conversations")
        assert [t for t, _ in sidebar(app)] == ["a new question", "hello (2)", "hello (1)", "other"]
        assert sidebar(app)[0][1] == "just now · 2 msgs"
        assert not app.query_one("#sidebar .filter-hint").display


def test_when():
    now = time.mktime((2026, 6, 10, 12, 0, 0, 0, 0, -1))
    assert [when(now - s, now) for s in (5, 300, 3 * 3600)] == ["just now", "5 min ago", "3 h ago"]
    assert when(now - 86400, now) == "yesterday" and when(now - 3 * 86400, now) == "3 days ago"
    assert when(time.mktime((2026, 3, 4, 9, 0, 0, 0, 0, -1)), now) == "4 Mar"
    assert when(time.mktime((2025, 12, 30, 9, 0, 0, 0, 0, -1)), now) == "30 Dec 2025"
