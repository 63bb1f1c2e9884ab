"""Signals end dschat cleanly: SIGINT, SIGTERM and SIGHUP during a reply keep the partial reply (saved,
marked interrupted) and exit 130, 143, 129; SIGINT during start-up exits at once and saves nothing."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pexpect
import pytest
from helpers import dschat_cmd, long_reply

from dschat.history.store import Store


def long_answer(model: Path, *extra: str) -> subprocess.Popen:
    p = subprocess.Popen(dschat_cmd() + ["--model", str(model), "-t", "1.0", "-n", "100000", "--seed", "1", *extra],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdin.write(b"tell me a long story")
    p.stdin.close()
    return p


def assert_partial_reply_saved(shown: str, prompt: str):
    conv = Store().latest()
    assert [m.role for m in conv.messages] == ["user", "assistant"]
    user, reply = conv.messages
    assert user.content == prompt and reply.interrupted and reply.token_ids
    assert reply.content and shown.startswith(reply.content.strip())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_during_a_reply_keeps_it_marked_and_exits_128_plus_its_number(chat_models, sig):
    p = long_answer(chat_models["v3"])
    first = p.stdout.read(1)  # the answer has started streaming
    assert first
    p.send_signal(sig)
    code = p.wait(timeout=30)
    out, err = (first + p.stdout.read()).decode(), p.stderr.read().decode()
    assert code == 128 + sig, err
    assert "Traceback" not in err and err.strip().endswith("interrupted" if sig == signal.SIGINT
                                                          else f"interrupted ({sig.name})")
    assert out.endswith("\n")
    assert_partial_reply_saved(out, "tell me a long story")


def importing_torch(pid: int) -> bool:
    maps = Path(f"/proc/{pid}/maps")
    return maps.exists() and "libtorch" in maps.read_text()


def test_ctrl_c_during_start_up_exits_130_at_once_and_saves_nothing(chat_models):
    p = long_answer(chat_models["v3"])
    while not importing_torch(p.pid):  # start-up: torch is being imported
        assert p.poll() is None
        time.sleep(0.005)
    p.send_signal(signal.SIGINT)
    code = p.wait(timeout=60)
    out, err = p.stdout.read(), p.stderr.read().decode()
    assert code == 130 and out == b"", err
    assert "Traceback" not in err
    assert Store().latest() is None


def test_sigterm_in_line_mode_keeps_the_reply_and_exits_143(chat_models):
    p = long_reply(chat_models["v3"])
    p.kill(signal.SIGTERM)
    p.expect(pexpect.EOF, timeout=30)
    p.close()
    assert p.exitstatus == 143 and "Traceback" not in p.before
    conv = Store().latest()
    assert [m.role for m in conv.messages] == ["user", "assistant"] and conv.messages[1].interrupted
