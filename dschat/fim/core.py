"""`dschat fim FILE`: fill-in-the-middle code insertion with the model's own FIM tokens.

    prompt = BOS <｜fim▁begin｜> prefix <｜fim▁hole｜> suffix <｜fim▁end｜>   ->  the model writes the middle

The splice: the hole is the `<FILL>` marker (or --at LINE[:COL]); the text before it is the prefix and the
text after it the suffix, each trimmed to a token budget at the line boundaries nearest the hole (more
prefix than suffix, as editor tools do). The model's text is inserted as generated, only ever cut: at
end-of-sentence or a FIM token, at --max-tokens, or where it starts repeating the suffix.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from dschat.conversation.template import bos
from dschat.engine import SamplingParams

MARKER = "<FILL>"
FIM_TOKENS = ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>")
PREFIX_SHARE = 0.75  # of the context budget, when both sides need more than their share


class FimError(Exception):
    pass


@dataclass(frozen=True)
class FimParams:
    """How a hole is filled: the prompt's token budget, split between prefix and suffix (`context`), the longest
    insertion, and sampling (greedy by default). `dschat fim` makes one from its flags (`from_args`); training's
    evaluation makes its own."""

    context: int = 4096
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "FimParams":
        return cls(context=args.context, max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                   seed=args.seed)


# -- finding the hole --------------------------------------------------------------------------------------------
def position(text: str, offset: int) -> tuple[int, int]:
    line = text.count("\n", 0, offset) + 1
    column = offset - (text.rfind("\n", 0, offset) + 1) + 1
    return line, column


def find_holes(text: str, at: str | None, fill_all: bool, name: str) -> list[int]:
    """Offsets of the holes (in the text with every marker still in place)."""
    marks = []
    i = text.find(MARKER)
    while i >= 0:
        marks.append(i)
        i = text.find(MARKER, i + len(MARKER))
    if at is not None:
        if marks:
            raise FimError(f"{name}: has a {MARKER} marker; use the marker or --at, not both")
        return [offset_of(text, at, name)]
    if not marks:
        raise FimError(f"{name}: no {MARKER} marker in the file (add one where the code should go, or use --at LINE[:COL])")
    if len(marks) > 1 and not fill_all:
        lines = ", ".join(str(position(text, m)[0]) for m in marks[:5])
        raise FimError(f"{name}: {len(marks)} {MARKER} markers (lines {lines}); use --all to fill each in turn")
    return marks


def offset_of(text: str, at: str, name: str) -> int:
    try:
        parts = [int(p) for p in at.split(":")]
        if len(parts) not in (1, 2) or min(parts) < 1:
            raise ValueError
    except ValueError:
        raise FimError(f"--at {at!r}: expected LINE or LINE:COL (1-based)") from None
    lines = text.split("\n")
    line, col = parts[0], parts[1] if len(parts) == 2 else None
    if line > len(lines):
        raise FimError(f"--at {at}: {name} has {len(lines)} lines")
    body = lines[line - 1]
    if line < len(lines) and body.endswith("\r"):  # a CRLF line in a mixed file: the hole stays before "\r"
        body = body[:-1]
    if col is None:
        col = len(body) + 1  # end of the line
    if col > len(body) + 1:
        raise FimError(f"--at {at}: line {line} has {len(body)} characters")
    return sum(len(s) + 1 for s in lines[: line - 1]) + col - 1


# -- the prompt ------------------------------------------------------------------------------------------------
def trim(prefix: str, suffix: str, count, budget: int) -> tuple[str, str]:
    """Keep whole lines nearest the hole within `budget` tokens (count(text) -> tokens): the prefix's last
    partial line and the suffix's first one always stay; the prefix gets PREFIX_SHARE of the budget unless
    the suffix needs less."""
    pre_lines = prefix.split("\n")
    suf_lines = suffix.split("\n")
    pre_head, pre_rest = pre_lines[-1], pre_lines[:-1]  # the cursor line's start stays whole
    suf_head, suf_rest = suf_lines[0], suf_lines[1:]
    pre_costs = [count(line + "\n") for line in reversed(pre_rest)]
    suf_costs = [count("\n" + line) for line in suf_rest]
    left = max(0, budget - count(pre_head) - count(suf_head))
    suf_want = sum(suf_costs)
    pre_budget = max(int(left * PREFIX_SHARE), left - suf_want)

    def take(costs, room):
        n = used = 0
        for c in costs:
            if used + c > room:
                break
            used += c
            n += 1
        return n, used

    n_pre, used = take(pre_costs, pre_budget)
    n_suf, _ = take(suf_costs, left - used)
    kept_prefix = "\n".join(pre_rest[len(pre_rest) - n_pre:] + [pre_head]) if n_pre else pre_head
    kept_suffix = "\n".join([suf_head] + suf_rest[:n_suf])
    return kept_prefix, kept_suffix


def fim_prompt(tok, prefix: str, suffix: str) -> list[int]:
    """The file's text is encoded as text: FIM or other special token strings in it stay characters."""
    begin, hole, end = (tok.token_id(t) for t in FIM_TOKENS)
    return bos(tok) + [begin, *tok.encode_plain(prefix), hole, *tok.encode_plain(suffix), end]


def cut_repeat(completion: str, suffix: str, at_line_start: bool) -> tuple[str, bool]:
    """Cut the completion before the first whole line of it that repeats the first non-empty line of the
    suffix. Its first line is a whole line only when the hole is at the start of a line."""
    target = next((line.strip() for line in suffix.split("\n") if line.strip()), None)
    if target is None:
        return completion, False
    offset = 0
    lines = completion.split("\n")
    for i, line in enumerate(lines[:-1]):  # lines that are complete (a newline follows)
        if (i > 0 or at_line_start) and line.strip() == target:
            return completion[:offset], True
        offset += len(line) + 1
    return completion, False


def fill(engine, tok, text: str, offset: int, params: FimParams) -> tuple[str, str]:
    """The insertion for a hole at `offset` of `text` (no marker inside), and why it stopped: "stop" (end of
    sentence or a FIM token), "length" (params.max_tokens) or "suffix" (it began repeating the suffix)."""
    insertion, reason, _ = fill_with_stats(engine, tok, text, offset, params)
    return insertion, reason


def fill_with_stats(engine, tok, text: str, offset: int, params: FimParams):
    """`fill`, and the generation's GenerationStats."""
    prefix, suffix = trim(text[:offset], text[offset:], lambda s: len(tok.encode_plain(s)), params.context)
    ids = fim_prompt(tok, prefix, suffix)
    stops = tuple(i for i in (tok.token_id(t) for t in FIM_TOKENS) if i is not None)
    generation = engine.generate(ids, SamplingParams(temperature=params.temperature, top_p=params.top_p,
                                                     seed=params.seed, max_tokens=params.max_tokens,
                                                     stop_token_ids=stops))
    decoder = tok.stream(skip_special_tokens=True)
    completion, reason = "", "length"
    at_line_start = offset == 0 or text[offset - 1] == "\n"
    try:
        for token in generation:
            if token in stops or token in engine.eos_token_ids:
                reason = "stop"
                break
            completion += decoder.push(token)
            if "\n" in completion:
                cut, repeated = cut_repeat(completion, suffix, at_line_start)
                if repeated:
                    return cut, "suffix", generation.stats
    finally:
        generation.close()  # an insertion cut short ends the generation now
    completion += decoder.flush()
    cut, repeated = cut_repeat(completion, suffix, at_line_start)
    return cut, "suffix" if repeated else reason, generation.stats
