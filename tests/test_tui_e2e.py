"""End-to-end runs in a real terminal: tmux starts `dschat`, a message is typed, the reply is read off
the screen, Ctrl+Q quits, and the conversation is in the history; SIGTERM, SIGHUP or SIGINT during a reply
keeps it."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import dschat_cmd

from dschat.history.store import Store

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (.ci/run installs it)")


def tmux(sock, *args, check=True):
    return subprocess.run(["tmux", "-L", sock, *args], capture_output=True, text=True, check=check)


def screen(sock):
    return tmux(sock, "capture-pane", "-p", "-t", "dschat").stdout


def wait_for(sock, pred, timeout=90):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        text = screen(sock)
        if pred(text):
            return text
        time.sleep(0.3)
    raise AssertionError("timed out; the screen shows:\n" + screen(sock))


def start(sock, status: Path, *args, env: dict | None = None, size=(140, 32)):
    """dschat in a new tmux session (a terminal of `size` columns and lines); its exit status is written to
    `status`, and the pane stays (to read the terminal's modes after it). `env`: more variables for it."""
    env = [f"-e{k}={v}" for k, v in {**{k: os.environ[k] for k in ("XDG_DATA_HOME", "XDG_CONFIG_HOME",
                                                                    "XDG_CACHE_HOME")}, **(env or {})}.items()]
    cmd = " ".join(dschat_cmd() + list(args))
    tmux(sock, "new-session", "-d", "-s", "dschat", "-x", str(size[0]), "-y", str(size[1]), *env,
         f"TERM=xterm-256color {cmd}; echo $? > {status}; exec sleep 600")


def used(text) -> int:
    """The context used, as the status line shows it while a reply streams (0 when it does not show)."""
    m = re.search(r"streaming .* context (\d+)/", text)
    return int(m.group(1)) if m else 0


def pane(sock, fmt: str) -> str:
    return tmux(sock, "display-message", "-p", "-t", "dschat", fmt).stdout.strip()


def exit_status(status: Path, timeout=30) -> str | None:
    """dschat's exit status, once it has ended."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if status.exists() and status.read_text().strip():
            return status.read_text().strip()
        time.sleep(0.2)
    return None


def running(pid: int) -> bool:
    """Whether the process runs (not ended, not a zombie waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_during_a_tui_reply_keeps_it_and_restores_the_terminal(chat_models, sig, tmp_path):
    sock, status = f"dschat-test-{os.getpid()}-{sig}", tmp_path / "status"
    start(sock, status, "--model", str(chat_models["v3"]), "-t", "1.0", "-n", "100000", "--seed", "2")
    try:
        wait_for(sock, lambda s: "ready" in s)
        tmux(sock, "send-keys", "-t", "dschat", "-l", "tell me everything")
        tmux(sock, "send-keys", "-t", "dschat", "Enter")
        first = used(wait_for(sock, lambda s: "streaming" in s and used(s)))
        wait_for(sock, lambda s: used(s) > first)  # the reply has started
        shell = pane(sock, "#{pane_pid}")
        os.kill(int(subprocess.run(["pgrep", "-P", shell], capture_output=True, text=True).stdout), sig)  # dschat
        assert exit_status(status) == str(128 + sig), f"dschat did not end on {sig.name}:\n{screen(sock)}"
        assert pane(sock, "#{alternate_on} #{mouse_any_flag}") == "0 0"  # restored: no alternate screen, no mouse
        text = screen(sock)
        assert f"dschat: interrupted ({sig.name})" in text and "Traceback" not in text, text
    finally:
        tmux(sock, "kill-server", check=False)
    conv = Store().latest()
    assert conv is not None and [m.role for m in conv.messages] == ["user", "assistant"]
    assert conv.messages[1].interrupted and conv.messages[1].content.strip()


@pytest.mark.parametrize("mode", ["tui", "plain", "one-shot"])
def test_closing_the_terminal_during_a_reply_keeps_it_and_ends_dschat(chat_models, tmp_path, mode):
    """The terminal itself goes away (tmux's server killed: the pane's terminal hangs up, as when a terminal
    window is closed) while a reply streams, in the TUI, in line mode and for a one-shot answer. dschat gets
    SIGHUP (and SIGCONT), and its writes to the terminal fail: it saves the partial reply, marked interrupted,
    and ends, rather than hang on output nobody can read (the TUI did) or drop the turn (the others did)."""
    sock, status = f"dschat-test-{os.getpid()}-closed-{mode}", tmp_path / "status"
    model = ["--model", str(chat_models["v3"]), "-t", "1.0", "-n", "100000", "--seed", "2"]
    start(sock, status, *model, *{"tui": [], "plain": ["--plain"], "one-shot": ["'tell me everything'"]}[mode])
    try:
        if mode != "one-shot":
            wait_for(sock, lambda s: ("ready" if mode == "tui" else "for commands") in s)
            tmux(sock, "send-keys", "-t", "dschat", "-l", "tell me everything")
            tmux(sock, "send-keys", "-t", "dschat", "Enter")
        if mode == "tui":
            first = used(wait_for(sock, lambda s: "streaming" in s and used(s)))
            wait_for(sock, lambda s: used(s) > first)  # the reply has started
        else:
            first = len(wait_for(sock, lambda s: len(s.strip()) > 60).strip())
            wait_for(sock, lambda s: len(s.strip()) > first + 40)  # the reply streams
        shell = pane(sock, "#{pane_pid}")
        pid = int(subprocess.run(["pgrep", "-P", shell], capture_output=True, text=True).stdout)
    finally:
        tmux(sock, "kill-server", check=False)
    t0 = time.monotonic()
    while running(pid) and time.monotonic() - t0 < 30:
        time.sleep(0.2)
    ended = not running(pid)
    if not ended:
        os.kill(pid, signal.SIGKILL)
    assert ended, "dschat hung after its terminal was closed"
    conv = Store().latest()
    assert conv is not None and [m.role for m in conv.messages] == ["user", "assistant"]
    assert conv.messages[1].interrupted and conv.messages[1].content.strip()


def test_the_tui_shows_model_output_and_stored_text_without_escape_sequences(chat_models, tmp_path):
    """A model that answers with an OSC title sequence, a screen clear (in its C1 form) and a right-to-left
    override: the TUI shows the text without them (the pane's title stays), as it streams and when the
    conversation is reopened with -c."""
    from helpers import parrot

    answer = "\x1b]0;PWNED-TITLE\x07hello\x9b2J there\u202eend"  # each token once (parrot)
    model = parrot(chat_models["v3"], tmp_path / "parrot", answer)
    for round_, args in enumerate([[], ["-c"]]):
        sock, status = f"dschat-test-{os.getpid()}-osc-{round_}", tmp_path / f"status{round_}"
        start(sock, status, "--model", str(model), "-t", "0", "-n", "30", *args)
        try:
            wait_for(sock, lambda s: "ready" in s)
            if not args:
                tmux(sock, "send-keys", "-t", "dschat", "-l", "question")
                tmux(sock, "send-keys", "-t", "dschat", "Enter")
            text = wait_for(sock, lambda s: "hello there" in s and "ready" in s)
            assert "PWNED" not in pane(sock, "#{pane_title}")
            assert "hello thereend" in text
            tmux(sock, "send-keys", "-t", "dschat", "C-q")
            assert exit_status(status) == "0"
            assert "PWNED" not in pane(sock, "#{pane_title}")
        finally:
            tmux(sock, "kill-server", check=False)
    assert Store().latest().messages[-1].content == answer  # saved as generated


def test_80_by_24(tmp_path):
    """At 80×24 (a new user's terminal) the header lost the device, the sidebar kept 31 of the 80 columns and
    the footer was cut at "^b Si": now the header keeps "on cpu" (the model's name is what gives way), the
    sidebar narrows, and every key of the footer shows, named shortly."""
    with Store() as s:
        cid = s.create(model="demo", title="A conversation with a rather long title to cut")
        s.add_message(cid, "user", "hi")
    sock, status = f"dschat-test-{os.getpid()}", tmp_path / "status"
    start(sock, status, "--model", "demo", size=(80, 24))
    try:
        text = wait_for(sock, lambda s: "ready" in s)
        lines = text.splitlines()
        assert "demo model" in lines[0] and lines[0].rstrip().endswith(" on cpu"), lines[0]
        footer = lines[23]
        for key in ("^q Quit", "esc Stop", "^n New", "^r Regen", "^o Copy", "^b Sidebar", "f1 Help", "^p palette"):
            assert key in footer, footer
        border = lines[2].index("│")  # the sidebar's right edge
        assert border <= 24, lines[2]
        assert "A conversation with" in text and "rather long title to cut" not in text  # one line, cut
        assert "just now" in text  # the sidebar's dates fit too
        tmux(sock, "send-keys", "-t", "dschat", "C-q")
        assert exit_status(status) == "0"
    finally:
        tmux(sock, "kill-server", check=False)


def test_a_chat_in_tmux_with_the_editor_and_the_alt_keys(chat_models, tmp_path):
    """One session (a TUI start costs seconds) of what a real terminal sends: typed text; Ctrl+G hands the terminal
    to $EDITOR (a script that notes what it was given and rewrites it) on a temporary file seeded with the input,
    and what it leaves comes back into the input; Enter sends it and the reply streams; Ctrl+R regenerates
    (‹2/2›), Alt+Left shows the older answer (‹1/2›), Alt+Up and Alt+E put the selected prompt back in the input
    (these as escape sequences through tmux); Ctrl+Q quits with 0; the conversation is in the history as shown."""
    seen = tmp_path / "seen"
    editor = tmp_path / "editor.sh"
    editor.write_text(f"#!/bin/sh\ncp \"$1\" {seen}\nprintf 'edited line one\\n  indented two\\n' > \"$1\"\n")
    editor.chmod(0o755)
    sock, status = f"dschat-test-{os.getpid()}-chat", tmp_path / "status"
    start(sock, status, "--model", str(chat_models["v3"]), "-t", "0", "-n", "8", env={"EDITOR": str(editor),
                                                                                      "VISUAL": ""})
    try:
        wait_for(sock, lambda s: "ready" in s)
        tmux(sock, "send-keys", "-t", "dschat", "-l", "hello from tmux")
        tmux(sock, "send-keys", "-t", "dschat", "C-g")
        wait_for(sock, lambda s: "indented two" in s)
        assert seen.read_text() == "hello from tmux", "the editor did not get the typed input"
        tmux(sock, "send-keys", "-t", "dschat", "Enter")
        text = wait_for(sock, lambda s: "Assistant" in s and "ready" in s and "tok/s" in s)  # saved: Ctrl+R may go
        assert "edited line one" in text and "indented two" in text, "the edited message was not sent as shown"
        tmux(sock, "send-keys", "-t", "dschat", "C-r")
        wait_for(sock, lambda s: "Assistant  ‹2/2›" in s and "ready" in s)
        tmux(sock, "send-keys", "-t", "dschat", "M-Left")
        wait_for(sock, lambda s: "Assistant  ‹1/2›" in s)
        tmux(sock, "send-keys", "-t", "dschat", "M-Up")
        tmux(sock, "send-keys", "-t", "dschat", "M-Up")
        tmux(sock, "send-keys", "-t", "dschat", "M-e")
        wait_for(sock, lambda s: "Assistant" not in s and "edited line one" in s)  # back in the input only
        tmux(sock, "send-keys", "-t", "dschat", "C-q")
        assert exit_status(status) == "0", "dschat did not quit on Ctrl+Q"
    finally:
        tmux(sock, "kill-server", check=False)
    conv = Store().latest()
    assert conv is not None and [m.role for m in conv.messages] == ["user", "assistant"]
    assert conv.messages[0].content == "edited line one\n  indented two"  # what the editor left, sent
    first, second = Store().siblings(conv.messages[1].id)  # the regenerated answer beside the first
    assert first.content.split()[0][:8] in text  # what the screen showed is what was saved
