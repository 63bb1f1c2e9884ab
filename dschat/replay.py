"""`dschat replay`: re-run the user turns of a saved conversation through a model; with --compare, a
regression check of each answer against the saved one."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from .chat import Chat, Turn
from .config import Settings
from .options import add_model_options, add_sampling_options
from .runtime import Options, load_engine, print_stats, sampling_params
from .store import Store, read_json_file

SAMPLING = ("temperature", "top_p", "top_k", "seed", "max_tokens")


def parser() -> argparse.ArgumentParser:
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
    return p


def run_replay(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    data = load_source(args.source)
    opts = replay_options(Options.from_args(args, Settings.load()), data, args.compare)
    return replay(load_engine(opts), data, opts, args.compare)


def replay_options(opts: Options, data: dict, compare: bool) -> Options:
    """The saved model and sampling settings where no flag overrides them (greedy by default to compare)."""
    model = opts.model or data.get("model")
    if not model:
        raise ValueError("the conversation names no model; pass --model")
    saved = dict(data.get("params") or {})
    if compare:
        saved["temperature"] = 0.0
    unset = {k: saved[k] for k in SAMPLING if getattr(opts, k) is None and k in saved}
    return replace(opts, model=model, **unset)


def load_source(source: str) -> dict:
    if Path(source).is_file() or source.endswith(".json"):
        return read_json_file(source)
    with Store() as store:
        return store.export_json(store.resolve_id(source))


def replay(engine, data: dict, opts: Options, compare_answers: bool) -> int:
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
        if compare_answers and same_weights and m.get("token_ids"):
            turn = Turn(m["content"], "", list(m["token_ids"]), True)  # exactly what ran before
        else:
            turn = chat.turn(m["content"])
        params = sampling_params(opts, engine, len(turn.prompt_ids))
        out.write(f"── user ({turn_no}) ──\n{m['content'].rstrip()}\n── assistant ──\n")
        out.flush()
        for piece in chat.stream(turn, params):
            out.write(piece)
            out.flush()
        out.write("\n")
        if opts.stats:
            print_stats(engine.stats)
        if compare_answers:
            verdict, ok = compare(saved, turn, same_weights)
            differ += not ok
            out.write(f"── turn {turn_no}: {verdict}\n")
        out.flush()
        if compare_answers and saved is not None:
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
    if compare_answers:
        out.write(f"{turn_no - differ} of {turn_no} turns unchanged\n")
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
