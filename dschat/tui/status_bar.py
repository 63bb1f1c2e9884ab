"""The status line under the input: what the app is doing, the context used, the last reply's figures."""

from __future__ import annotations

from textual.widgets import Static

from dschat.terminal.text import terminal_safe


class StatusBar(Static):
    """One line of plain text (no markup: a path or a model's message may hold "[/]"), without escape
    sequences or control characters. The screen tells it what to show; it posts nothing."""

    def __init__(self, **kw):
        super().__init__("", markup=False, **kw)

    def say(self, text: str):
        self.update(terminal_safe(text))

    def figures(self, *, busy: bool, used: int, context_length: int, stats=None, speculative: str | None = None):
        """Ready or streaming, the context used, and the figures of `stats` (a GenerationStats, or None)."""
        parts = ["streaming · Esc stops" if busy else "ready", f"context {used}/{context_length}"]
        s = stats
        if s is not None:
            if s.decode_tokens_per_s:
                parts.append(f"{s.decode_tokens_per_s:.1f} tok/s")
            parts.append(f"reused {s.cached_tokens}")
            if s.draft_tokens:
                kind = "MTP" if speculative == "mtp" else "n-gram"
                parts.append(f"{kind} {s.accepted_tokens}/{s.draft_tokens} accepted")
            if s.tokens_per_forward:  # what drafting really gained (1.00: nothing)
                parts.append(f"{s.tokens_per_forward:.2f} tok/forward")
        self.say("  ·  ".join(parts))
