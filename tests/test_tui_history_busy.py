"""The TUI with a busy history (issue 27): the turn is saved in a worker thread, so the screen stays live and
says it is waiting while another connection holds the history, and the turn is saved once it is let go."""

from __future__ import annotations

import sqlite3
import threading

from helpers import make_app, ready, send, until

import dschat.history.store as store_module
from dschat.history.store import Store
from dschat.tui.prompt_area import PromptArea


async def test_a_busy_history_is_waited_for_with_a_notice_and_the_screen_stays_live(chat_models, monkeypatch):
    monkeypatch.setattr(store_module, "BUSY_NOTICE_S", 0.5)  # the notice after half a second, not five
    app = make_app(chat_models["v3"], "-n", "4")
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "first")
        # another connection (another dschat, say) holds the history's write lock
        holder = sqlite3.connect(app.session.store.path, isolation_level=None, check_same_thread=False)
        holder.execute("BEGIN IMMEDIATE")
        lock = threading.Lock()

        def release():
            with lock:
                if holder.in_transaction:
                    holder.execute("COMMIT")

        failsafe = threading.Timer(30, release)  # a screen stuck waiting on its UI thread is let go in the end
        failsafe.start()
        try:
            prompt = app.query_one(PromptArea)
            prompt.text = "second"
            prompt.focus()
            await pilot.press("enter")
            await until(pilot, lambda: any("is busy" in n.message for n in app._notifications), timeout=20)
            assert holder.in_transaction  # the notice is shown while the history is held
            assert app.busy and app.turns_done == 1 and "saving" in str(app.query_one("#status").render())
            await pilot.press(*"typed meanwhile")  # the screen takes keys while it waits
            assert prompt.text == "typed meanwhile"
            await pilot.press("enter")  # and says why it does not send yet; nothing typed is lost
            await pilot.pause(0.1)
            assert prompt.text == "typed meanwhile"
            assert any("still being saved" in n.message for n in app._notifications)
            release()
            await until(pilot, lambda: app.turns_done == 2, timeout=30)
        finally:
            failsafe.cancel()
            release()
            holder.close()
        assert not app.busy and "ready" in str(app.query_one("#status").render())
    msgs = Store().latest().messages
    assert [m.content for m in msgs[::2]] == ["first", "second"] and len(msgs) == 4
