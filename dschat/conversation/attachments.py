"""Files put into a message (`-f PATH`, `/add PATH`): each as a fenced block headed by its path.

A file is read when the message is sent, as UTF-8 text: a binary file (a NUL byte, or not UTF-8) or one over
MAX_FILE_BYTES is refused with one line. A directory brings the text files under it that git would track
(its .gitignore respected: `git ls-files` where the folder is in a repository, else the .gitignore at the
folder's top, and hidden entries skipped), binary ones skipped, at most MAX_DIR_FILES files and
MAX_TOTAL_BYTES in all. `-` is stdin.
"""

from __future__ import annotations

import fnmatch
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from dschat.files import UnreadableFile, read_regular

MAX_FILE_BYTES = 1 << 20  # 1 MiB a file
MAX_TOTAL_BYTES = 4 << 20  # 4 MiB in one message
MAX_DIR_FILES = 200


class AttachmentError(Exception):
    """A file that cannot be put into a message; the message names it."""


@dataclass(frozen=True)
class Attachment:
    name: str  # the path as the user gave it (relative paths stay relative)
    text: str

    def block(self) -> str:
        """The file as the model sees it: its path, then its text in a fence longer than any inside it."""
        longest = max((len(run) for run in _backtick_runs(self.text)), default=0)
        fence = "`" * max(3, longest + 1)
        lang = Path(self.name).suffix.lstrip(".")
        body = self.text if self.text.endswith("\n") or not self.text else self.text + "\n"
        return f"{self.name}:\n{fence}{lang}\n{body}{fence}"


def _backtick_runs(text: str):
    run = ""
    for ch in text:
        if ch == "`":
            run += ch
        elif run:
            yield run
            run = ""
    if run:
        yield run


def _decode(data: bytes, name: str) -> str:
    if b"\0" in data:
        raise AttachmentError(f"{name}: a binary file (only text files can go into a message)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise AttachmentError(f"{name}: not UTF-8 text (byte {e.start}); only text files can go into a message") \
            from None


def read_file(path: str) -> Attachment:
    if path == "-":
        data = sys.stdin.buffer.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise AttachmentError(f"stdin: more than {MAX_FILE_BYTES:,} bytes")
        return Attachment("stdin", _decode(data, "stdin"))
    try:
        data = read_regular(path, MAX_FILE_BYTES, "a file in a message")
    except UnreadableFile as e:
        raise AttachmentError(str(e)) from None
    except FileNotFoundError:
        raise AttachmentError(f"{path}: no such file") from None
    except OSError as e:
        raise AttachmentError(f"{path}: cannot read ({e.strerror or e})") from None
    return Attachment(path, _decode(data, path))


def _git_files(folder: Path) -> list[Path] | None:
    """The files git would track under `folder` (ignored ones left out), or None outside a repository."""
    try:
        r = subprocess.run(["git", "-C", str(folder), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        return None
    return [folder / p for p in r.stdout.decode("utf-8", "surrogateescape").split("\0") if p]


def _walk(folder: Path) -> list[Path]:
    """Files under `folder` outside hidden entries and the patterns of its top .gitignore."""
    patterns = []
    ignore = folder / ".gitignore"
    if ignore.is_file():
        patterns = [line.strip().rstrip("/") for line in ignore.read_text(errors="replace").splitlines()
                    if line.strip() and not line.startswith("#")]
    out = []
    for root, dirs, names in os.walk(folder):
        rel_root = Path(root).relative_to(folder)
        keep = lambda n: not n.startswith(".") and not any(  # noqa: E731
            fnmatch.fnmatch(n, p) or fnmatch.fnmatch(str(rel_root / n), p.lstrip("/")) for p in patterns)
        dirs[:] = sorted(d for d in dirs if keep(d))
        out += [Path(root) / n for n in sorted(names) if keep(n)]
    return out


def read_folder(path: str) -> list[Attachment]:
    folder = Path(path)
    files = _git_files(folder)
    files = sorted(f for f in (files if files is not None else _walk(folder)) if f.is_file() and not f.is_symlink())
    if len(files) > MAX_DIR_FILES:
        raise AttachmentError(f"{path}: {len(files):,} files; at most {MAX_DIR_FILES} go into a message (name a "
                              "smaller folder or the files)")
    out = []
    for f in files:
        try:
            out.append(read_file(str(f)))
        except AttachmentError:
            continue  # binary or unreadable files in a folder are left out
    return out


def read_all(paths: list[str]) -> list[Attachment]:
    """Every file the paths name, read now; AttachmentError (one line, naming the path) for the first that
    cannot go into a message, or for more than MAX_TOTAL_BYTES in all."""
    out: list[Attachment] = []
    for path in paths:
        if path != "-" and Path(path).is_dir():
            found = read_folder(path)
            if not found:
                raise AttachmentError(f"{path}: no text files in this folder")
            out += found
        else:
            out.append(read_file(path))
    total = sum(len(a.text.encode()) for a in out)
    if total > MAX_TOTAL_BYTES:
        raise AttachmentError(f"the files come to {total:,} bytes; at most {MAX_TOTAL_BYTES:,} go into a message")
    return out


def describe(found: list[Attachment], tokenizer) -> str:
    """What is attached, for the user: "a.py, b.py: 1,234 tokens" (five names at most), the tokens being what
    the files' blocks add to the message (line mode's /add and the TUI's say it)."""
    tokens = sum(len(tokenizer.encode_plain(a.block())) for a in found)
    names = ", ".join(a.name for a in found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
    return f"{names}: {tokens:,} tokens"


def with_files(message: str, attachments: list[Attachment]) -> str:
    """The message, then each file's block."""
    blocks = "\n\n".join(a.block() for a in attachments)
    if not blocks:
        return message
    return f"{message.rstrip()}\n\n{blocks}" if message.strip() else blocks
