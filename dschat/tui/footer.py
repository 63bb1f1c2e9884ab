"""The footer: the chat screen's keys. Below NARROW columns (80×24, say) it is compact and the keys' names
are short, so that every key shown fits; the full names are in F1 and the command palette."""

from __future__ import annotations

from textual.widgets import Footer
from textual.widgets._footer import FooterKey

NARROW = 100  # columns: below this the sidebar narrows too (chat.tcss: ChatScreen.-narrow)
SHORT = {"new_chat": "New", "regenerate": "Regen", "copy_reply": "Copy", "toggle_sidebar": "Sidebar"}


class ChatFooter(Footer):
    def compose(self):
        narrow = self.app.size.width < NARROW
        self.compact = narrow
        for widget in super().compose():
            if narrow and isinstance(widget, FooterKey):
                widget.description = SHORT.get(widget.action, widget.description)
            yield widget

    def on_resize(self):
        if (self.app.size.width < NARROW) != self.compact:
            self.call_after_refresh(self.recompose)
