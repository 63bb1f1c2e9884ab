"""One end-to-end run in a real terminal: tmux starts `dschat`, a message is typed, the reply is read off
the screen, Ctrl+Q quits, and the conversation is in the history."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest
from helpers import dschat_cmd

from dschat.store import Store

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


def test_tui_in_tmux(chat_models, tmp_path):
    sock = f"dschat-test-{os.getpid()}"
    env = [f"-e{k}={os.environ[k]}" for k in ("XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME")]
    cmd = " ".join(dschat_cmd() + ["--model", str(chat_models["v3"]), "-t", "0", "-n", "8"])
    tmux(sock, "new-session", "-d", "-s", "dschat", "-x", "140", "-y", "32", *env, "TERM=xterm-256color " + cmd)
    try:
        wait_for(sock, lambda s: "ready" in s)
        tmux(sock, "send-keys", "-t", "dschat", "-l", "hello from tmux")
        tmux(sock, "send-keys", "-t", "dschat", "Enter")
        text = wait_for(sock, lambda s: "Assistant" in s and "ready" in s and "tok/s" in s)
        assert "hello from tmux" in text
        tmux(sock, "send-keys", "-t", "dschat", "C-q")
        t0 = time.monotonic()
        while tmux(sock, "has-session", "-t", "dschat", check=False).returncode == 0:
            assert time.monotonic() - t0 < 20, "dschat did not quit on Ctrl+Q"
            time.sleep(0.2)
    finally:
        tmux(sock, "kill-server", check=False)
    conv = Store().latest()
    assert conv is not None and [m.role for m in conv.messages] == ["user", "assistant"]
    assert conv.messages[0].content == "hello from tmux"
    reply = conv.messages[1].content
    assert reply.split()[0][:8] in text  # what the screen showed is what was saved
