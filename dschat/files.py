"""Writing user data safely: a temporary file beside the target, fsync, then an atomic rename."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int | None = None):
    """Replace `path` with `data` so that a crash or Ctrl+C leaves either the old file or the new one.
    The file's permission bits are kept (or set to `mode` for a new file)."""
    path = Path(path)
    if mode is None:
        try:
            mode = path.stat().st_mode & 0o7777
        except FileNotFoundError:
            mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | os.PathLike, text: str, mode: int | None = None):
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
