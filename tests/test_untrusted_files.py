"""Files dschat did not write are opened only when they are regular files, and read only up to a size: a FIFO
named like a cached prefix or a model's tokenizer.json hung dschat beyond SIGTERM and SIGINT (12 minutes,
until SIGKILL); now a FIFO model file is one line naming it, and a FIFO cache file is ignored with a warning."""

from __future__ import annotations

import os
import stat
import threading
import time

import pexpect
import pytest
from helpers import assert_clean_error, call, model_copy, spawn

from dschat.history.store import Store


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "config.json",
                                  "model.safetensors.index.json", "model-00002-of-000003.safetensors"])
def test_a_fifo_in_the_model_directory_is_one_line(chat_models, tmp_path, name):
    model = model_copy(chat_models["v3"], tmp_path / "m")
    (model / name).unlink()
    os.mkfifo(model / name)
    r = call(["--model", str(model), "-t", "0", "-n", "2"], stdin="question")
    assert_clean_error(r, name, "a FIFO, not a regular file")


def test_a_fifo_named_like_a_cache_file_is_ignored(chat_models):
    model = ["--model", str(chat_models["v3"]), "-t", "0", "-n", "3"]
    assert call(model, stdin="question").returncode == 0
    kv = [p for p in (os.environ["XDG_CACHE_HOME"] + "/dschat/kv",) if os.path.isdir(p)][0]
    cached = [f for f in os.listdir(kv) if f.endswith(".safetensors")]
    assert cached
    for f in cached:
        os.unlink(os.path.join(kv, f))
        os.mkfifo(os.path.join(kv, f))
    r = call([*model, "-c"], stdin="and again")
    assert r.returncode == 0, r.stderr
    assert "a FIFO, not a regular file" in r.stderr.decode()  # a warning: the prefix is computed again


# -- files the user gives dschat to read ---------------------------------------------------------------------------
def test_fim_refuses_what_is_not_a_regular_file_or_too_large(tmp_path):
    """`fim /dev/zero` read until memory ran out and a 13 MB file took 42 s: now one line, before any model
    loads (no --model is needed to see it)."""
    from dschat.fim.source_file import MAX_SOURCE_BYTES

    os.mkfifo(tmp_path / "fifo.py")
    assert_clean_error(call(["fim", str(tmp_path / "fifo.py")], stdin=None), "a FIFO, not a regular file")
    assert_clean_error(call(["fim", "/dev/zero"], stdin=None), "a character device, not a regular file")
    big = tmp_path / "big.py"
    big.write_text("x = 1\n" * (MAX_SOURCE_BYTES // 6 + 1) + "<FILL>\n")
    assert_clean_error(call(["fim", str(big)], stdin=None), "big.py", "more than the 2,097,152")
    assert_clean_error(call(["fim", "-"], stdin=big.read_bytes()), "stdin: more than 2,097,152 bytes")


def test_a_fifo_config_file_or_import_file_is_one_line(tmp_path):
    config = tmp_path / "xdg_config_home" / "dschat"
    config.mkdir(parents=True)
    os.mkfifo(config / "config.toml")
    assert_clean_error(call(["hello"], env={"XDG_CONFIG_HOME": str(tmp_path / "xdg_config_home")}),
                       "config.toml: a FIFO, not a regular file")
    os.mkfifo(tmp_path / "chat.json")
    assert_clean_error(call(["import", str(tmp_path / "chat.json")]), "chat.json: a FIFO, not a regular file")


def test_a_fifo_in_place_of_turns_lock_is_one_line(chat_models):
    """(dschat's own file, where another program put a FIFO: opening it waited for a reader)"""
    data = os.path.join(os.environ["XDG_DATA_HOME"], "dschat")
    model = ["--model", str(chat_models["v3"]), "-t", "0", "-n", "2"]
    assert call(model, stdin="question").returncode == 0
    os.mkfifo(os.path.join(data, "turns.lock"))
    assert_clean_error(call([*model, "-c"], stdin="again"), "turns.lock")


def waiting_to_open(thread: threading.Thread):
    """Once `thread` waits in its open() of a FIFO for a writer (where /proc shows it; else after a moment)."""
    wchan = f"/proc/self/task/{thread.native_id}/wchan"
    for _ in range(500):
        try:
            with open(wchan) as f:
                if f.read() in ("wait_for_partner", "0", ""):  # "0": hidden here
                    break
        except OSError:
            break
        time.sleep(0.01)
    time.sleep(0.05)


# -- the history itself --------------------------------------------------------------------------------------------
def test_a_fifo_in_place_of_the_history_is_one_line_everywhere_and_left_alone(chat_models):
    """history.db a FIFO: every command (conversations, pipe mode, line mode, the TUI's start) says so in one line
    and exits 1, and never opens it: a reader waiting on the FIFO is not woken (it was, with an end of file,
    when dschat opened the FIFO to write it), and the FIFO is still there."""
    history = Store.default_path()
    os.mkfifo(history)
    got = []
    reader = threading.Thread(target=lambda: got.append(os.read(fd := os.open(history, os.O_RDONLY), 100))
                              or os.close(fd), daemon=True)
    reader.start()
    waiting_to_open(reader)
    message = "history.db: a FIFO, not a regular file"
    try:
        assert_clean_error(call(["conversations"]), message)
        assert_clean_error(call(["--model", str(chat_models["v3"]), "-n", "2"], stdin="question"), message)
        for args in (["--plain"], []):  # line mode, the TUI
            p = spawn(*args, "--model", str(chat_models["v3"]))
            p.expect(pexpect.EOF, timeout=60)
            p.close()
            lines = [line for line in p.before.splitlines() if line.strip()]
            assert p.exitstatus == 1 and len(lines) == 1 and "dschat: error:" in lines[0] and message in lines[0], \
                p.before
        assert reader.is_alive() and not got  # nobody opened it to write
    finally:
        if reader.is_alive():
            fd = os.open(history, os.O_WRONLY | os.O_NONBLOCK)  # the reader is waiting: this opens at once
            os.write(fd, b"the test's own bytes")
            os.close(fd)
            reader.join(5)
    assert got == [b"the test's own bytes"] and stat.S_ISFIFO(os.stat(history).st_mode)


@pytest.mark.parametrize("name", ["history.db-wal", "history.db-shm"])
def test_a_fifo_in_place_of_the_historys_wal_or_shm_is_one_line_and_kept(name):
    """(SQLite deleted a FIFO named like the -wal file and went on; it failed on one named like -shm with 'disk
    I/O error')"""
    history = Store.default_path()
    Store(history).close()
    (history.parent / name).unlink(missing_ok=True)
    os.mkfifo(history.parent / name)
    assert_clean_error(call(["conversations"]), f"{name}: a FIFO, not a regular file")
    assert stat.S_ISFIFO(os.stat(history.parent / name).st_mode)
