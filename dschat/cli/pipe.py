"""Pipe mode and one-shot answers: the message from stdin and the command line, the answer on stdout."""

from __future__ import annotations

import json
import sys
from dataclasses import replace

from dschat.engine import Tokenizer, resolve

from dschat.runtime import Options, model_name, print_stats, session_settings
from dschat.serve.client import open_engine
from dschat.conversation.session import ChatSession, open_chat
from dschat.terminal.text import SafeStream, json_for_output, say


def answer(opts: Options, message: str) -> int:
    engine = open_engine(opts)
    session = ChatSession(engine, session_settings(opts))
    try:
        turn = session.turn(message)  # a continued conversation: no other turn until this one is saved
        reply = stream_answer(session, turn, opts.show_thinking)
    finally:
        session.close()
    if reply.notice:
        say(f"dschat: warning: {reply.notice}")
    if opts.stats:
        print_stats(reply.turn.stats or reply.stats)
    return 0


def stream_answer(session: ChatSession, turn, show_thinking: bool = False):
    """The reply on stdout as it is generated, then saved (an interrupted one too, marked); a signal or an
    error that ended it is raised once it is saved. A reasoning model's thinking goes to stderr with
    show_thinking, nowhere without."""
    out = sys.stdout
    safe = SafeStream() if out.isatty() else None  # on a terminal without escape sequences; exact elsewhere
    wrote_newline = True

    def show(piece: str):
        nonlocal wrote_newline
        piece = safe.feed(piece) if safe else piece
        wrote_newline = piece.endswith("\n") if piece else wrote_newline  # before the write (a signal)
        write(out, piece, turn)

    def flush():
        rest = safe.flush() if safe else ""
        out.write(rest)
        if not (rest.endswith("\n") if rest else wrote_newline):
            out.write("\n")
            out.flush()

    think, end = None, flush
    if show_thinking:
        err, err_safe = sys.stderr, SafeStream() if sys.stderr.isatty() else None
        def think(piece: str):
            err.write(err_safe.feed(piece) if err_safe else piece)
            err.flush()

        def end():
            if turn.reasoning:  # the thinking's own line ends
                err.write("\n")
                err.flush()
            flush()
    reply = session.reply(turn).run(show, end, think)
    reply.reraise()
    return reply


def write(out, piece: str, turn):
    """A piece of the answer on stdout. When stdout is gone (its terminal closed: EIO, the SIGHUP on its way;
    the reader went away: EPIPE), the reply so far is kept, marked interrupted, and the error ends dschat."""
    try:
        out.write(piece)
        out.flush()
    except OSError:
        turn.interrupted = True
        raise


def show_prompt(opts: Options, message: str) -> int:
    """Exactly the prompt the next turn would feed the model (a continued conversation's too), without
    loading the weights or changing the history."""
    tok = Tokenizer.from_dir(resolve(model_name(opts), tokenizer_only=True))  # no weights fetched
    chat, _ = open_chat(tok, replace(session_settings(opts), no_save=True))
    turn = chat.turn(message)
    print(json_for_output(json.dumps({"text": turn.prompt_text, "ids": turn.prompt_ids}, ensure_ascii=False),
                          sys.stdout))
    return 0
