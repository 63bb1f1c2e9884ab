"""One turn at a time in a saved conversation. Every front end (pipe mode, line mode, the TUI) holds the
conversation from reading its history to saving its turn (ChatSession.turn to ChatSession.finish), so that
runs continuing it at once answer one after the other, each seeing the turns saved before it. The lock is
a POSIX record lock on one byte of `turns.lock` beside the history (the byte at the conversation id's
number), so runs in other conversations never wait, and the kernel lets it go when the process ends,
however it ends. Record locks belong to the process: one TurnLock per process holds them.

A run that waits (pipe mode, line mode) says so on stderr, naming the process that holds the conversation
(its pid, which may be stopped: Ctrl+Z), and gives up after TURN_WAIT_S seconds with one line naming it."""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import time

from dschat.settings.paths import private_dir, private_file
from dschat.terminal.text import say

TURN_WAIT_S = 600  # how long a run waits for another one answering in the same conversation
_FLOCK = "hhqqi4x"  # struct flock on Linux: l_type, l_whence, l_start, l_len, l_pid


class ConversationBusy(Exception):
    """Another dschat holds the conversation (it is answering in it)."""


class TurnLock:
    def __init__(self):
        self._file = None

    def acquire(self, conversation_id: str, wait: bool = True):
        """Hold this conversation; with `wait` False, ConversationBusy rather than waiting for another run;
        with `wait`, a notice on stderr naming the holder, and ConversationBusy after TURN_WAIT_S."""
        self.release()
        f = open(private_file(private_dir("DATA") / "turns.lock"), "ab")
        offset = int.from_bytes(conversation_id.encode(), "big") % 2**62
        try:
            try:
                fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
            except OSError as e:
                if e.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
                holder = _holder(f, offset)
                who = f"another dschat (pid {holder})" if holder else "another dschat"
                if not wait:
                    raise ConversationBusy(f"{who} is answering in this conversation; send again in a moment") \
                        from None
                say(f"dschat: waiting: {who} is answering in this conversation (giving up after {TURN_WAIT_S} s)")
                self._wait(f, offset, who)
        except BaseException:  # busy, an error, a signal while waiting
            f.close()
            raise
        self._file = f

    @staticmethod
    def _wait(f, offset: int, who: str):
        deadline = time.monotonic() + TURN_WAIT_S
        while True:
            try:
                fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
                return
            except OSError as e:
                if e.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
            if time.monotonic() >= deadline:
                raise ConversationBusy(f"gave up after {TURN_WAIT_S} s: {who} still holds this conversation "
                                       "(a stopped process? `kill -CONT` or end it)")
            time.sleep(0.2)

    def release(self):
        if self._file is not None:
            self._file.close()  # closing the file lets the lock go
            self._file = None


def _holder(f, offset: int) -> int | None:
    """The pid of the process holding the byte at `offset` (F_GETLK), if the kernel says."""
    try:
        got = fcntl.fcntl(f, fcntl.F_GETLK, struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0))
        kind, _, _, _, pid = struct.unpack(_FLOCK, got)
        return pid if kind != fcntl.F_UNLCK and pid > 0 else None
    except OSError:
        return None
