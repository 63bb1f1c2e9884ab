"""The chat screen's versions and branches: selecting a message (Alt+Up/Down), switching between its versions
(Alt+Left/Right: an edited prompt or a regenerated answer makes one) and editing an earlier prompt (Alt+E), which
resends it as a new branch. A mixin of ChatScreen (chat_screen.py), which has the keys, the widgets and the
session these use."""

from __future__ import annotations

from dschat.errors import error_text
from dschat.history.store import StoreError
from dschat.terminal.text import terminal_safe


class BranchActions:
    selected: int | None  # the message selected, by its place in the view (ChatScreen.__init__)

    def show_versions(self):
        """Each message's saved id and its place among its versions ("2/3" in its title), from the history."""
        conv_id = self.app.conv_id
        if not conv_id or self.saving:
            return
        try:
            store = self.session.store
            msgs, versions = [m for m in store.get(conv_id).messages if m.role != "system"], store.versions(conv_id)
        except StoreError:  # its first turn still pending: nothing saved to show
            return
        views = self.chat_view.messages
        if len(views) == len(msgs):
            for v, m in zip(views, msgs):
                v.set_version(m.id, *versions.get(m.id, (1, 1)))

    def select(self, index: int | None):
        """Select the message at `index` in the view (None: none), marked beside it."""
        views = self.chat_view.messages
        self.selected = index if index is not None and 0 <= index < len(views) else None
        for i, v in enumerate(views):
            v.set_class(i == self.selected, "selected")
        if self.selected is not None:
            views[self.selected].scroll_visible(animate=False)

    def action_edit_last(self):
        """Put the last prompt back in the input; sending it replaces the last exchange (kept as a sibling)."""
        app = self.app
        if app.busy or app.chat is None:
            return
        try:
            text = self.session.edit_last()
        except ValueError as e:
            app.notify(str(e), severity="warning")
            return
        for v in self.chat_view.messages[-2:]:
            v.remove()
        self.prompt.text = terminal_safe(text, body=True)
        self.prompt.focus()

    def action_select(self, step: int):
        """Move the selection up or down the conversation (from none: the last message, or the first)."""
        n = len(self.chat_view.messages)
        if n:
            at = (n if step < 0 else -1) if self.selected is None else self.selected
            self.select(min(max(at + step, 0), n - 1))

    def action_version(self, step: int):
        """The previous or next version of the selected message (none selected: of the last one that has
        versions): its branch is shown, later turns and all, and the next message follows it."""
        app = self.app
        if app.busy or self.saving or app.chat is None:
            return
        views = self.chat_view.messages
        at = self.selected if self.selected is not None else \
            next((i for i in range(len(views) - 1, -1, -1) if views[i].version[1] > 1), None)
        if at is None or views[at].message_id is None or views[at].version[1] < 2:
            app.notify("this message has no other version (an edited prompt or a regenerated answer makes one)",
                       severity="warning")
            return
        k, n = views[at].version
        if not 1 <= k + step <= n:
            return
        try:
            siblings = self.session.store.siblings(views[at].message_id)
            self.session.switch(siblings[k - 1 + step].id)
        except (StoreError, ValueError, IndexError) as e:
            app.notify(error_text(e), severity="error")
            return
        self.show_conversation([m for m in self.session.opened.messages if m.role != "system"])
        self.select(at)
        self.update_status()

    def action_edit_message(self):
        """Put the selected prompt (none selected: the last) back in the input, the conversation taken back to
        before it; sending it starts a new branch there (the old turns stay on theirs, Alt+Left reaches them)."""
        app = self.app
        if app.busy or self.saving or app.chat is None:
            return
        views = self.chat_view.messages
        at = self.selected if self.selected is not None else \
            next((i for i in range(len(views) - 1, -1, -1) if views[i].role == "user"), None)
        if at is None or views[at].role != "user":
            app.notify("select one of your messages first (Alt+Up)", severity="warning")
            return
        try:
            text = self.session.edit(at)
        except ValueError as e:
            app.notify(str(e), severity="warning")
            return
        for v in views[at:]:
            v.remove()
        self.select(None)
        self.prompt.text = terminal_safe(text, body=True)
        self.prompt.focus()
        self.update_status()
