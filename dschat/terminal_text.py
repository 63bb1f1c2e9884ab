"""Stored or generated text made safe to print on a terminal: escape sequences (CSI, OSC, DCS, ...) and
control characters (C0, DEL, C1, bidirectional overrides) are removed, so a title or a message cannot set
the window title, move the cursor, clear the screen or reorder what is shown. Only on a terminal: text
written to a pipe or a file stays exact (`for_output`, `json_for_output`)."""

from __future__ import annotations

import re
from typing import TextIO

_SEQUENCE = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]?"  # CSI: ESC [ or its C1 form, parameters, a final byte
    r"|(?:\x1b[]PX^_]|[\x90\x98\x9d\x9e\x9f])[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"  # OSC, DCS, SOS, PM, APC strings
    r"|\x1b[ -/]*[0-~]?")  # any other ESC sequence (character sets, resets), or a lone ESC
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")  # all but tab and newline
_LINE_BREAK = re.compile("[\t\n\r\u2028\u2029]+")


def terminal_safe(text: str, body: bool = False) -> str:
    """`text` without escape sequences or control characters. A message body (`body`) keeps its newlines and
    tabs; anything else (a title, a model name) is put on one line."""
    text = _SEQUENCE.sub("", text)
    if not body:
        text = _LINE_BREAK.sub(" ", text)
    return _CONTROL.sub("", text)


def for_output(text: str, out: TextIO) -> str:
    """A message body as it is written to `out`: terminal-safe on a terminal, exact elsewhere."""
    return terminal_safe(text, body=True) if out.isatty() else text


def json_for_output(text: str, out: TextIO) -> str:
    """JSON as it is written to `out`: on a terminal, control characters inside strings (JSON escapes C0
    itself; C1 and the bidirectional overrides not) are written as \\u escapes, which is the same JSON;
    exact elsewhere."""
    return _CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", text) if out.isatty() else text
