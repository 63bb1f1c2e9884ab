"""The conversation being read: its messages, and a reply streaming into the last one from a worker thread.

It posts ChatView.Streamed after each piece shown (the screen updates the status line) and ChatView.Ended
when the reply's stream has ended (the screen saves it). It knows nothing of the history or the status line.
"""

from __future__ import annotations

import time

from textual import work
from textual.containers import VerticalScroll
from textual.message import Message

from dschat.tui.message_view import MessageView


class ChatView(VerticalScroll):
    class Streamed(Message):
        """A piece of the reply is shown; `stats` its generation's live GenerationStats."""

        def __init__(self, stats):
            super().__init__()
            self.stats = stats

    class Ended(Message):
        """The reply's stream ended (its end, Esc, an error): `reply` (a conversation.reply.Reply) is to be
        saved; `view` is its MessageView."""

        def __init__(self, reply, view: MessageView):
            super().__init__()
            self.reply, self.view = reply, view

    @property
    def messages(self) -> list[MessageView]:
        """The messages shown, in order (those being removed left out: removal completes later)."""
        return [v for v in self.query(MessageView) if not getattr(v, "_pruning", False)]

    def show(self, msgs):
        """Show these messages (the history's, system prompt left out) instead of what is shown."""
        self.remove_children()
        self.mount_all([MessageView(m.role, m.content, m.interrupted) for m in msgs])
        self.scroll_end(animate=False)

    def stream(self, reply, user_text: str | None = None) -> MessageView:
        """Show `user_text` (None: a regeneration, the prompt is shown already), then stream `reply` into a new
        message in a worker thread."""
        if user_text is not None:
            self.mount(MessageView("user", user_text))
        view = MessageView("assistant")
        self.mount(view)
        self.anchor()  # the view follows the stream while it is scrolled to the bottom
        self._generate(reply, view)
        return view

    @work(thread=True, exclusive=True, group="reply")
    def _generate(self, reply, view: MessageView):
        started = time.monotonic()

        def end_thinking():
            view.end_thinking(min(reply.thinking_tokens, len(reply.turn.output_ids)), time.monotonic() - started)

        reply.stream(lambda piece: self.app._ui(self._show_piece, view, piece, reply.stats, end_thinking),
                     lambda piece: self.app._ui(view.think, piece))
        self.app._ui(end_thinking)
        self.post_message(self.Ended(reply, view))  # thread-safe; after every piece (each waited for)

    async def _show_piece(self, view: MessageView, piece: str, stats, end_thinking=None):
        """One round trip to the UI thread per piece (the stream waits for it)."""
        if end_thinking is not None:
            end_thinking()  # the answer begins: a reasoning model's thinking folds away
        await view.append(piece)
        self.post_message(self.Streamed(stats))

    async def take_back(self, reply_view: MessageView, restored_answer: str | None):
        """A turn that left no trace: its reply goes, and its prompt with it; or, for a regeneration, the answer
        it was to replace (`restored_answer`) comes back."""
        await reply_view.remove()
        if restored_answer is not None:
            await self.mount(MessageView("assistant", restored_answer))
            return
        views = self.messages
        if views and views[-1].role == "user":
            await views[-1].remove()

    def last_reply(self) -> str | None:
        replies = [v for v in self.messages if v.role == "assistant"]
        return replies[-1].text.strip() if replies else None
