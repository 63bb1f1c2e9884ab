"""The chat screen's history actions: the conversation list shown (and filtered), the system prompt, renaming,
deleting and exporting a conversation. A mixin of ChatScreen (chat_screen.py); the history is used on the UI
thread, except while a turn is being saved (`saving`), when the saving worker has it."""

from __future__ import annotations

from pathlib import Path

from dschat.errors import error_text
from dschat.files import write_conversation
from dschat.history.store import Store, StoreError
from dschat.history.transfer import branch_line
from dschat.terminal.text import terminal_safe
from dschat.tui.ask_screen import AskScreen, ConfirmScreen
from dschat.tui.conversation_list import ConversationList

LAST = object()  # refresh_conversations: the filter that is on; ChatScreen.update_status: the last reply's figures


class HistoryActions:
    def with_store(self, fn):
        """fn(the history): the session's, once there is one (opened once, not for each call). Not while a turn
        is being saved: the saving thread has it."""
        app = self.app
        if self.saving:
            app.notify("the last turn is still being saved (the history is busy): try again then", severity="warning")
            return None
        try:
            if app.session is not None:
                return fn(app.session.store)
            with Store() as store:
                return fn(store)
        except StoreError as e:
            app.notify(str(e), severity="error")

    def refresh_conversations(self, search: str | None | object = LAST):
        """List the conversations again, found by `search` (None: all; by default the filter that is on)."""
        sidebar = self.query_one(ConversationList)
        search = sidebar.search if search is LAST else search
        rows = self.with_store(lambda s: s.list(search=search, limit=200))
        if rows is not None or not self.saving:
            sidebar.show(rows or [], search)

    def action_set_system(self):
        app = self.app

        def done(text):
            if text is None or app.chat is None:
                return
            try:
                self.session.set_system(text)
            except StoreError as e:
                app.notify(str(e), severity="error")
                return
            app.notify("system prompt set")

        app.push_screen(AskScreen("System prompt:", terminal_safe((app.chat.system or "") if app.chat else "")),
                        done)

    def action_rename(self):
        app = self.app
        if not app.conv_id:
            app.notify("nothing saved yet to rename", severity="warning")
            return

        def done(title):
            if title:
                self.with_store(lambda s: s.rename(app.conv_id, title))
                self.refresh_conversations()

        app.push_screen(AskScreen("New title:"), done)

    def action_delete(self):
        app = self.app
        if app.busy:
            app.notify("a reply is still streaming: Esc stops it", severity="warning")
            return
        conv_id = app.conv_id
        if not conv_id:  # nothing saved: a new chat
            self.action_new_chat()
            return

        def done(yes):
            if not yes or app.busy or app.conv_id != conv_id:
                return
            self.with_store(lambda s: s.delete(conv_id))
            app.notify("conversation deleted")
            self.action_new_chat()
            self.refresh_conversations()

        app.push_screen(ConfirmScreen("Delete this conversation from the history? It cannot be undone."), done)

    def action_export(self):
        app = self.app
        if not app.conv_id:
            app.notify("nothing saved yet to export", severity="warning")
            return
        conv_id = app.conv_id

        def done(where):
            if not where:
                return
            text = self.with_store(lambda s: s.export_text(conv_id, "md"))
            branch = self.with_store(lambda s: s.export_json(conv_id)["branch"])
            if text:
                path = Path(where).expanduser()
                try:  # private, as the history is (a file already there keeps its mode)
                    write_conversation(path, text)
                except OSError as e:  # a notice; the app goes on
                    app.notify(f"not exported: {error_text(e)}", severity="error")
                    return
                app.notify(f"exported to {path}" + (f" (branch: {branch_line(branch)})" if branch and branch["versions"]
                                                    else ""))

        app.push_screen(AskScreen("Export as Markdown to (Esc: not at all):", str(Path.cwd() / f"dschat-{conv_id}.md")),
                        done)

    def action_search(self):
        self.app.push_screen(AskScreen("Search conversations (empty: all):"),
                             lambda q: self.refresh_conversations(q or None))
