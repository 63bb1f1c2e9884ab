"""The source file `dschat fim` works on: its text with a UTF-8 byte-order mark and CRLF line endings set
aside, and the same file back, byte for byte as it was apart from the insertion.

The hole is found and filled in the plain text (no BOM, "\\n" line ends), so it can never land before the
BOM or between a "\\r" and its "\\n"; `restore` puts the BOM back and, in a file whose every line ends in
CRLF, writes the insertion's line ends as CRLF too.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from dschat.files import Snapshot, UnreadableFile, read_regular

BOM = "\ufeff"
MAX_SOURCE_BYTES = 2 * 2**20  # 2 MiB: more code than any model's context window holds (V3's 128 Ki tokens)


class SourceError(Exception):
    pass


@dataclass
class Source:
    text: str  # without the BOM, CRLF as "\n" when the file is all CRLF
    name: str  # for messages
    path: Path | None  # None for stdin
    snapshot: Snapshot | None  # the file as read, for a safe rewrite
    bom: bool = False
    crlf: bool = False

    def restore(self, text: str) -> str:
        """The file's form of `text` (the plain text with insertions)."""
        if self.crlf:
            text = text.replace("\r\n", "\n").replace("\n", "\r\n")
        return BOM + text if self.bom else text

    def piece(self, insertion: str) -> str:
        """An insertion in the file's line endings."""
        return insertion.replace("\r\n", "\n").replace("\n", "\r\n") if self.crlf else insertion


def read_source(path: str, name: str | None = None) -> Source:
    """The file at `path` ("-" for stdin), as text; one clear error for what is not UTF-8 text, not a regular
    file (a FIFO, /dev/zero) or larger than MAX_SOURCE_BYTES."""
    where = None if path == "-" else Path(path)
    data = _read_stdin() if where is None else _read_bytes(where, path)
    name = name or (path if where is not None else "stdin")
    if b"\x00" in data[:8192]:
        raise SourceError(f"{name}: a binary file, not text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SourceError(f"{name}: not UTF-8 text (byte {e.start})") from None
    bom = text.startswith(BOM)
    text = text[len(BOM):] if bom else text
    crlf = "\r\n" in text and text.count("\n") == text.count("\r\n")
    snapshot = Snapshot.of(where, data) if where is not None else None
    return Source(text.replace("\r\n", "\n") if crlf else text, name, where, snapshot, bom, crlf)


def _read_stdin() -> bytes:
    data = sys.stdin.buffer.read(MAX_SOURCE_BYTES + 1)
    if len(data) > MAX_SOURCE_BYTES:
        raise SourceError(f"stdin: more than {MAX_SOURCE_BYTES:,} bytes, the most a source file may have")
    return data


def _read_bytes(where: Path, path: str) -> bytes:
    try:
        return read_regular(where, MAX_SOURCE_BYTES, "a source file")
    except UnreadableFile as e:
        raise SourceError(str(e)) from None
    except FileNotFoundError:
        raise SourceError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise SourceError(f"{path}: is a directory, not a file") from None
    except OSError as e:
        raise SourceError(f"{path}: cannot read ({e.strerror})") from None
