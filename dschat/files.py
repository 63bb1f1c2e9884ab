"""Writing user data safely: a temporary file beside the target, fsync, then an atomic rename.

A file the user names for output (`export -o`, `/save`, the TUI's export) goes through `write_output`: the
path's target is written, never the link or the special file in its place (a symlink stays a link to the new
file; a FIFO or a terminal gets the text streamed; anything else is refused).

Rewriting a file the user has (`fim -i`) goes further: a symlink is written through to its target, a file
without write permission is refused before any work is done, and the rename happens only if the file is
still exactly what was read (modification time, size and SHA-256), so edits made meanwhile are never lost.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dschat.engine.files import UnreadableFile, read_bytes, regular  # noqa: F401 - the app takes them from here


def read_regular(path: str | os.PathLike, limit: int, what: str = "it") -> bytes:
    """The bytes of the regular file `path` (through symlinks), at most `limit` of them; UnreadableFile (naming
    the path) for a FIFO, directory, device or anything larger. The engine's reader: one implementation, which
    imports no torch (dschat.engine loads its heavy parts only when they are used)."""
    return read_bytes(path, limit, what)


class WriteError(OSError):
    """A file that cannot or must not be written; the message names it (the target, never a temp file)."""


@dataclass(frozen=True)
class Snapshot:
    """What a file was when it was read; a later rewrite requires it unchanged."""

    mtime_ns: int
    size: int
    sha256: str

    @classmethod
    def of(cls, path: Path, data: bytes | None = None) -> "Snapshot":
        st = path.stat()
        data = path.read_bytes() if data is None else data
        return cls(st.st_mtime_ns, st.st_size, hashlib.sha256(data).hexdigest())


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int | None = None,
                       unchanged: Snapshot | None = None):
    """Replace `path` with `data` so that a crash or Ctrl+C leaves either the old file or the new one.
    The file's permission bits are kept (or set to `mode` for a new file), and its owner where we may set
    it. With `unchanged`, the file must still match that snapshot at the moment of the rename."""
    path = Path(path)
    try:
        old = path.stat()
    except FileNotFoundError:
        old = None
    if mode is None:
        mode = old.st_mode & 0o7777 if old else 0o666 & ~_umask()
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise WriteError(f"{path}: cannot write here ({e.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        if old and os.geteuid() == 0:
            os.chown(tmp, old.st_uid, old.st_gid)
        if unchanged is not None and Snapshot.of(path) != unchanged:
            raise WriteError(f"{path}: changed on disk while dschat worked; not overwritten")
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise WriteError(f"{path}: cannot write ({e.strerror})") from None
        raise


def atomic_write_text(path: str | os.PathLike, text: str, mode: int | None = None,
                      unchanged: Snapshot | None = None):
    atomic_write_bytes(path, text.encode("utf-8"), mode, unchanged)


def rewrite(path: str | os.PathLike, text: str, unchanged: Snapshot | None = None):
    """A file rewritten with `text` (`fim -i`): atomically (a new file renamed over it, so a crash leaves the
    old text or the new) when it has one name; in place when it has other hard links, which a rename would
    leave holding the old text (a crash while writing can then leave it half written). With `unchanged`,
    the file must still match that snapshot when it is written."""
    path = Path(path)
    try:
        links = path.stat().st_nlink
    except FileNotFoundError:
        links = 1
    if links <= 1:
        atomic_write_text(path, text, unchanged=unchanged)
        return
    data = text.encode("utf-8")
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY)  # no O_CREAT, no O_TRUNC: nothing lost before the check
    except OSError as e:
        raise WriteError(f"{path}: cannot write ({e.strerror})") from None
    with os.fdopen(fd, "r+b") as f:
        try:
            if unchanged is not None and Snapshot.of(path, f.read()) != unchanged:
                raise WriteError(f"{path}: changed on disk while dschat worked; not overwritten")
            f.seek(0)
            f.write(data)
            f.truncate()
            f.flush()
            os.fsync(f.fileno())
        except OSError as e:
            if isinstance(e, WriteError):
                raise
            raise WriteError(f"{path}: cannot write ({e.strerror})") from None


def write_output(path: str | os.PathLike, text: str, new_mode: int | None = None):
    """`text` into the file the user named: a regular file (or a new one) is replaced atomically, through a
    symlink its target (the link stays); a FIFO or a character device (a terminal, /dev/stdout, /dev/null)
    gets the text written to it as a stream; a directory, socket or block device is refused. WriteError
    names the path. `new_mode`: a new file's permission bits (None: the umask's); a file there keeps its own."""
    path = Path(path)
    try:
        st = os.stat(path)  # through symlinks
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise WriteError(f"{path}: cannot write ({e.strerror})") from None
    if st is None or stat.S_ISREG(st.st_mode):  # new (through a dangling link: its target), or a regular file
        atomic_write_text(os.path.realpath(path), text, mode=new_mode if st is None else None)
        return
    if stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode):
        try:  # no O_CREAT: the special file that was checked is what is opened, or nothing
            fd = os.open(path, os.O_WRONLY | os.O_NOCTTY)
            with os.fdopen(fd, "wb") as f:
                f.write(text.encode("utf-8"))
        except OSError as e:
            raise WriteError(f"{path}: cannot write ({e.strerror})") from None
        return
    kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else \
        "a block device" if stat.S_ISBLK(st.st_mode) else "not a regular file"
    raise WriteError(f"{path}: {kind}; not written (name a file, a FIFO or a terminal)")


PRIVATE = 0o600  # the history's mode (history/store.py): a conversation written out is as private


def write_conversation(path: str | os.PathLike, text: str):
    """An exported conversation into the file the user named (`export -o`, line mode's /save, the TUI's
    export): as write_output, a new file made private (0600) as the history is; a file there keeps its mode."""
    write_output(path, text, new_mode=PRIVATE)


def rewritable(path: Path) -> Path:
    """The file that rewriting `path` in place must replace (a symlink's target), checked before any work:
    a regular file with write permission (its mode bits, even for root, as editors do), owned by us unless
    we are root (a rename would take it over), in a directory where the temporary file can go."""
    target = Path(os.path.realpath(path))
    st = target.stat()
    if not stat.S_ISREG(st.st_mode):
        raise WriteError(f"{target}: not a regular file; cannot rewrite it in place")
    if not st.st_mode & 0o222 or not os.access(target, os.W_OK):
        raise WriteError(f"{target}: read-only; not rewritten (make it writable first)")
    if os.geteuid() != 0 and st.st_uid != os.geteuid():
        raise WriteError(f"{target}: owned by another user; rewriting it in place would change its owner")
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise WriteError(f"{target}: its directory is not writable (the new file is written beside it)")
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
