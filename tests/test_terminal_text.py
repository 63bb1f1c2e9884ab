"""Stored text never reaches the terminal raw: titles (first message, import, rename) in `dschat conversations`,
messages in `dschat replay` and in line mode lose their escape sequences and control characters; so do a pipe-mode
answer and `conversations --json` written to a terminal, while a pipe gets them exactly."""

from __future__ import annotations

import json
import os
import pty
import subprocess

import pexpect
import pytest
from helpers import PROMPT, ask, call, dschat_cmd, parrot, spawn

from dschat.history.store import Store
from dschat.terminal.text import SafeStream, terminal_safe

EVIL = "\x1b]0;pwned\x07\x1b[2J\x1b[31mred\x1b[0m \x9b1;1H\x9d8;;http://x\x9cok\x1bP1$q\x1b\\ \x08\x00\u202edone"


@pytest.mark.parametrize("text, title, body", [
    (EVIL, "red ok done", "red ok done"),
    ("line one\r\nline\ttwo\rthree", "line one line two three", "line one\nline\ttwothree"),
    ("\x1b]2;unterminated title", "", ""),
    ("\x1bcreset \x7fdel lone\x1b", "reset del lone", "reset del lone"),
    ("plain, ünïcode ✓ 中文", "plain, ünïcode ✓ 中文", "plain, ünïcode ✓ 中文"),
])
def test_terminal_safe(text, title, body):
    assert terminal_safe(text) == title
    assert terminal_safe(text, body=True) == body


@pytest.mark.parametrize("text", [EVIL, "\x1b]2;unterminated title", "\x1bcreset \x7fdel lone\x1b", "a\x1b[", "x\x1b(By"])
def test_a_stream_cut_anywhere_is_made_safe_as_the_whole_text(text):
    """A reply's pieces can split a sequence anywhere: streamed, the result is terminal_safe of the whole."""
    for pieces in [[text[:i], text[i:]] for i in range(len(text) + 1)] + [list(text)]:
        safe = SafeStream()
        assert "".join(safe.feed(p) for p in pieces) + safe.flush() == terminal_safe(text, body=True), pieces


def assert_clean(out: bytes):
    text = out.decode()
    assert not any(c in text for c in "\x1b\x07\x9b\x9d\x9c\x08\x00\u202e"), repr(text)


def test_titles_from_the_first_message_import_and_rename_are_printed_clean(tmp_path):
    with Store() as store:
        auto = store.create(model="m\x1b]0;x\x07")
        store.add_message(auto, "user", EVIL)
    exported = {"title": EVIL, "model": "m", "messages": [{"role": "user", "content": "hi"}]}
    (tmp_path / "evil.json").write_text(json.dumps(exported))
    imported = call(["import", str(tmp_path / "evil.json")], stdin=None)
    assert imported.returncode == 0, imported.stderr
    renamed = call(["import", str(tmp_path / "evil.json")], stdin=None).stdout.decode().strip()
    assert call(["rename", renamed, EVIL.replace("\x00", "")], stdin=None).returncode == 0
    listing = call(["conversations"], stdin=None)
    assert listing.returncode == 0
    assert_clean(listing.stdout)
    assert listing.stdout.decode().count("red ok done") == 3
    assert json.loads(call(["conversations", "--json"], stdin=None).stdout)[0]["title"] == EVIL.replace("\x00", "")  # stored as given


def test_replay_prints_messages_clean(chat_models):
    with Store() as store:
        cid = store.create(model=str(chat_models["v3"]))
        store.add_message(cid, "user", EVIL)
    r = call(["replay", cid, "-t", "0", "-n", "4"], stdin=None)
    assert r.returncode == 0, r.stderr
    assert_clean(r.stdout)
    assert "red ok done" in r.stdout.decode()


def test_line_mode_shows_a_loaded_conversation_clean(chat_models):
    with Store() as store:
        cid = store.create(model=str(chat_models["v3"]))
        store.add_message(cid, "user", EVIL)
        store.add_message(cid, "assistant", "answer \x1b]0;pwned\x07 here")
    p = spawn("--plain", "--model", str(chat_models["v3"]), "-t", "0", "-n", "4")
    p.expect_exact(PROMPT)
    out = ask(p, f"/load {cid}")
    p.sendline("/exit")
    p.expect(pexpect.EOF)
    p.close()
    assert "you> red ok done" in out and "assistant> answer  here" in out
    assert "pwned" not in p.before and "pwned" not in out


def on_a_terminal(args, stdin: bytes) -> bytes:
    """What `dschat ARGS` writes to stdout when stdout is a pseudo-terminal (stdin a pipe)."""
    master, slave = pty.openpty()
    r = subprocess.run(dschat_cmd() + args, input=stdin, stdout=slave, stderr=subprocess.PIPE, timeout=120)
    os.close(slave)
    assert r.returncode == 0, r.stderr
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: everything written has been read
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return out.replace(b"\r\n", b"\n")


def test_a_pipe_mode_answer_is_clean_on_a_terminal_and_exact_in_a_pipe(chat_models, tmp_path):
    answer = "\x1b]0;pwned\x07 hello"  # sets the window title, on a terminal that received it raw
    model = ["--model", str(parrot(chat_models["v3"], tmp_path / "parrot", answer)), "-t", "0", "-n", "20"]
    piped = call(model, stdin="question")
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.decode() == answer + "\n"  # a script gets the exact answer
    shown = on_a_terminal(model, b"question").decode()
    assert shown == " hello\n"  # the sequence removed whole, though ESC came as a token of its own
    assert Store().latest().messages[-1].content == answer  # saved as generated


def test_conversations_json_escapes_controls_on_a_terminal(tmp_path):
    with Store() as store:
        store.rename(store.create(model="m"), EVIL.replace("\x00", ""))
    shown = on_a_terminal(["conversations", "--json"], b"")
    assert_clean(shown)
    assert json.loads(shown)[0]["title"] == EVIL.replace("\x00", "")  # the same JSON, escaped
