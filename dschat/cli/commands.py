"""The subcommands on saved conversations: conversations, export, import, rm, rename."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

from dschat.errors import UsageError
from dschat.files import write_conversation
from dschat.cli.flags import command_parser
from dschat.history.store import Store
from dschat.history.transfer import read_json_file
from dschat.terminal.text import for_output, json_for_output, terminal_safe

TITLE_SHOWN = 80  # characters of a title `conversations` shows


def run(name: str, argv: list[str]) -> int:
    return {"conversations": cmd_conversations, "sessions": cmd_conversations,  # sessions: the old name
            "export": cmd_export, "import": cmd_import, "rm": cmd_rm, "rename": cmd_rename}[name](argv)


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = command_parser(prog, description)
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return p


def cmd_conversations(argv) -> int:
    p = _parser("conversations", "List saved conversations, newest first.")
    p.add_argument("--search", metavar="TEXT", help="only conversations whose messages or title match (full text)")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.add_argument("-n", type=int, default=None, metavar="N", help="at most N conversations")
    args = p.parse_args(argv)
    if args.n is not None and args.n < 1:
        raise UsageError(f"-n {args.n}: must be a positive number of conversations")
    with Store() as store:
        rows = store.list(search=args.search, limit=args.n)
    if args.json:
        print(json_for_output(json.dumps(rows, ensure_ascii=False, indent=None), sys.stdout))
        return 0
    if not rows:
        print("no saved conversations" + (f" match {args.search!r}" if args.search else ""))
        return 0
    for r in rows:
        when = dt.datetime.fromtimestamp(r["updated"]).strftime("%Y-%m-%d %H:%M")
        model = terminal_safe(Path(str(r.get("model") or "")).name) or "?"
        title = terminal_safe(r["title"][:TITLE_SHOWN + 1])  # a title of megabytes (an older import) is cut
        title = title if len(title) <= TITLE_SHOWN else title[:TITLE_SHOWN - 1] + "…"
        print(f"{r['id']}  {when}  {r['messages']:>3} msgs  {model:<24.24}  {title}")
    return 0


def cmd_export(argv) -> int:
    p = _parser("export", "Print a saved conversation as JSON (for `dschat import` and `dschat replay`) or "
                          "Markdown (for reading).")
    p.add_argument("id", metavar="ID", help="conversation id (a unique prefix will do)")
    p.add_argument("--format", choices=["json", "md"], default="json")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="write to FILE instead of stdout (a new file is private, 0600, as the history is; a file "
                        "there is replaced atomically, keeping its mode, through a symlink its target; a FIFO or a "
                        "terminal gets it streamed)")
    args = p.parse_args(argv)
    with Store() as store:
        text = store.export_text(store.resolve_id(args.id), args.format)
    if args.output:
        write_conversation(args.output, text)
    else:  # on a terminal, without its escape sequences
        sys.stdout.write(for_output(text, sys.stdout))
    return 0


def cmd_import(argv) -> int:
    p = _parser("import", "Add a conversation exported with `dschat export --format json`.")
    p.add_argument("file", metavar="FILE", help="a JSON file written by `dschat export ID --format json`")
    args = p.parse_args(argv)
    data = read_json_file(args.file)
    with Store() as store:
        print(store.import_json(data))
    return 0


def cmd_rm(argv) -> int:
    p = _parser("rm", "Delete saved conversations.")
    p.add_argument("ids", nargs="+", metavar="ID", help="conversation ids (a unique prefix will do)")
    args = p.parse_args(argv)
    with Store() as store:
        for cid in [store.resolve_id(i) for i in args.ids]:
            store.delete(cid)
            print(f"deleted {cid}")
    return 0


def cmd_rename(argv) -> int:
    p = _parser("rename", "Give a saved conversation a new title.")
    p.add_argument("id", metavar="ID", help="conversation id (a unique prefix will do)")
    p.add_argument("title", nargs="+", metavar="TITLE", help="the new title (several words are joined by spaces)")
    args = p.parse_args(argv)
    with Store() as store:
        store.rename(store.resolve_id(args.id), " ".join(args.title))
    return 0
