"""How dschat stops on a signal: SIGTERM (`kill`) and SIGHUP (the terminal closed) stop a reply exactly
as Ctrl+C does (the partial reply is kept, marked interrupted), then dschat exits 128 + the signal's
number: 143 and 129, and 130 for SIGINT. While an exchange is being saved the three signals wait until
it is written, so that a signal never leaves half a turn behind."""

from __future__ import annotations

import signal
from contextlib import contextmanager

STOPPING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_held: list[int] | None = None  # the signals that arrived while held, or None when not holding
_starting = True  # until the model has loaded
_first: int | None = None  # the first stopping signal received while starting


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP (or a SIGINT the TUI received): handled wherever Ctrl+C is, with its own exit code."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


def _stop(signum, frame):
    global _first
    if _starting:
        _first = _first or signum
    if _held is not None:
        _held.append(signum)
        return
    raise KeyboardInterrupt if signum == signal.SIGINT else Stopped(signum)


def start_up_done():
    """Start-up is over: stop now if a signal came during it. Its exception may have been lost: torch's
    start-up, in C, clears the errors of what it tries to import, a KeyboardInterrupt among them."""
    global _starting
    _starting = False
    if _first:
        _stop(_first, None)


def stop_received() -> KeyboardInterrupt | None:
    """The exception of a signal received during start-up, if any (an error it caused is no error)."""
    return (KeyboardInterrupt() if _first == signal.SIGINT else Stopped(_first)) if _first else None


def stop_on_signals():
    """SIGINT raises KeyboardInterrupt, SIGTERM and SIGHUP raise Stopped, in the main thread."""
    for sig in STOPPING:
        signal.signal(sig, _stop)


def exit_code(interrupt: KeyboardInterrupt) -> int:
    """The exit code of a run a signal stopped."""
    return getattr(interrupt, "exit_code", 128 + signal.SIGINT)


@contextmanager
def signals_held():
    """Hold SIGINT, SIGTERM and SIGHUP back inside the block (saving a turn); the first of them that
    arrived is raised after it."""
    global _held
    _held = []
    try:
        yield
    finally:
        pending, _held = _held, None
        if pending:
            _stop(pending[0], None)
