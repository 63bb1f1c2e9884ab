"""A file the user names for output (`export -o`, line mode's /save, the TUI's export) is written through:
a symlink stays a link and its target gets the text, a FIFO and a terminal get it streamed (a FIFO was
replaced by a regular file and its reader waited forever), and anything else is refused in one line."""

from __future__ import annotations

import json
import os
import pty
import socket
import stat
import threading

import pexpect
from helpers import PROMPT, answer, assert_clean_error, ask, call, make_app, ready, run, send, spawn

from dschat.history.store import Store


def saved_conversation() -> str:
    with Store() as store:
        cid = store.create(model="m")
        store.add_message(cid, "user", "hello")
        store.add_message(cid, "assistant", "hi there")
    return cid


def test_export_writes_through_a_symlink(tmp_path):
    cid = saved_conversation()
    (tmp_path / "real.json").write_text("old")
    os.chmod(tmp_path / "real.json", 0o640)
    (tmp_path / "link.json").symlink_to("real.json")
    r = call(["export", cid, "-o", str(tmp_path / "link.json")])
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "link.json").is_symlink() and os.readlink(tmp_path / "link.json") == "real.json"
    assert json.loads((tmp_path / "real.json").read_text())["messages"][1]["content"] == "hi there"
    assert stat.S_IMODE((tmp_path / "real.json").stat().st_mode) == 0o640  # the target's mode kept
    (tmp_path / "dangling.json").symlink_to("new.json")  # a link to a file not there yet: the file is made
    assert call(["export", cid, "-o", str(tmp_path / "dangling.json")]).returncode == 0
    assert (tmp_path / "dangling.json").is_symlink() and "hi there" in (tmp_path / "new.json").read_text()


def test_export_makes_private_files_as_the_history_is(tmp_path):
    """`dschat export -o FILE` made FILE 0644 (the umask's) while the history is 0600 and the TUI's export
    0600: every export writes a new file private; a file already there keeps its mode."""
    cid = saved_conversation()
    old = os.umask(0o022)
    try:
        for fmt in ("json", "md"):
            r = run(["export", cid, "--format", fmt, "-o", str(tmp_path / f"new.{fmt}")])
            assert r.returncode == 0, r.stderr
            assert stat.S_IMODE((tmp_path / f"new.{fmt}").stat().st_mode) == 0o600
        assert "hi there" in (tmp_path / "new.md").read_text()
        (tmp_path / "shared.md").write_text("old")
        os.chmod(tmp_path / "shared.md", 0o644)
        assert run(["export", cid, "--format", "md", "-o", str(tmp_path / "shared.md")]).returncode == 0
        assert stat.S_IMODE((tmp_path / "shared.md").stat().st_mode) == 0o644
    finally:
        os.umask(old)


def test_export_streams_to_a_fifo(tmp_path):
    cid = saved_conversation()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()), daemon=True)
    reader.start()
    r = call(["export", cid, "-o", str(fifo)])
    reader.join(10)
    assert r.returncode == 0, r.stderr
    assert not reader.is_alive() and json.loads(got[0])["messages"][0]["content"] == "hello"
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)  # still a FIFO


def test_export_streams_to_a_terminal(tmp_path):
    cid = saved_conversation()
    master, slave = pty.openpty()
    name = os.ttyname(slave)
    r = call(["export", cid, "--format", "md", "-o", name])
    assert r.returncode == 0, r.stderr
    assert "hi there" in os.read(master, 65536).decode()
    assert stat.S_ISCHR(os.stat(name).st_mode)
    os.close(master)
    os.close(slave)


def test_export_refuses_a_directory_and_a_socket(tmp_path):
    cid = saved_conversation()
    (tmp_path / "dir").mkdir()
    assert_clean_error(call(["export", cid, "-o", str(tmp_path / "dir")]), "a directory; not written")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tmp_path / "sock"))
        assert_clean_error(call(["export", cid, "-o", str(tmp_path / "sock")]), "a socket; not written")
        assert stat.S_ISSOCK(os.lstat(tmp_path / "sock").st_mode)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_line_mode_save_writes_through_a_symlink(chat_models, tmp_path):
    cid = saved_conversation()
    (tmp_path / "real.json").write_text("old")
    (tmp_path / "link.json").symlink_to(tmp_path / "real.json")
    p = spawn("--plain", "--model", str(chat_models["v3"]), "--conversation", cid, "-t", "0", "-n", "2")
    p.expect_exact(PROMPT)
    out = ask(p, f"/save {tmp_path / 'link.json'}")
    assert "saved to" in out, out
    assert "saved to" in ask(p, f"/save {tmp_path / 'new.json'}")
    p.sendline("/exit")
    p.expect(pexpect.EOF)
    assert stat.S_IMODE((tmp_path / "new.json").stat().st_mode) == 0o600  # private, as the history is
    assert (tmp_path / "link.json").is_symlink()
    assert "hi there" in (tmp_path / "real.json").read_text()


async def test_tui_export_writes_through_a_symlink(chat_models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app = make_app(chat_models["v3"], "-n", "2")
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "hello")
        link = tmp_path / f"dschat-{app.conv_id}.md"
        link.symlink_to(tmp_path / "real.md")
        app.chat_screen.action_export()
        await answer(pilot, app, str(link))
    assert link.is_symlink() and "hello" in (tmp_path / "real.md").read_text()


def test_symlinked_data_and_cache_directories_keep_their_modes(chat_models, tmp_path):
    """The data or cache directory a symlink to a shared 2775 directory: it became 0700, its setgid bit gone.
    dschat changes only what it made: its files in there are private, the directory stays as it is."""
    env = {}
    for kind in ("DATA", "CACHE"):
        shared = tmp_path / f"shared-{kind.lower()}"
        shared.mkdir()
        os.chmod(shared, 0o2775)
        home = tmp_path / f"xdg-{kind.lower()}"
        home.mkdir()
        (home / "dschat").symlink_to(shared)
        env[f"XDG_{kind}_HOME"] = str(home)
    r = call(["--model", str(chat_models["v3"]), "-t", "0", "-n", "2"], stdin="question", env=env)
    assert r.returncode == 0, r.stderr
    for kind in ("data", "cache"):
        assert stat.S_IMODE(os.stat(tmp_path / f"shared-{kind}").st_mode) == 0o2775
    assert stat.S_IMODE(os.stat(tmp_path / "shared-data" / "history.db").st_mode) == 0o600
