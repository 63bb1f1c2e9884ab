"""`dschat fim FILE`: the command around the fill (dschat.fim.core): its flags, the source file read and written
back byte for byte, several holes in turn, and the output as a file, a diff or JSON."""

from __future__ import annotations

import argparse
import difflib
import json
import sys

from dschat.cli.flags import add_model_options, add_output_options, add_server_options, command_parser
from dschat.engine import Tokenizer, resolve
from dschat.files import rewritable, rewrite
from dschat.fim.core import FIM_TOKENS, MARKER, FimError, FimParams, fill_with_stats, find_holes, position
from dschat.fim.source_file import MAX_SOURCE_BYTES, read_source
from dschat.runtime import Options, load_engine, model_name, print_stats
from dschat.serve.client import find as find_server
from dschat.settings.config import Settings
from dschat.terminal.highlight import ansi, colour_terminal, lexer_for
from dschat.terminal.text import for_output, json_for_output, say


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
    p.add_argument("--at", metavar="LINE[:COL]", help="the hole's position (1-based) in a file without a marker; "
                                                      "LINE alone is the end of that line")
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
    add_server_options(p)
    add_output_options(p)
    return p


def run_fim(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    check_args(args)
    src = read_source(args.file, args.filename)
    holes = find_holes(src.text, args.at, args.all, src.name)
    target = rewritable(src.path) if args.in_place else None  # before any work, not after it
    opts = Options.from_args(args, Settings.load())
    engine = find_server(opts, say)  # a running `dschat serve`, else the model loads here (after the check)
    if engine is None:
        opts.model = model_name(opts)  # resolved once (the demo model's notice shows once)
    tok = engine.tokenizer if engine is not None else \
        Tokenizer.from_dir(resolve(opts.model, tokenizer_only=True))  # FIM tokens checked before any weights
    missing = [t for t in FIM_TOKENS if tok.token_id(t) is None]
    if missing:
        raise FimError(f"this model's tokenizer has no FIM tokens ({missing[0]}); use DeepSeek-Coder-V2, "
                       "V2.5 or V3 (DeepSeek-V2 was not trained for fill-in-the-middle)")
    results, filled = fill_holes(engine or load_engine(opts), tok, src.text, holes, FimParams.from_args(args), args)
    for r in results:
        if not r["insertion"] and not args.json:  # the file changes only by the marker it loses: say so
            say(f"dschat: the model inserted nothing at {src.name}:{r['line']}:{r['column']} "
                f"({r['stop_reason']})" + ("" if args.at is not None else f"; the {MARKER} marker is removed"))
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
