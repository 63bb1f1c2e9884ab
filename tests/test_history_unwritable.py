"""The history when it cannot be written (issue 27 items 9, 10, 23, 24): a turn is never lost to a busy history
(it waits, says so, and keeps the turn pending beside the history, added the next time), an unwritable one is
found before the model answers, a read-only one can still be read, and a bad turns.lock is one early line."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from pathlib import Path

import pytest
from helpers import assert_clean_error, call

from dschat import store as store_module


def data_dir() -> Path:
    return Path(os.environ["XDG_DATA_HOME"]) / "dschat"


def chat(model, text, *extra):
    return call(["--model", str(model), "-t", "0", "-n", "4", *extra], stdin=text)


def listed():
    r = call(["conversations", "--json"], stdin=None)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture
def short_waits(monkeypatch):
    monkeypatch.setattr(store_module, "BUSY_NOTICE_S", 0.2)
    monkeypatch.setattr(store_module, "BUSY_WAIT_S", 1.0)


def test_a_busy_history_keeps_the_turn_pending_then_adds_it(chat_models, short_waits):
    model = chat_models["v3"]
    first = chat(model, "Hello there.")
    assert first.returncode == 0, first.stderr
    holder = sqlite3.connect(str(data_dir() / "history.db"), isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process writing, for longer than dschat waits
    try:
        r = chat(model, "And then?", "-c")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    err = r.stderr.decode()
    assert r.stdout.strip(), err  # the answer was shown
    assert "is busy" in err and "waiting up to" in err  # said while it waited
    pending = sorted((data_dir() / "pending").glob("*.json"))
    assert len(pending) == 1 and str(pending[0]) in err, err  # kept, and it says where
    [conv] = listed()  # the next dschat adds it (listing the history)
    assert conv["messages"] == 4 and not list((data_dir() / "pending").glob("*.json"))
    again = call(["export", conv["id"]], stdin=None)
    messages = json.loads(again.stdout)["messages"]
    assert [m["content"] for m in messages if m["role"] == "user"] == ["Hello there.", "And then?"]
    assert messages[-1]["content"] == r.stdout.decode().rstrip("\n")
