"""One turn at a time in a saved conversation. Every front end (pipe mode, line mode, the TUI) holds the
conversation from reading its history to saving its turn (ChatSession.turn to ChatSession.finish), so that
runs continuing it at once answer one after the other, each seeing the turns saved before it. The lock is
a POSIX record lock on one byte of `turns.lock` beside the history (the byte at the conversation id's
number), so runs in other conversations never wait, and the kernel lets it go when the process ends,
however it ends. Record locks belong to the process: one TurnLock per process holds them."""

from __future__ import annotations

import errno
import fcntl

from .paths import private_dir, private_file


class ConversationBusy(Exception):
    """Another dschat holds the conversation (it is answering in it)."""


class TurnLock:
    def __init__(self):
        self._file = None

    def acquire(self, conversation_id: str, wait: bool = True):
        """Hold this conversation; with `wait` False, ConversationBusy rather than waiting for another run."""
        self.release()
        f = open(private_file(private_dir("DATA") / "turns.lock"), "ab")
        offset = int.from_bytes(conversation_id.encode(), "big") % 2**62
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB), 1, offset)
        except OSError as e:
            f.close()
            if e.errno in (errno.EACCES, errno.EAGAIN):
                raise ConversationBusy("another dschat is answering in this conversation; send again in a "
                                       "moment") from None
            raise
        except BaseException:  # a signal while waiting
            f.close()
            raise
        self._file = f

    def release(self):
        if self._file is not None:
            self._file.close()  # closing the file lets the lock go
            self._file = None
