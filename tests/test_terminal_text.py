"""Stored text never reaches the terminal raw: titles (first message, import, rename) in `dschat conversations`,
messages in `dschat replay` and in line mode lose their escape sequences and control characters."""

from __future__ import annotations

import json

import pexpect
import pytest
from helpers import PROMPT, ask, run, spawn

from dschat.store import Store
from dschat.terminal_text import terminal_safe

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


def assert_clean(out: bytes):
    text = out.decode()
    assert not any(c in text for c in "\x1b\x07\x9b\x9d\x9c\x08\x00\u202e"), repr(text)


def test_titles_from_the_first_message_import_and_rename_are_printed_clean(tmp_path):
    with Store() as store:
        auto = store.create(model="m\x1b]0;x\x07")
        store.add_message(auto, "user", EVIL)
    exported = {"title": EVIL, "model": "m", "messages": [{"role": "user", "content": "hi"}]}
    (tmp_path / "evil.json").write_text(json.dumps(exported))
    imported = run(["import", str(tmp_path / "evil.json")], stdin=None)
    assert imported.returncode == 0, imported.stderr
    renamed = run(["import", str(tmp_path / "evil.json")], stdin=None).stdout.decode().strip()
    assert run(["rename", renamed, EVIL.replace("\x00", "")], stdin=None).returncode == 0
    listing = run(["conversations"], stdin=None)
    assert listing.returncode == 0
    assert_clean(listing.stdout)
    assert listing.stdout.decode().count("red ok done") == 3
    assert json.loads(run(["conversations", "--json"], stdin=None).stdout)[0]["title"] == EVIL.replace("\x00", "")  # stored as given


def test_replay_prints_messages_clean(chat_models):
    with Store() as store:
        cid = store.create(model=str(chat_models["v3"]))
        store.add_message(cid, "user", EVIL)
    r = run(["replay", cid, "-t", "0", "-n", "4"], stdin=None)
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
