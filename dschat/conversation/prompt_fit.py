"""A prompt too long for the context window, found without tokenizing all of it.

Tokenizing runs at about a million characters a second, and a conversation (an import continued with
--conversation, a file piped in) can render to millions of characters. So before a long text is tokenized,
its tail alone is: the last CHARS_PER_TOKEN characters for each token the window has left (more than
prose, code or CJK text needs per token). When that tail is already more tokens than are left, the prompt
cannot fit, and that is the error, at once. The tail starts after a line break that a non-space follows,
where DeepSeek's pre-tokenizers always split, or before a template's role or end token, where the
tokenizer splits first (`cut_points`), so its tokens are those the whole text has there; a text with no
such place in its tail, or a tail that fits, is tokenized whole as before."""

from __future__ import annotations

import re
from typing import Callable

CHARS_PER_TOKEN = 8
_LINE_START = re.compile(r"\n(?=\S)")


class PromptTooLong(ValueError):
    pass


def cut_points(tokens: tuple[str, ...], mark: str = "") -> re.Pattern:
    """Where a rendered prompt may be cut, as the end of a match: after a line break a non-space follows, or
    before one of `tokens` (a template's role and end tokens: the tokenizer splits its input at them before
    anything else, so each side is tokenized as the whole has it; V3-style templates write no line breaks)
    that `mark` does not precede (control tokens typed into a message are marked and are plain text)."""
    if not tokens:
        return _LINE_START
    alternatives = "|".join(map(re.escape, sorted(tokens, key=len, reverse=True)))
    before = f"(?<!{re.escape(mark)})" if mark else ""
    return re.compile(f"{_LINE_START.pattern}|{before}(?=(?:{alternatives}))")


def check_fits(text: str, room: int | None, encode: Callable[[str], list[int]], cuts: re.Pattern = _LINE_START):
    """Raise PromptTooLong when `text` is sure to be more than `room` tokens (None: no limit), tokenizing
    (`encode`) at most its last CHARS_PER_TOKEN * room characters (from the first of `cuts` there)."""
    if room is None or len(text) <= CHARS_PER_TOKEN * max(room, 1):
        return
    start = len(text) - CHARS_PER_TOKEN * max(room, 1)
    cut = next((m.end() for m in cuts.finditer(text, start)), None)
    if cut is None:
        return
    tail = len(encode(text[cut:]))
    if tail > room:
        raise PromptTooLong(f"the prompt does not fit the context window: its last {len(text) - cut:,} "
                            f"of {len(text):,} characters alone are {tail:,} tokens, more than the "
                            f"{max(room, 0):,} left")
