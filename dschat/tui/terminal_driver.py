"""Textual's terminal driver, for a terminal that can be closed while dschat writes to it.

Closing a terminal window sends SIGHUP and SIGCONT. On SIGCONT Textual restarts its output thread, whose
first write to the closed terminal fails (EIO) and ends the thread; the app's next writes then wait forever
on the thread's full queue, and dschat hangs instead of saving the reply and exiting 129. Here a write to a
terminal that is gone is dropped, so the output thread lives on and the app ends as it would on SIGHUP."""

from __future__ import annotations

from textual.drivers.linux_driver import LinuxDriver


class TerminalOutput:
    """The terminal's stream as Textual's output thread uses it; once the terminal is gone, writes are lost
    rather than raised."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError:
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except OSError:
            pass

    def fileno(self) -> int:
        return self._stream.fileno()


class ClosableTerminalDriver(LinuxDriver):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._file = TerminalOutput(self._file)
