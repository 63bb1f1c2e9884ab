"""One message of the conversation: who wrote it, then its Markdown, which a reply streams into."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Collapsible, Label, Markdown, Static

from dschat.terminal.text import SafeStream, terminal_safe
from dschat.tui.reply_markdown import ReplyMarkdown


class MessageView(Vertical):
    """One message: who wrote it, then its Markdown (a user's message: its text as typed). `text` is the message as written (copied as it is);
    what is shown has no escape sequences or control characters (dschat.terminal.text): a reply or a stored
    message cannot set the terminal's title, clear the screen or reorder what is shown."""

    def __init__(self, role: str, text: str = "", interrupted: bool = False):
        super().__init__(classes=f"message {role}")
        self.role, self.text, self.interrupted = role, text, interrupted
        self.stream = None
        self.safe = SafeStream()  # a sequence split over pieces is removed whole
        self.reasoning = ""  # a reasoning model's thinking, shown apart in a collapsible block
        self.thinking: Collapsible | None = None
        self.thought = False  # the thinking ended (its block collapsed, its length in its title)
        self.message_id: str | None = None  # in the history, once saved
        self.version = (1, 1)  # its place among its versions (siblings: edited prompts, regenerated answers)

    def compose(self) -> ComposeResult:
        yield Label(self.title(), classes="role")
        if self.role == "user":  # as typed: line breaks, indentation, "#" and "*" kept (not Markdown)
            yield Static(terminal_safe(self.text, body=True), markup=False, classes="typed")
        else:
            yield ReplyMarkdown(terminal_safe(self.text, body=True), code_theme=getattr(self.app, "code_theme", None))

    def title(self) -> str:
        name = {"user": "You", "assistant": "Assistant", "system": "System"}[self.role]
        k, n = self.version
        return name + (f"  ‹{k}/{n}›" if n > 1 else "") + ("  (stopped)" if self.interrupted else "")

    def set_version(self, message_id: str, k: int, n: int):
        """Which saved message this is, and its place among its versions ("2/3" in its title when it has any)."""
        self.message_id, self.version = message_id, (k, n)
        for label in self.query(".role"):  # once composed (until then compose uses the title)
            label.update(self.title())

    async def append(self, piece: str):
        if self.stream is None:
            self.stream = Markdown.get_stream(self.query_one(Markdown))
        self.text += piece
        shown = self.safe.feed(piece)
        if shown:
            await self.stream.write(shown)

    async def think(self, piece: str):
        """A piece of a reasoning model's thinking: into the "Thinking" block (open while it streams)."""
        if self.thinking is None:
            self.thinking = Collapsible(Static(classes="thinking-text"), title="Thinking…", collapsed=False,
                                        classes="thinking")
            await self.mount(self.thinking, before=self.query_one(Markdown))
        self.reasoning += piece
        self.thinking.query_one(".thinking-text", Static).update(Text(terminal_safe(self.reasoning, body=True)))

    def end_thinking(self, tokens: int, seconds: float):
        """The answer starts (or the reply ended): the thinking folds away, its length and time in its title
        (Enter or a click on it opens it again)."""
        if self.thinking is not None and not self.thought:
            self.thought = True
            self.thinking.title = f"Thinking ({tokens:,} tokens, {seconds:.1f} s)"
            self.thinking.collapsed = True

    async def finish(self, interrupted: bool):
        if self.stream is not None:
            rest = self.safe.flush()
            if rest:
                await self.stream.write(rest)
            await self.stream.stop()
            self.stream = None
        self.interrupted = interrupted
        self.query_one(".role", Label).update(self.title())
