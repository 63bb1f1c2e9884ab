"""Where dschat keeps its files: $XDG_CONFIG_HOME, $XDG_DATA_HOME and $XDG_CACHE_HOME, each + /dschat.

Conversations hold pasted code, diffs and secrets, so, as shells do for their history, dschat's
directories are private to the user (0700) and so are its files (0600); ones an older dschat made
world-readable are tightened when they are opened. A directory or file that is a symlink is the user's
choice and is left as it is (a shared 2775 directory stays 2775)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

DEFAULTS = {"CONFIG": ".config", "DATA": ".local/share", "CACHE": ".cache"}
PRIVATE_DIR, PRIVATE_FILE = 0o700, 0o600


def xdg(kind: str) -> Path:
    """dschat's directory of one XDG kind (CONFIG, DATA or CACHE), with the usual defaults."""
    base = os.environ.get(f"XDG_{kind}_HOME") or str(Path.home() / DEFAULTS[kind])
    return Path(base) / "dschat"


def private_dir(kind: str, *parts: str) -> Path:
    """dschat's directory of one kind (or a folder in it), made, or tightened, private to the user."""
    path = xdg(kind)
    for d in [path, *(path.joinpath(*parts[: i + 1]) for i in range(len(parts)))]:
        d.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
        tighten(d, PRIVATE_DIR)
    return path.joinpath(*parts)


def private_file(path: Path) -> Path:
    """`path`, created empty if missing, readable and writable by the user alone; a regular file (a FIFO in
    its place would make every open of it wait: OSError naming it)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK | os.O_NOCTTY, PRIVATE_FILE)
    except OSError as e:  # a FIFO without a reader (ENXIO), a directory (EISDIR)
        raise OSError(e.errno, f"{path}: cannot open ({e.strerror}); it should be a regular file") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path}: not a regular file; dschat keeps its own file there")
    finally:
        os.close(fd)
    tighten(path, PRIVATE_FILE)
    return path


def tighten(path: Path, mode: int):
    """Take away any permission beyond `mode` (the group's and others') from a file or directory of
    dschat's own: never through a symlink (the user pointed dschat's directory or file at a place of theirs,
    perhaps shared, with its own modes and setgid bit), never one another user owns."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or st.st_uid != os.geteuid():
        return
    now = stat.S_IMODE(st.st_mode)
    if now & ~mode:
        os.chmod(path, now & mode)


def kv_dir() -> Path:
    """The latent cache of saved conversations, on disk (engine/persist.py). A cache that cannot be made (its
    parent is a file, say) is not an error here: the engine reads nothing from it and warns when it cannot save."""
    try:
        return private_dir("CACHE", "kv")
    except OSError:
        return xdg("CACHE") / "kv"


def cache_key_file() -> Path:
    """The secret that keys the latent cache's checksums (engine/persist.py makes it, 0600, on first use): in
    the data directory, beside the history, not in the cache it protects."""
    try:
        return private_dir("DATA") / "cache.key"
    except OSError:
        return xdg("DATA") / "cache.key"
