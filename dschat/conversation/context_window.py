"""The model's context window, as the app uses it: the one place that decides whether a prompt fits, how many
tokens its reply may have, and whether a reply was cut short because the window was full. (The engine checks
its own input again: a prompt and max_tokens past the window are its ContextLengthError.)"""

from __future__ import annotations

from typing import Callable, Sequence

from dschat.conversation.prompt_fit import check_fits

REPLY_TOKENS = 2048  # the longest reply when nothing sets max_tokens (and the window has room)


class ContextWindow:
    def __init__(self, size: int, eos_token_ids: Sequence[int] = ()):
        self.size, self.eos_token_ids = size, tuple(eos_token_ids)

    def prompt_room(self, used: int) -> int:
        """How many prompt tokens may follow `used` ones (one position is kept for the reply)."""
        return self.size - 1 - used

    def check_prompt(self, text: str, used: int, encode: Callable[[str], list[int]], cuts=None):
        """PromptTooLong when `text`, after `used` tokens, is sure not to fit, found by tokenizing at most its
        tail (prompt_fit.py; `cuts`: where the tail may start, prompt_fit.cut_points)."""
        if cuts is None:
            check_fits(text, self.prompt_room(used), encode)
        else:
            check_fits(text, self.prompt_room(used), encode, cuts)

    def reply_room(self, prompt_tokens: int) -> int:
        """How many tokens a reply to a prompt of this length may have (a ContextLengthError when none)."""
        from dschat.engine import ContextLengthError  # deferred: torch

        room = self.size - prompt_tokens
        if room < 1:
            raise ContextLengthError(f"the prompt ({prompt_tokens} tokens) fills the context window "
                                     f"({self.size} tokens)")
        return room

    def max_tokens(self, prompt_tokens: int, wanted: int | None) -> int:
        """The reply's max_tokens: `wanted` (None: REPLY_TOKENS) within the room left."""
        room = self.reply_room(prompt_tokens)
        return int(min(REPLY_TOKENS if wanted is None else wanted, room))

    def cut_notice(self, prompt_tokens: int, output_ids: list[int], interrupted: bool) -> str | None:
        """What to tell the user when a reply stopped because the window was full (it used every position left
        and did not end with an end-of-turn token); None otherwise."""
        if not output_ids or interrupted or prompt_tokens + len(output_ids) < self.size:
            return None
        if output_ids[-1] in self.eos_token_ids:  # it ended on the last position
            return None
        return f"the reply was cut short: the context window ({self.size} tokens) is full; start a new conversation"
