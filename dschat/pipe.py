"""Pipe mode and one-shot answers: the message from stdin and the command line, the answer on stdout."""

from __future__ import annotations

import json
import sys

from .chat import Chat
from .runtime import Options, load_engine, model_name, print_stats, sampling_params
from .sessions import open_conversation, save_turn


def answer(opts: Options, message: str) -> int:
    engine = load_engine(opts)
    chat, conv = open_conversation(opts, engine)
    turn = chat.turn(message)
    params = sampling_params(opts, engine, len(turn.prompt_ids))
    out = sys.stdout
    wrote_newline = True
    try:
        for piece in chat.stream(turn, params):
            out.write(piece)
            out.flush()
            wrote_newline = piece.endswith("\n")
    except KeyboardInterrupt:
        turn.interrupted = True
        raise
    finally:
        if turn.output_ids or turn.interrupted:
            chat.commit(turn)
            save_turn(conv, chat, turn, engine)
        if not wrote_newline:
            out.write("\n")
            out.flush()
    if opts.stats:
        print_stats(engine.stats)
    return 0


def show_prompt(opts: Options, message: str) -> int:
    """The exact prompt that would run, without loading the weights."""
    from dschat.engine.loader import resolve
    from dschat.engine.tokenizer import Tokenizer

    class _NoWeights:  # the tokenizer is all Chat needs to build a prompt
        pass

    eng = _NoWeights()
    eng.tokenizer = Tokenizer.from_dir(resolve(model_name(opts), tokenizer_only=True))  # no weights fetched
    chat = Chat(eng, system=opts.system_prompt, raw=opts.raw)
    turn = chat.turn(message)
    print(json.dumps({"text": turn.prompt_text, "ids": turn.prompt_ids}, ensure_ascii=False))
    return 0
