"""The one place the engine reads files it did not write itself (a model directory's JSON, tokenizer and
weights, the cached prefixes on disk): only regular files, and text files only up to a size.

A FIFO named like one of them (tokenizer.json, a cache file) hung dschat beyond SIGTERM and SIGINT: opening
it waits for a writer, reading it for data. `read_bytes` opens with O_NONBLOCK, so opening never waits, and
checks what it opened (fstat) before reading; `regular` checks a path before a library opens it itself
(safetensors). A directory, FIFO, socket or device is an UnreadableFile naming the path and what it is."""

from __future__ import annotations

import os
import stat
from pathlib import Path

MAX_TEXT_BYTES = 256 * 2**20  # a config, index, tokenizer (DeepSeek's is 8 MB) or template file


class UnreadableFile(OSError):
    """A path that is not a regular file, or a text file past MAX_TEXT_BYTES; the message names it."""

    def __str__(self):
        return self.args[0]


def kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def regular(path: str | os.PathLike) -> os.stat_result:
    """The status of `path` (through symlinks) if it is a regular file; else UnreadableFile
    (FileNotFoundError when it is missing)."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise UnreadableFile(f"{path}: {kind(st.st_mode)}, not a regular file")
    return st


def read_bytes(path: str | os.PathLike, limit: int = MAX_TEXT_BYTES) -> bytes:
    """The bytes of the regular file `path`, at most `limit` of them (else UnreadableFile)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnreadableFile(f"{path}: {kind(st.st_mode)}, not a regular file")
        if st.st_size > limit:
            raise UnreadableFile(f"{path}: {st.st_size} bytes, more than the {limit} a file of this kind may have")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb") as f:
            fd = -1
            data = f.read(limit + 1)
    finally:
        if fd >= 0:
            os.close(fd)
    if len(data) > limit:  # it grew meanwhile
        raise UnreadableFile(f"{path}: more than the {limit} bytes a file of this kind may have")
    return data


def read_text(path: str | os.PathLike, limit: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of the regular file `path` (UnicodeDecodeError for other bytes)."""
    return read_bytes(Path(path), limit).decode("utf-8")
