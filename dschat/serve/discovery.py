"""How a local `dschat` finds a running `dschat serve`: a file per server in the runtime directory.

`dschat serve`, listening on this machine (a loopback address), writes `server-PORT.json` there: its pid, its URL,
its model (name and directory) and a token made for this run, which the server accepts in place of its API key
(Authorization: Bearer TOKEN), so a local dschat needs no key. The directory is $XDG_RUNTIME_DIR/dschat, else
`run/` in dschat's cache directory, private to the user (0700, the file 0600: the token is in it). The server
removes its file when it stops; a file whose pid is no longer running (a killed server) is ignored.

This module imports nothing heavy: `dschat` reads it before it decides whether to load torch.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

from dschat.settings.paths import PRIVATE_DIR, PRIVATE_FILE, tighten, xdg


@dataclass(frozen=True)
class Found:
    pid: int
    url: str
    model: str  # the name the server answers to
    path: str  # the model's directory, as the server resolved it
    token: str
    file: str = ""  # where it was read (not written)


def runtime_dir() -> Path:
    """$XDG_RUNTIME_DIR/dschat (a per-login, memory-backed directory), else dschat's cache directory's run/."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    return Path(base) / "dschat" if base else xdg("CACHE") / "run"


def _private_dir() -> Path:
    path = runtime_dir()
    path.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    tighten(path, PRIVATE_DIR)
    return path


def new_token() -> str:
    return secrets.token_urlsafe(24)


def write(url: str, port: int, model: str, path: str, token: str) -> Path:
    """The server's file (written whole: a temporary file renamed into place); its path."""
    directory = _private_dir()
    target = directory / f"server-{port}.json"
    tmp = directory / f".server-{port}.{os.getpid()}.tmp"
    data = asdict(Found(os.getpid(), url, model, path, token))
    data.pop("file")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, PRIVATE_FILE)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, target)
    return target


def remove(path: Path):
    """Remove the server's file, if it is still this process's (another server may have taken the port since)."""
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process holds the pid now: not our server
        return False
    return True


def servers() -> list[Found]:
    """The servers whose files say they run (their pid is alive), the newest file first."""
    directory = runtime_dir()
    def mtime(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except OSError:
            return 0.0

    try:
        files = sorted(directory.glob("server-*.json"), key=mtime, reverse=True)
    except OSError:
        return []
    found = []
    for f in files:
        try:
            if f.is_symlink() or f.stat().st_uid != os.geteuid():
                continue  # only the user's own files
            d = json.loads(f.read_text())
            entry = Found(int(d["pid"]), str(d["url"]), str(d["model"]), str(d["path"]), str(d["token"]), str(f))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if alive(entry.pid):
            found.append(entry)
    return found
