"""Subcommands: fim, sessions, export, import, rm, rename, replay."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path


def run(name: str, argv: list[str]) -> int:
    if name == "fim":
        from .fim import run_fim

        return run_fim(argv)
    return {"sessions": cmd_sessions, "export": cmd_export, "import": cmd_import, "rm": cmd_rm,
            "rename": cmd_rename, "replay": cmd_replay}[name](argv)


def _store():
    from .store import Store

    return Store()


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"dschat {prog}", description=description)
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return p


# -- sessions / export / import / rm / rename ----------------------------------------------------------------------
def cmd_sessions(argv) -> int:
    p = _parser("sessions", "List saved conversations, newest first.")
    p.add_argument("--search", metavar="TEXT", help="only conversations whose messages or title match (full text)")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.add_argument("-n", type=int, default=None, metavar="N", help="at most N conversations")
    args = p.parse_args(argv)
    store = _store()
    try:
        rows = store.list(search=args.search, limit=args.n)
    finally:
        store.close()
    if args.json:
        print(json.dumps(rows, ensure_ascii=False, indent=None))
        return 0
    if not rows:
        print("no saved conversations" + (f" match {args.search!r}" if args.search else ""))
        return 0
    for r in rows:
        when = dt.datetime.fromtimestamp(r["updated"]).strftime("%Y-%m-%d %H:%M")
        model = Path(str(r.get("model") or "")).name or "?"
        print(f"{r['id']}  {when}  {r['messages']:>3} msgs  {model:<24.24}  {r['title']}")
    return 0


def cmd_export(argv) -> int:
    p = _parser("export", "Print a saved conversation as JSON (for `dschat import` and `dschat replay`) or "
                          "Markdown (for reading).")
    p.add_argument("id", help="conversation id (a unique prefix will do)")
    p.add_argument("--format", choices=["json", "md"], default="json")
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE (atomically) instead of stdout")
    args = p.parse_args(argv)
    store = _store()
    try:
        cid = store.resolve_id(args.id)
        text = (json.dumps(store.export_json(cid), ensure_ascii=False, indent=2) + "\n"
                if args.format == "json" else store.export_markdown(cid))
    finally:
        store.close()
    if args.output:
        from .files import atomic_write_text

        atomic_write_text(args.output, text)
    else:
        sys.stdout.write(text)
    return 0


def read_json_file(path: str) -> dict:
    from .store import StoreError

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StoreError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise StoreError(f"{path}: not a conversation file ({e})") from None
    if not isinstance(data, dict):
        raise StoreError(f"{path}: not a conversation file (expected a JSON object)")
    return data


def cmd_import(argv) -> int:
    p = _parser("import", "Add a conversation exported with `dschat export --format json`.")
    p.add_argument("file")
    args = p.parse_args(argv)
    data = read_json_file(args.file)
    store = _store()
    try:
        print(store.import_json(data))
    finally:
        store.close()
    return 0


def cmd_rm(argv) -> int:
    p = _parser("rm", "Delete saved conversations.")
    p.add_argument("ids", nargs="+", metavar="ID")
    args = p.parse_args(argv)
    store = _store()
    try:
        for cid in [store.resolve_id(i) for i in args.ids]:
            store.delete(cid)
            print(f"deleted {cid}")
    finally:
        store.close()
    return 0


def cmd_rename(argv) -> int:
    p = _parser("rename", "Give a saved conversation a new title.")
    p.add_argument("id")
    p.add_argument("title", nargs="+")
    args = p.parse_args(argv)
    store = _store()
    try:
        cid = store.resolve_id(args.id)
        store.rename(cid, " ".join(args.title))
    finally:
        store.close()
    return 0


# -- replay -------------------------------------------------------------------------------------------------------
def cmd_replay(argv) -> int:
    from .cli import add_model_options, add_sampling_options, load_engine, print_stats, sampling_params, settings

    p = argparse.ArgumentParser(
        prog="dschat replay", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Re-run the user turns of a saved conversation through a model, printing the transcript.\n\n"
                    "  dschat replay a1b2c3d4                     the saved model, the saved settings\n"
                    "  dschat replay chat.json --model NEW        another model\n"
                    "  dschat replay a1b2c3d4 --compare           a regression check: does each answer still\n"
                    "                                             equal the saved one? (exit 1 if not)",
        epilog="With --compare, sampling defaults to greedy (temperature 0) and every turn runs on the saved\n"
               "history, so a difference in one turn does not spill into the next; when the weights are the\n"
               "saved ones, each turn runs on exactly the saved prompt token ids.")
    p.add_argument("source", help="a conversation id, or a JSON file from `dschat export`")
    p.add_argument("--compare", action="store_true", help="report, turn by turn, whether the answer is unchanged")
    p.add_argument("--stats", action="store_true", help="print one JSON line of statistics per turn on stderr")
    p.add_argument("--debug", action="store_true")
    add_model_options(p)
    add_sampling_options(p)
    args = p.parse_args(argv)
    data = load_source(args.source)
    conf = settings()
    if args.model is None:
        args.model = data.get("model")
        if not args.model:
            raise ValueError("the conversation names no model; pass --model")
    saved = data.get("params") or {}
    for key in ("temperature", "top_p", "top_k", "seed", "max_tokens"):
        if getattr(args, key) is None:
            if args.compare and key == "temperature":
                args.temperature = 0.0
            elif key in saved:
                setattr(args, key, saved[key])
    engine = load_engine(args, conf)
    return replay(engine, data, args, conf, print_stats, sampling_params)


def load_source(source: str) -> dict:
    if Path(source).is_file() or source.endswith(".json"):
        return read_json_file(source)
    store = _store()
    try:
        return store.export_json(store.resolve_id(source))
    finally:
        store.close()


def replay(engine, data: dict, args, conf, print_stats, sampling_params) -> int:
    from .chat import Chat, Turn

    messages = [m for m in data.get("messages", []) if m.get("role") in ("user", "assistant")]
    same_weights = data.get("fingerprint") == engine.fingerprint
    chat = Chat(engine, system=data.get("system"))
    out = sys.stdout
    differ = 0
    turn_no = 0
    for i, m in enumerate(messages):
        if m["role"] != "user":
            continue
        turn_no += 1
        saved = messages[i + 1] if i + 1 < len(messages) and messages[i + 1]["role"] == "assistant" else None
        if args.compare and same_weights and m.get("token_ids"):
            turn = Turn(m["content"], "", list(m["token_ids"]), True)  # exactly what ran before
        else:
            turn = chat.turn(m["content"])
        params = sampling_params(args, conf, engine, len(turn.prompt_ids))
        out.write(f"── user ({turn_no}) ──\n{m['content'].rstrip()}\n── assistant ──\n")
        out.flush()
        for piece in chat.stream(turn, params):
            out.write(piece)
            out.flush()
        out.write("\n")
        if args.stats:
            print_stats(engine)
        if args.compare:
            verdict, ok = compare(saved, turn, same_weights)
            differ += not ok
            out.write(f"── turn {turn_no}: {verdict}\n")
        out.flush()
        if args.compare and saved is not None:
            # the next turn runs on the saved history, not on this answer
            chat.messages += [{"role": "user", "content": m["content"]},
                              {"role": "assistant", "content": saved["content"]}]
            ids = saved.get("token_ids")
            if same_weights and m.get("token_ids") and ids is not None:
                chat.ids, chat.text = list(m["token_ids"]) + list(ids), None
            else:
                chat.ids, chat.text = [], None
        else:
            chat.commit(turn)
    if args.compare:
        total = turn_no
        out.write(f"{total - differ} of {total} turns unchanged\n")
        return 1 if differ else 0
    return 0


def compare(saved: dict | None, turn, same_weights: bool) -> tuple[str, bool]:
    """('same' | where it first differs, ok)."""
    if saved is None:
        return "no saved answer to compare with", False
    new_text, old_text = turn.content, saved["content"]
    old_ids = saved.get("token_ids")
    if same_weights and old_ids is not None:
        if list(old_ids) == turn.output_ids:
            return "same (token for token)", True
        k = next((j for j, (a, b) in enumerate(zip(old_ids, turn.output_ids)) if a != b),
                 min(len(old_ids), len(turn.output_ids)))
        where = f"token {k}"
    elif new_text == old_text:
        return "same", True
    else:
        where = None
    c = next((j for j, (a, b) in enumerate(zip(old_text, new_text)) if a != b), min(len(old_text), len(new_text)))
    if where is None:
        where = f"character {c}"
    line = old_text.count("\n", 0, c) + 1
    return (f"DIFFERS at {where} (line {line}): saved {snippet(old_text, c)!r}, now {snippet(new_text, c)!r}",
            False)


def snippet(text: str, at: int, width: int = 30) -> str:
    return text[max(0, at - 10): at + width]
