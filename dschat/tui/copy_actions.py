"""The chat screen's copying: the last reply, its last code block, or any code block picked from a list
(Ctrl+L). A mixin of ChatScreen (chat_screen.py)."""

from __future__ import annotations

import re

from dschat.tui.pick_screen import PickScreen

CODE_BLOCK = re.compile(r"```([^\n]*)\n(.*?)```", re.S)  # a fence's language, and its code


class CopyActions:
    def action_copy_reply(self):
        text = self.chat_view.last_reply()
        if text:
            self.app.copy_to_clipboard(text)
            self.app.notify("reply copied")

    def action_copy_code(self):
        blocks = CODE_BLOCK.findall(self.chat_view.last_reply() or "")
        if not blocks:
            self.app.notify("the last reply has no code block", severity="warning")
            return
        self.app.copy_to_clipboard(blocks[-1][1])
        self.app.notify("code block copied")

    def action_pick_code(self):
        """Every code block of the replies shown, numbered in a list (the last one highlighted): the one picked
        is copied, as Copy code block copies the last."""
        blocks = [b for v in self.chat_view.messages if v.role == "assistant" for b in CODE_BLOCK.findall(v.text)]
        if not blocks:
            self.app.notify("no reply here has a code block", severity="warning")
            return

        def item(lang: str, code: str) -> str:
            first = next((line.strip() for line in code.splitlines() if line.strip()), "")
            first = first if len(first) <= 50 else first[:49] + "…"
            lines = len(code.splitlines())
            return f"{lang.strip() or 'code'}: {first}  ({lines} line{'s' if lines != 1 else ''})"

        def done(i: int | None):
            if i is not None:
                self.app.copy_to_clipboard(blocks[i][1])
                self.app.notify(f"code block {i + 1} copied")

        self.app.push_screen(PickScreen("Copy which code block?", [item(*b) for b in blocks]), done)
