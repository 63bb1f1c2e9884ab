"""One reply, driven the same way by every front end: pipe mode, line mode, the TUI, replay (and a server).

    turn = session.turn(text)                # or session.regenerate()
    reply = session.reply(turn)              # a Reply
    reply.run(show, flush)                   # stream it into show(piece), then save it
    reply.kept, reply.notice, reply.stats    # what became of it
    reply.reraise()                          # a Ctrl+C / SIGTERM / SIGHUP or an error that ended it, if any

or, where streaming and saving run on different threads (the TUI's worker and UI threads):

    reply.stream(show)                       # reply.stop(), from any thread, ends it after the current piece
    reply.finish(flush)                      # saves it

`show(piece)` gets the reply's text as it is generated. A reasoning model's reply (R1: <think> ... </think>, see
reasoning.py) is split: `show` gets the answer, `think(piece)` the reasoning (not shown without one), and
the turn's stats count `thinking_tokens` and `answer_tokens` apart; meanwhile `reply.stats` is the generation's own
GenerationStats, kept current by the engine. The stream ends at the reply's end, at `stop()`, at a
KeyboardInterrupt (Ctrl+C, or SIGTERM / SIGHUP as signals.Stopped: kept in `reply.interrupt`) or at an
exception (`reply.error`: the engine's, the context window's, or show's own, say a closed terminal); a
reply stopped or failed is marked interrupted. `finish` holds the stopping signals while `flush()` ends the
output (an OSError there, the terminal gone, is ignored) and the session keeps the exchange: committed and
saved, or, when it failed before its first token, taken back (`kept` False). `notice` is the cut-short
notice when the reply filled the context window. What to do with an interrupt or error is the front end's:
pipe mode re-raises both, line mode says the error and goes on, the TUI shows it.
"""

from __future__ import annotations

import threading
from contextlib import suppress
from typing import Callable

from dschat.conversation import reasoning
from dschat.conversation.chat import Turn
from dschat.signals import signals_held


class Reply:
    def __init__(self, session, turn: Turn, stop: threading.Event | None = None):
        self.session, self.turn = session, turn
        self.stop_event = stop if stop is not None else threading.Event()
        self.generation = None  # the engine's Generation, once it has started
        self.interrupt: KeyboardInterrupt | None = None
        self.error: Exception | None = None
        self.kept: bool | None = None  # after finish: whether the exchange was kept
        self.notice: str | None = None  # after finish: the reply was cut short by a full context window
        self.thinking_tokens = 0  # a reasoning model's: the reply's tokens up to the end of its thinking

    @property
    def stats(self):
        """The generation's GenerationStats (live while it streams); None before it started."""
        return self.generation.stats if self.generation is not None else None

    def stop(self):
        """End the stream after the piece being shown, or during the prompt's prefill between two of its chunks
        (thread-safe; the engine sees the same event); the reply is kept, marked interrupted."""
        self.stop_event.set()

    def stream(self, show: Callable[[str], None], think: Callable[[str], None] | None = None) -> "Reply":
        """Generate the reply, each piece of its text to `show` (a reasoning model's thinking to `think`), until
        it ends (see the module's docstring)."""
        turn, pieces = self.turn, None
        thinking = self._thinking(show, think)
        try:
            self.generation = self.session.generate(turn, self.stop_event)
            pieces = self.session.chat.stream(turn, self.generation)
            for piece in pieces:
                thinking(piece) if thinking else show(piece)
                if self.stop_event.is_set():
                    turn.interrupted = True
                    break
            if self.stop_event.is_set() and not self.generation.done:  # stopped in the prefill, or between pieces
                turn.interrupted = True
        except KeyboardInterrupt as e:  # Ctrl+C, SIGTERM, SIGHUP: the reply so far is kept, marked
            turn.interrupted, self.interrupt = True, e
        except Exception as e:  # context full, out of memory, the output gone, ...
            turn.interrupted, self.error = True, e
        finally:
            if pieces is not None:
                pieces.close()
            if self.generation is not None:
                self.generation.close()  # a stopped reply ends the engine's generation now, in this thread
                turn.stats = self.generation.stats.as_dict()  # saved with the reply
                if turn.sampling:  # with the seed the engine used: `replay --compare` samples it again exactly
                    turn.stats["sampling"] = dict(turn.sampling, seed=self.generation.stats.seed)
                self.session.last_stats = self.generation.stats
                self.session.last_turn = turn
            if thinking:
                with suppress(Exception):  # the output may be gone: what was split is kept all the same
                    thinking(None)
                if self.generation is not None:
                    n = min(self.thinking_tokens, len(turn.output_ids))
                    turn.stats.update(thinking_tokens=n, answer_tokens=len(turn.output_ids) - n)
        return self

    def _thinking(self, show, think):
        """For a reasoning model: a function that takes each piece of the reply (None at its end), splits it into
        reasoning and answer, passes each on and counts the tokens of the thinking. None for other models."""
        turn = self.turn
        if self.session.chat.completing or not reasoning.thinks(self.session.chat.tok):
            return None
        split = reasoning.Reasoning(reasoning.opened(turn.prompt_text))
        self.thinking_tokens = 1 << 62  # until the answer starts: every token so far

        def route(piece: str | None):
            before = split.state
            r, a = split.feed(piece) if piece is not None else split.flush()
            if before in ("start", "think") and split.state in ("after", "answer"):  # the thinking ended here
                no_think = before == "start" and split.state == "answer" and not r
                self.thinking_tokens = 0 if no_think else len(turn.output_ids)
            if r:
                turn.reasoning += r
                if think is not None:
                    think(r)
            if a:
                turn.answer += a
                show(a)
        return route

    def finish(self, flush: Callable[[], None] | None = None) -> bool:
        """With the stopping signals held: `flush()` (the output's end), then the session keeps the exchange or
        takes it back. Whether it was kept."""
        with signals_held():  # a signal now waits until the turn is saved
            if flush is not None:
                with suppress(OSError):  # the output is gone (its terminal closed): the turn is saved all the same
                    flush()
            self.kept = self.session.finish(self.turn, failed=self.error is not None)
        if self.kept:
            self.notice = self.session.cut_notice(self.turn)
        return self.kept

    def run(self, show: Callable[[str], None], flush: Callable[[], None] | None = None,
            think: Callable[[str], None] | None = None) -> "Reply":
        """`stream`, then `finish`, whatever happens between them."""
        try:
            self.stream(show, think)
        finally:
            self.finish(flush)
        return self

    def reraise(self):
        """Raise what ended the reply, if anything did: the interrupt, else the error."""
        if self.interrupt is not None:
            raise self.interrupt
        if self.error is not None:
            raise self.error
