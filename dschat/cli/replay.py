"""`dschat replay`: re-run the user turns of a saved conversation through a model; with --compare, a
regression check of each answer against the saved one."""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import replace

from dschat.conversation.chat import Chat, Turn
from dschat.settings.config import Settings
from dschat.cli.flags import add_model_options, add_output_options, add_sampling_options, command_parser
from dschat.runtime import Options, load_engine, print_stats, session_settings
from dschat.errors import UsageError
from dschat.conversation.session import ChatSession, Sampling
from dschat.settings.checks import problem
from dschat.history.store import Store, StoreError
from dschat.history.transfer import names_a_file, read_json_file, system_changes, validate_export
from dschat.terminal.text import SafeStream, terminal_safe

SAMPLING = ("temperature", "top_p", "top_k", "seed", "max_tokens")


def parser() -> argparse.ArgumentParser:
    p = command_parser(
        "replay",
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
    add_model_options(p)
    add_sampling_options(p)
    add_output_options(p)
    return p


def run_replay(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    data = load_source(args.source)
    given = Options.from_args(args, Settings.load())
    flags = frozenset(k for k in SAMPLING if getattr(given, k) is not None)
    opts = replay_options(given, data, args.compare)
    return replay(load_engine(opts), data, opts, args.compare, flags)


def replay_options(opts: Options, data: dict, compare: bool) -> Options:
    """The saved model and sampling settings where no flag overrides them (greedy by default to compare).
    A model the conversation names is used only when it is here (a directory, or in the Hugging Face cache):
    a file never starts a download; --model does."""
    model = opts.model or data.get("model")
    if not model:
        raise UsageError("the conversation names no model; pass --model")
    if not opts.model and model != "demo":
        from dschat.engine import ModelError, resolve  # deferred: torch

        try:
            model = str(resolve(model, download=False))
        except ModelError:
            raise UsageError(f"the conversation names the model {model!r}, which is not here (no such directory, "
                             f"not in the Hugging Face cache); replay downloads nothing a file names: pass "
                             f"--model {model!r} to fetch it, or --model another") from None
    saved = dict(data.get("params") or {})
    for key in SAMPLING:
        why = problem(key, saved.get(key))
        if why:
            raise UsageError(f'the conversation\'s "params": "{key}" {why}, not {saved[key]!r}')
    if compare:
        saved["temperature"] = 0.0
    unset = {k: saved[k] for k in SAMPLING if getattr(opts, k) is None and k in saved}
    return replace(opts, model=model, **unset)


def load_source(source: str) -> dict:
    """The conversation to replay, checked as `import` checks a file."""
    if names_a_file(source):
        data = read_json_file(source)
        try:
            validate_export(data)
        except StoreError as e:
            raise StoreError(f"{source}: {e}") from None
        return data
    with Store() as store:
        return store.export_json(store.resolve_id(source))


def replay(engine, data: dict, opts: Options, compare_answers: bool, flags: frozenset = frozenset()) -> int:
    same_weights = data.get("fingerprint") == engine.fingerprint
    session = ChatSession(engine, replace(session_settings(opts), no_save=True, continue_latest=False, conversation=None))
    start, _ = system_changes(data)
    chat = session.chat = Chat(engine.tokenizer, system=start)
    base = session.sampling  # the flags' and the conversation's settings (greedy to compare, unless a flag says)
    out = sys.stdout
    differ = 0
    exchanges = pairs(data.get("messages", []))
    for n, (user, saved, system) in enumerate(exchanges, start=1):
        if system is not None and system != (chat.system or ""):  # `/system` was set here (export places it)
            chat.set_system(system)
            out.write(f"── system prompt changed ──\n{terminal_safe(system.rstrip(), body=True) or '(none)'}\n")
        exact = compare_answers and same_weights and ids_spell(engine.tokenizer, user, n)
        # exactly the prompt that ran before, or the prompt this model renders
        turn = Turn(user["content"], "", list(user["token_ids"]), True) if exact else chat.turn(user["content"])
        out.write(f"── user ({n}) ──\n{terminal_safe(user['content'].rstrip(), body=True)}\n── assistant ──\n")
        out.flush()
        safe = SafeStream()

        def show(piece: str):
            out.write(safe.feed(piece))
            out.flush()

        session.sampling, how = base, describe(base)
        if compare_answers:
            again = sampled_again(saved, base, flags)
            if again is not None:
                session.sampling, how = again, "sampled again as saved: " + describe(again)
        reply = session.reply(turn).run(show)  # nothing saved: the exchange joins the chat (or not, below)
        reply.reraise()
        out.write(safe.flush() + "\n")
        if opts.stats:
            print_stats(reply.stats)
        if not compare_answers:
            continue
        chat.rewind()  # the next turn runs on the saved history, not on this answer (but see below)
        by_ids = same_weights and saved is not None and ids_spell(engine.tokenizer, saved, n)
        verdict, ok = compare(saved, turn, by_ids)
        differ += not ok
        out.write(f"── turn {n}: {verdict} (compared with: {how})\n")
        out.flush()
        if saved is not None:  # the next turn runs on the saved history, not on this answer
            chat.add_exchange(user["content"], saved["content"],
                              turn.prompt_ids + list(saved["token_ids"]) if exact and by_ids else None)
        else:
            chat.add_exchange(user["content"], turn.content, turn.prompt_ids + turn.output_ids)
    if compare_answers:
        out.write(f"{len(exchanges) - differ} of {len(exchanges)} turns unchanged\n")
        return 1 if differ else 0
    return 0


def sampled_again(saved: dict | None, base: Sampling, flags: frozenset) -> Sampling | None:
    """How to sample a saved answer again exactly: its own temperature, top_p, top_k and seed (saved with its
    timings), the reply no longer than the saved one. None where it was greedy, has no saved seed, or a
    sampling flag chose otherwise."""
    sampling = ((saved or {}).get("timings") or {}).get("sampling") or {}
    if flags or not saved or not saved.get("token_ids") or sampling.get("seed") is None:
        return None
    try:
        again = Sampling(temperature=float(sampling["temperature"]), top_p=float(sampling["top_p"]),
                         top_k=int(sampling["top_k"]), seed=int(sampling["seed"]),
                         max_tokens=len(saved["token_ids"]))
    except (KeyError, TypeError, ValueError):
        return None
    if any(problem(k, getattr(again, k)) for k in ("temperature", "top_p", "top_k", "seed")):
        return None
    return again if again.temperature > 0 else None


def describe(s: Sampling) -> str:
    if not s.temperature:
        return "greedy"
    return f"temperature {s.temperature}, top_p {s.top_p}, top_k {s.top_k}, seed {s.seed}"


def pairs(messages: list[dict]) -> list[tuple[dict, dict | None, str | None]]:
    """Each user message with the answer saved after it (None where there is none) and the system prompt that
    answer ran under where the messages say so (a system message before it: "" for none; else None)."""
    out, system = [], None
    for m in messages:
        role = m.get("role")
        if role == "system":
            system = m["content"]
        elif role == "user":
            out.append([m, None, system])
        elif role == "assistant" and out and out[-1][1] is None:
            out[-1][1:] = [m, system]
    return [tuple(p) for p in out]


def ids_spell(tok, message: dict, turn_no: int) -> bool:
    """Whether a saved message's token ids stand for its text: a prompt's ids hold the user's text, an
    answer's ids decode to it. The text is the truth: ids that disagree (the text was edited) are ignored,
    with a warning."""
    ids = message.get("token_ids")
    if not ids:
        return False
    if message["role"] == "user":
        agree = message["content"] in tok.decode(ids)
    else:
        agree = tok.decode(ids, skip_special_tokens=True).strip() == message["content"].strip()
    if not agree:
        warnings.warn(f"turn {turn_no}: the saved {message['role']} message's token ids do not match its text; "
                      "the ids were ignored and the text was used")
    return agree


def compare(saved: dict | None, turn: Turn, by_ids: bool) -> tuple[str, bool]:
    """('same' | where it first differs, ok): token for token when the saved ids can be trusted, else by text."""
    if saved is None:
        return "no saved answer to compare with", False
    new_text, old_text = turn.content, saved["content"]
    if by_ids:
        old_ids = list(saved["token_ids"])
        if old_ids == turn.output_ids:
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
