"""Stored or generated text made safe to print on a terminal: escape sequences (CSI, OSC, DCS, ...) and
control characters (C0, DEL, C1, bidirectional overrides) are removed, so a title or a message cannot set
the window title, move the cursor, clear the screen or reorder what is shown. Only on a terminal: text
written to a pipe or a file stays exact (`for_output`, `json_for_output`). A reply arrives in pieces, and a
sequence can be split over them (a model emits ESC as a token of its own): `SafeStream` holds back the start
of an unfinished sequence until the rest of it has come, so it is removed whole, as from the whole text."""

from __future__ import annotations

import re
import sys
from typing import TextIO

_SEQUENCE = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]?"  # CSI: ESC [ or its C1 form, parameters, a final byte
    r"|(?:\x1b[]PX^_]|[\x90\x98\x9d\x9e\x9f])[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"  # OSC, DCS, SOS, PM, APC strings
    r"|\x1b[ -/]*[0-~]?")  # any other ESC sequence (character sets, resets), or a lone ESC
_FINISHED = re.compile(  # a sequence with its final byte or terminator (ESC followed by [ ] P X ^ _ opens one)
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"
    r"|(?:\x1b[]PX^_]|[\x90\x98\x9d\x9e\x9f])[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)"
    r"|\x1b[ -/]*[0-OQ-WYZ\\`-~]")
HOLD_AT_MOST = 512  # characters of an unfinished sequence held back; past that it is dropped as it is
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")  # all but tab and newline
_LINE_BREAK = re.compile("[\t\n\r\u2028\u2029]+")


def terminal_safe(text: str, body: bool = False) -> str:
    """`text` without escape sequences or control characters. A message body (`body`) keeps its newlines and
    tabs; anything else (a title, a model name) is put on one line."""
    text = _SEQUENCE.sub("", text)
    if not body:
        text = _LINE_BREAK.sub(" ", text)
    return _CONTROL.sub("", text)


class SafeStream:
    """terminal_safe for a message body that arrives in pieces: what `feed` and `flush` return, joined, is
    terminal_safe of the whole text."""

    def __init__(self):
        self.held = ""

    def feed(self, piece: str) -> str:
        text, self.held = self.held + piece, ""
        last = None
        for last in _SEQUENCE.finditer(text):
            pass
        if last is not None and last.end() == len(text) and not _FINISHED.fullmatch(last.group()) \
                and len(last.group()) <= HOLD_AT_MOST:
            text, self.held = text[:last.start()], last.group()
        return terminal_safe(text, body=True)

    def flush(self) -> str:
        """What is held back, at the end of the text (an unfinished sequence: nothing)."""
        text, self.held = self.held, ""
        return terminal_safe(text, body=True)


def say(text: str, out: TextIO | None = None):
    """A message line (an error, a warning, a notice; stderr unless `out`) as a terminal may show it: one
    line, without escape sequences or control characters, whatever model file, path or stored text it
    carries. Every message dschat prints goes through here (the TUI's notices through `ChatApp.notify`)."""
    out = out if out is not None else sys.stderr
    out.write(terminal_safe(text) + "\n")
    out.flush()


def for_output(text: str, out: TextIO) -> str:
    """A message body as it is written to `out`: terminal-safe on a terminal, exact elsewhere."""
    return terminal_safe(text, body=True) if out.isatty() else text


def json_for_output(text: str, out: TextIO) -> str:
    """JSON as it is written to `out`: on a terminal, control characters inside strings (JSON escapes C0
    itself; C1 and the bidirectional overrides not) are written as \\u escapes, which is the same JSON;
    exact elsewhere."""
    return _CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", text) if out.isatty() else text
