"""Fill-in-the-middle examples cut the way `dschat fim` cuts files.

A hole is a span [a, b) of a source file; the model sees the file without it, exactly as `dschat fim` would
send that file with its cursor at `a` (the app's own `trim` to the context budget at line boundaries, and its
own `fim_prompt`, BOS included), and learns to write the span, then end-of-sentence. Three kinds of hole:

  line   a whole line after its indentation (a <FILL> marker alone on an indented line);
  rest   the rest of a line from a point inside its code (a cursor in the middle of a line);
  block  several consecutive lines, from the first one's indentation to the end of the last one.
"""

from __future__ import annotations

import random
from functools import lru_cache

from dschat.fim.core import fim_prompt, trim

KINDS = {"line": 0.35, "rest": 0.3, "block": 0.35}  # how often each kind is cut for training
BLOCK_LINES = (2, 2, 3, 3, 4, 5, 6, 8)


def line_table(text: str) -> list[tuple[int, int, int]]:
    """(start, code start after the indentation, end before the newline) of every line."""
    out, start = [], 0
    for line in text.split("\n"):
        out.append((start, start + len(line) - len(line.lstrip()), start + len(line)))
        start += len(line) + 1
    return out


def pick_hole(lines: list[tuple[int, int, int]], rng: random.Random, kind: str) -> tuple[int, int] | None:
    """A hole of `kind` in a file with this line table, or None when the file has no place for one."""
    code = [i for i, (_, c, e) in enumerate(lines) if e - c >= (4 if kind == "rest" else 2)]
    if not code:
        return None
    i = rng.choice(code)
    _, c, e = lines[i]
    if kind == "line":
        return c, e
    if kind == "rest":
        return rng.randint(c + 1, e - 1), e
    j = i + rng.choice(BLOCK_LINES) - 1
    while j > i and (j >= len(lines) or lines[j][2] == lines[j][1]):  # end on a line with code
        j -= 1
    return (c, lines[j][2]) if j > i else None


def token_counter(tok):
    """Tokens in a piece of text, as `dschat fim`'s `fill` counts them when it trims (the file's text encoded
    as plain text); memoised, since a worker sees the same lines again and again."""
    return lru_cache(maxsize=1 << 20)(lambda s: len(tok.encode_plain(s)))


def hole_prompt(tok, text: str, offset: int, context: int, count) -> list[int]:
    """The ids `dschat fim --context CONTEXT` sends for a hole at `offset` of `text` (no marker in it)."""
    prefix, suffix = trim(text[:offset], text[offset:], count, context)
    return fim_prompt(tok, prefix, suffix)


def fim_example(tok, text: str, hole: tuple[int, int], context: int, max_middle: int, count):
    """(ids, labels) for the hole, or None when the middle is longer than max_middle tokens. Labels are
    -100 on the prompt; the middle and end-of-sentence are learnt."""
    a, b = hole
    middle = tok.encode_plain(text[a:b]) + [tok.eos_token_id]
    if len(middle) > max_middle:
        return None
    prompt = hole_prompt(tok, text[:a] + text[b:], a, context, count)
    return prompt + middle, [-100] * len(prompt) + middle


def pick_kind(rng: random.Random) -> str:
    return rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
