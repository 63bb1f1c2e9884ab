"""Compose the message in $VISUAL or $EDITOR (as prompt-toolkit's Ctrl+X Ctrl+E does in line mode): the app is
suspended, the editor gets a private temporary file seeded with the input, and what it leaves there comes back."""

from __future__ import annotations

import os
import shlex
import subprocess
import tempfile
from pathlib import Path


class EditorError(Exception):
    """The editor could not be run, or failed; the message says which and why."""


def editor_command() -> list[str]:
    """$VISUAL, else $EDITOR (a command line: "code -w" works), else vi."""
    for var in ("VISUAL", "EDITOR"):
        value = os.environ.get(var, "").strip()
        if value:
            try:
                return shlex.split(value)
            except ValueError as e:
                raise EditorError(f"${var} ({value!r}) is not a command line: {e}") from None
    return ["vi"]


def compose(text: str) -> str:
    """Run the editor on a temporary file (0600, removed after) holding `text`; the file's text afterwards,
    without the one line end editors add at the end. EditorError when the editor is missing or fails."""
    cmd = editor_command()
    fd, name = tempfile.mkstemp(prefix="dschat-message-", suffix=".md")
    path = Path(name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        try:
            code = subprocess.call([*cmd, name])
        except OSError as e:
            raise EditorError(f"cannot run the editor {cmd[0]!r} ({e.strerror or e}); set $EDITOR") from None
        if code != 0:
            raise EditorError(f"the editor {cmd[0]!r} exited with status {code}; the input is unchanged")
        edited = path.read_text(encoding="utf-8", errors="replace")
    finally:
        path.unlink(missing_ok=True)
    return edited[:-1] if edited.endswith("\n") and not text.endswith("\n") else edited
