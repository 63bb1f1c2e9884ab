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

from dschat.history import store as store_module


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


def test_a_data_home_that_is_a_file_is_said_before_the_answer(chat_models, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    r = call(["--model", str(chat_models["v3"]), "-t", "0", "-n", "4"], stdin="Hello.",
             env={"XDG_DATA_HOME": str(blocker)})
    assert_clean_error(r, "the history", "--no-save")
    assert r.stdout == b""  # nothing generated that would then be lost
    ok = call(["--model", str(chat_models["v3"]), "-t", "0", "-n", "4", "--no-save"], stdin="Hello.",
              env={"XDG_DATA_HOME": str(blocker)})
    assert ok.returncode == 0 and ok.stdout.strip(), ok.stderr


def read_only_run(directory: Path, args, stdin=b""):
    """`dschat args` with `directory` read-only: its mode taken away, or, for root (whom modes do not stop),
    a read-only bind mount in a mount namespace of its own."""
    from helpers import dschat_cmd
    import subprocess

    if os.geteuid() != 0:
        mode = stat.S_IMODE(directory.stat().st_mode)
        os.chmod(directory, 0o500)
        try:
            return subprocess.run(dschat_cmd() + list(args), input=stdin, capture_output=True, timeout=120)
        finally:
            os.chmod(directory, mode)
    import shutil

    if not shutil.which("unshare"):
        pytest.skip("running as root without unshare: no way to make a directory read-only for root")
    script = 'mount --bind -o ro "$0" "$0" && exec "$@"'
    r = subprocess.run(["unshare", "-m", "sh", "-c", script, str(directory), *dschat_cmd(), *args], input=stdin,
                       capture_output=True, timeout=120)
    if b"mount" in r.stderr and r.returncode != 0 and b"dschat" not in r.stderr:
        pytest.skip(f"no read-only bind mount here: {r.stderr.decode().strip()}")
    return r


def test_a_read_only_history_is_read_and_refuses_a_turn_before_answering(chat_models):
    model = chat_models["v3"]
    assert chat(model, "Hello there.").returncode == 0
    r = read_only_run(data_dir(), ["conversations", "--json"])
    assert r.returncode == 0, r.stderr
    assert [c["messages"] for c in json.loads(r.stdout)] == [2]
    r = read_only_run(data_dir(), ["export", json.loads(r.stdout)[0]["id"]])
    assert r.returncode == 0 and b"Hello there." in r.stdout, r.stderr
    r = read_only_run(data_dir(), ["--model", str(model), "-t", "0", "-n", "4", "-c"], stdin=b"More.")
    assert_clean_error(r, "read-only", "--no-save")
    assert r.stdout == b""
    r = read_only_run(data_dir(), ["--model", str(model), "-t", "0", "-n", "4", "-c", "--no-save"], stdin=b"More.")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr


def test_a_turn_lock_that_is_a_directory_is_one_early_line(chat_models):
    model = chat_models["v3"]
    assert chat(model, "Hello there.").returncode == 0
    lock = data_dir() / "turns.lock"
    lock.unlink(missing_ok=True)
    lock.mkdir()
    r = chat(model, "More.", "-c")
    assert_clean_error(r, "turns.lock is not a regular file", "--no-save")
    assert r.stdout == b""
