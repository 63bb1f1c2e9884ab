"""The one place the engine reads files it did not write itself (a model directory's JSON, tokenizer and
weights, the cached prefixes on disk): only regular files, and text files only up to a size.

A FIFO named like one of them (tokenizer.json, a cache file) hung dschat beyond SIGTERM and SIGINT: opening
it waits for a writer, reading it for data. `read_bytes` opens with O_NONBLOCK, so opening never waits, and
checks what it opened (fstat) before reading; `regular` checks a path before a library opens it itself
(safetensors). A directory, FIFO, socket or device is an UnreadableFile naming the path and what it is."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

MAX_TEXT_BYTES = 256 * 2**20  # a config, index, tokenizer (DeepSeek's is 8 MB) or template file


class UnreadableFile(OSError):
    """A path that is not a regular file, or one past the size its kind may have; the message names it."""

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


def read_bytes(path: str | os.PathLike, limit: int = MAX_TEXT_BYTES, what: str = "a file of this kind") -> bytes:
    """The bytes of the regular file `path` (through symlinks), at most `limit` of them: opened without waiting
    (O_NONBLOCK), checked (fstat), then read. UnreadableFile for anything else or anything larger (the message
    says "more than the LIMIT `what` may have"). The app reads the files it is given through this too."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnreadableFile(f"{path}: {kind(st.st_mode)}, not a regular file")
        if st.st_size > limit:
            raise UnreadableFile(f"{path}: {st.st_size:,} bytes, more than the {limit:,} {what} may have")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb") as f:
            fd = -1
            data = f.read(limit + 1)
    finally:
        if fd >= 0:
            os.close(fd)
    if len(data) > limit:  # it grew meanwhile
        raise UnreadableFile(f"{path}: more than the {limit:,} bytes {what} may have")
    return data


def read_text(path: str | os.PathLike, limit: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of the regular file `path` (UnicodeDecodeError for other bytes)."""
    return read_bytes(Path(path), limit).decode("utf-8")


# -- content hashes, remembered ----------------------------------------------------------------------------------
HASHES_FILE = "file-sha256.json"  # in the cache directory: {"dev:inode": [[size, mtime_ns, ctime_ns], sha256]}


def sha256_of(paths: list[Path], memo_file: Path | None) -> dict[Path, str]:
    """The SHA-256 of each regular file's bytes. A file is read once: its hash is remembered in `memo_file`
    under its device and inode with its size, modification and change times (any write changes the change
    time, and nothing sets it back), and read again only when one of them changed."""
    import hashlib
    import json

    memo: dict = {}
    if memo_file is not None:
        try:
            memo = json.loads(read_text(memo_file, 64 * 2**20))
            memo = memo if isinstance(memo, dict) else {}
        except (OSError, ValueError):
            memo = {}
    out, changed = {}, False
    for path in paths:
        st = regular(path)
        key, stamp = f"{st.st_dev}:{st.st_ino}", [st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        entry = memo.get(key)
        if isinstance(entry, list) and len(entry) == 2 and entry[0] == stamp and isinstance(entry[1], str):
            out[path] = entry[1]
            continue
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(8 * 2**20):
                h.update(chunk)
        out[path] = memo[key] = h.hexdigest()
        changed = True
    if changed and memo_file is not None:
        write_json_quietly(memo_file, memo)  # a cache that cannot be written only means hashing again next time
    return out


def write_json_quietly(path: Path, data) -> bool:
    """Write data as JSON to path atomically (a temporary file beside it, then a rename), making its folder;
    False, with nothing changed, where it cannot be written (for caches: that only costs recomputing)."""
    import json
    import tempfile

    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
        return True
    except OSError:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        return False
