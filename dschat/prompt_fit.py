"""A prompt too long for the context window, found without tokenizing all of it.

Tokenizing runs at about a million characters a second, and a conversation (an import continued with
--conversation, a file piped in) can render to millions of characters. So before a long text is tokenized,
its tail alone is: the last CHARS_PER_TOKEN characters for each token the window has left (more than
prose, code or CJK text needs per token). When that tail is already more tokens than are left, the prompt
cannot fit, and that is the error, at once. The tail starts after a line break that a non-space follows,
where DeepSeek's pre-tokenizers always split, so its tokens are those the whole text has there; a text
with no such line break, or a tail that fits, is tokenized whole as before."""

from __future__ import annotations

import re
from typing import Callable

CHARS_PER_TOKEN = 8
_LINE_START = re.compile(r"\n(?=\S)")


class PromptTooLong(ValueError):
    pass


def check_fits(text: str, room: int | None, encode: Callable[[str], list[int]]):
    """Raise PromptTooLong when `text` is sure to be more than `room` tokens (None: no limit), tokenizing
    (`encode`) at most its last CHARS_PER_TOKEN * room characters."""
    if room is None or len(text) <= CHARS_PER_TOKEN * max(room, 1):
        return
    line = _LINE_START.search(text, len(text) - CHARS_PER_TOKEN * max(room, 1))
    if line is None:
        return
    tail = len(encode(text[line.end():]))
    if tail > room:
        raise PromptTooLong(f"the prompt does not fit the context window: its last {len(text) - line.end():,} "
                            f"of {len(text):,} characters alone are {tail:,} tokens, more than the "
                            f"{max(room, 0):,} left")
