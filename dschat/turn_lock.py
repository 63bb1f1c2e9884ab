"""One turn at a time in a continued conversation. A run that continues a saved conversation (`-c`,
`--session`) locks it from reading its history to saving its turn, so that concurrent `dschat -c` runs
answer one after the other, each seeing the turns saved before it. The lock is a POSIX record lock on
one byte of `turns.lock` beside the history (the byte at the conversation id's number), so runs in other
conversations never wait, and the kernel lets it go when the process ends, however it ends."""

from __future__ import annotations

import fcntl
from contextlib import contextmanager
from dataclasses import replace
from typing import Iterator

from .paths import private_dir, private_file
from .runtime import Options
from .session import saved_conversation
from .store import Store


@contextmanager
def conversation_locked(conversation_id: str) -> Iterator[None]:
    """Wait until no other process holds this conversation, and hold it inside the block."""
    path = private_file(private_dir("DATA") / "turns.lock")
    offset = int.from_bytes(conversation_id.encode(), "big") % 2**62
    with open(path, "ab") as f:
        fcntl.lockf(f, fcntl.LOCK_EX, 1, offset)
        yield


@contextmanager
def turn_locked(opts: Options) -> Iterator[Options]:
    """For a run that continues a conversation: the options naming it by its id, while it is locked."""
    if not opts.continuing:
        yield opts
        return
    with Store() as store:
        conv = saved_conversation(store, opts.session)
    if conv is None:  # nothing to continue: the session says so
        yield opts
        return
    with conversation_locked(conv.id):
        yield replace(opts, session=conv.id)
