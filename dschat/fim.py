"""`dschat fim FILE`: fill-in-the-middle code insertion with the model's own FIM tokens.

    prompt = BOS <｜fim▁begin｜> prefix <｜fim▁hole｜> suffix <｜fim▁end｜>   ->  the model writes the middle

The splice: the hole is the `<FILL>` marker (or --at LINE[:COL]); the text before it is the prefix and the
text after it the suffix, each trimmed to a token budget at the line boundaries nearest the hole (more
prefix than suffix, as editor tools do). The model's text is inserted as generated, only ever cut: at
end-of-sentence or a FIM token, at --max-tokens, or where it starts repeating the suffix.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from dataclasses import dataclass

from dschat.engine import SamplingParams, Tokenizer, resolve

from .config import Settings
from .files import rewritable, rewrite
from .highlight import ansi, colour_terminal, lexer_for
from .options import add_model_options, add_output_options, command_parser
from .runtime import Options, load_engine, model_name, print_stats
from .source_file import MAX_SOURCE_BYTES, read_source
from .template import bos
from .terminal_text import for_output, json_for_output

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


# -- the command ------------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = command_parser(
        "fim",
        description="Fill a hole in a source file with the model's fill-in-the-middle tokens "
                    "(DeepSeek-Coder-V2, V2.5, V3).\n\n"
                    "  dschat fim app.py              the filled file on stdout\n"
                    "  dschat fim -i app.py           rewrite app.py in place (atomically)\n"
                    "  dschat fim --diff app.py       a unified diff of the change\n"
                    "  dschat fim --at 12:5 app.py    a hole at line 12, column 5 (no marker needed)\n"
                    "  cat app.py | dschat fim -      read the file from stdin",
        epilog=f"The hole is the marker {MARKER} (exactly one, or --all to fill each in turn, top to bottom).")
    p.add_argument("file", help=f"the source file (a regular file of at most {MAX_SOURCE_BYTES // 2**20} MiB), "
                                "or - for stdin")
    p.add_argument("--at", metavar="LINE[:COL]", help="the hole's position (1-based) in a file without a marker")
    p.add_argument("--all", action="store_true", help=f"fill every {MARKER} marker, top to bottom")
    out = p.add_mutually_exclusive_group()
    out.add_argument("-i", "--in-place", action="store_true", help="rewrite the file (temp file + rename)")
    out.add_argument("--diff", action="store_true", help="print a unified diff instead of the file")
    out.add_argument("--json", action="store_true",
                     help='print {"insertion", "line", "column", "stop_reason"} (a list with --all)')
    p.add_argument("--context", type=int, default=FimParams.context, metavar="TOKENS",
                   help=f"prompt budget split between prefix and suffix (default {FimParams.context})")
    p.add_argument("-n", "--max-tokens", type=int, default=FimParams.max_tokens,
                   help=f"longest insertion (default {FimParams.max_tokens})")
    p.add_argument("-t", "--temperature", type=float, default=FimParams.temperature, help="default 0: greedy")
    p.add_argument("--top-p", type=float, default=FimParams.top_p)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--lang", help="language for highlighting on a terminal (default: from the file name)")
    p.add_argument("--filename", help="file name to show and to guess the language from, for stdin")
    add_model_options(p)
    add_output_options(p)
    return p


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


def run_fim(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    check_args(args)
    src = read_source(args.file, args.filename)
    holes = find_holes(src.text, args.at, args.all, src.name)
    target = rewritable(src.path) if args.in_place else None  # before any work, not after it
    opts = Options.from_args(args, Settings.load())
    opts.model = model_name(opts)  # resolved once (the demo model's notice shows once)
    tok = Tokenizer.from_dir(resolve(opts.model, tokenizer_only=True))  # FIM tokens checked before any weights
    missing = [t for t in FIM_TOKENS if tok.token_id(t) is None]
    if missing:
        raise FimError(f"this model's tokenizer has no FIM tokens ({missing[0]}); use DeepSeek-Coder-V2, "
                       "V2.5 or V3 (DeepSeek-V2 was not trained for fill-in-the-middle)")
    results, filled = fill_holes(load_engine(opts), tok, src.text, holes, FimParams.from_args(args), args)
    if args.json:
        results = [{**r, "insertion": src.piece(r["insertion"])} for r in results]
        print(json_for_output(json.dumps(results if args.all else results[0], ensure_ascii=False), sys.stdout))
    elif args.diff:
        write_diff(src.restore(src.text), src.restore(filled), src.name)
    elif target is not None:
        rewrite(target, src.restore(filled), unchanged=src.snapshot)
    else:
        out = for_output(src.restore(filled), sys.stdout)  # model text: on a terminal without escape sequences
        sys.stdout.write(colour(out, args.lang, src.name) if colour_terminal() else out)
        sys.stdout.flush()
    return 0


def check_args(args):
    if args.in_place and args.file == "-":
        raise FimError("-i needs a file, not stdin")
    if args.context < 1:
        raise FimError(f"--context {args.context}: must be a positive number of tokens")
    if args.max_tokens < 1:
        raise FimError(f"--max-tokens {args.max_tokens}: must be at least 1")


def fill_holes(engine, tok, text: str, holes: list[int], params: FimParams, args) -> tuple[list[dict], str]:
    """Each hole filled in turn, top to bottom: what was inserted where, and the filled text (`args`: --at,
    --stats)."""
    results = []
    for _ in holes:
        if args.at is not None:
            offset = holes[0]
        else:
            offset = text.find(MARKER)
            text = text[:offset] + text[offset + len(MARKER):]
        insertion, reason, stats = fill_with_stats(engine, tok, text, offset, params)
        line, column = position(text, offset)
        results.append({"insertion": insertion, "line": line, "column": column, "stop_reason": reason})
        text = text[:offset] + insertion + text[offset:]
        if args.stats:
            print_stats(stats)
    return results, text


def colour(text: str, lang: str | None, name: str) -> str:
    """Syntax-highlighted by the language named, else by the file name's (plain when neither is known)."""
    lexer = lexer_for(lang, name, text)
    return ansi(text, lexer) if lexer else text


def diff_lines(text: str) -> list[str]:
    """Lines as `patch` sees them: ended by \n alone (str.splitlines also ends them at form feeds, lone CRs
    and other separators, which made a diff that patch rejects); each with its end."""
    parts = text.split("\n")
    return [p + "\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def unified_diff(before: str, after: str, name: str) -> str:
    """A unified diff `patch` applies; a last line without a line break is marked as diff marks it."""
    out = []
    for line in difflib.unified_diff(diff_lines(before), diff_lines(after), fromfile=f"a/{name}",
                                     tofile=f"b/{name}"):
        out.append(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
    return "".join(out)


def write_diff(before: str, after: str, name: str):
    diff = unified_diff(before, after, name)
    diff = for_output(diff, sys.stdout)
    sys.stdout.write(ansi(diff, lexer_for("diff")) if colour_terminal() else diff)
    sys.stdout.flush()
