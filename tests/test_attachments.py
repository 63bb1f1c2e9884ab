"""Files in a message (issue 23 section 2): `-f PATH` on the command line, `/add PATH` in line mode."""

from __future__ import annotations

import json
import subprocess

import pexpect
from helpers import PROMPT, ask, call, clean, spawn

from dschat.conversation.attachments import Attachment, read_all
from dschat.history.store import Store


def shown_prompt(*args, stdin=None) -> str:
    r = call(["--model", "demo", "--show-prompt", *args], stdin=stdin)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["text"]


def test_a_file_goes_into_the_message_as_a_fenced_block_with_its_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.py").write_text("def f():\n    return 1\n")
    text = shown_prompt("-f", "a.py", "explain this")
    assert "explain this\n\na.py:\n```py\ndef f():\n    return 1\n```" in text


def test_stdin_as_a_file_and_a_fence_longer_than_any_inside(tmp_path):
    text = shown_prompt("-f", "-", "what is in it?", stdin="one ```` two")
    assert "what is in it?\n\nstdin:\n`````\none ```` two\n`````" in text
    assert Attachment("x.md", "```py\n```").block().startswith("x.md:\n````md\n")


def test_a_folder_brings_its_text_files_and_respects_gitignore(tmp_path):
    d = tmp_path / "proj"
    (d / "src").mkdir(parents=True)
    (d / "src" / "main.py").write_text("print(1)\n")
    (d / "notes.txt").write_text("hello\n")
    (d / "build.log").write_text("noise\n")
    (d / "image.bin").write_bytes(b"\x89PNG\0\0")
    (d / ".secret").write_text("key\n")
    (d / ".gitignore").write_text("*.log\n")
    names = [a.name for a in read_all([str(d)])]
    assert sorted(n.split("proj/")[1] for n in names) == ["notes.txt", "src/main.py"]
    subprocess.run(["git", "init", "-q", str(d)], check=True)  # in a repository: what git would track
    names = [a.name.split("proj/")[1] for a in read_all([str(d)])]
    assert "build.log" not in names and "src/main.py" in names and "image.bin" not in names


def test_binary_oversized_and_missing_files_are_one_line_and_nothing_is_sent(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"ab\0cd")
    (tmp_path / "big.txt").write_bytes(b"a" * ((1 << 20) + 1))
    for name, needle in [("x.bin", "a binary file"), ("big.txt", "more than the 1,048,576"),
                         ("nope.txt", "no such file")]:
        r = call(["--model", "demo", "-f", str(tmp_path / name), "hi"], stdin=None)
        err = r.stderr.decode()
        assert r.returncode != 0 and needle in err and len(err.strip().splitlines()) == 1, err
        assert "Traceback" not in err


def test_the_tui_asks_for_a_message_or_line_mode(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    p = spawn("--model", "demo", "-f", str(tmp_path / "a.txt"))  # a terminal: the TUI would start
    p.expect(pexpect.EOF)
    p.close()
    assert p.exitstatus == 2 and "line mode (--plain)" in clean(p.before)


def test_line_mode_add_shows_the_files_and_their_tokens_and_sends_them(chat_models, tmp_path):
    f = tmp_path / "a.py"
    f.write_text("x = 1\n")
    p = spawn("--plain", "--model", str(chat_models["v3"]), "-t", "0", "-n", "4")
    p.expect_exact(PROMPT)
    out = clean(ask(p, f"/add {f}"))
    assert f"(attached {f}:" in out and "tokens; sent with your next message)" in out
    assert f"(attached: {f})" in clean(ask(p, "/add"))
    ask(p, "what does it do?")
    assert "(nothing attached" in clean(ask(p, "/add"))  # sent once
    p.sendline("/exit")
    p.expect(pexpect.EOF)
    first = Store().latest().messages[0].content
    assert first.startswith(f"what does it do?\n\n{f}:\n```py\nx = 1\n```")


async def test_tui_add_shows_the_files_and_their_tokens_and_sends_them_read_then(chat_models, tmp_path, monkeypatch):
    from helpers import make_app, ready, send, until

    from dschat.tui.prompt_area import PromptArea

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "x.bin").write_bytes(b"ab\0cd")
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "notes.txt").write_text("hello\n")
    (tmp_path / "proj" / "build.log").write_text("noise\n")
    (tmp_path / "proj" / ".gitignore").write_text("*.log\n")
    app = make_app(chat_models["v3"], "-n", "3")
    notices = lambda: [n.message for n in app._notifications]  # noqa: E731
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        prompt = app.query_one(PromptArea)

        async def typed(text):
            prompt.text = text
            prompt.focus()
            await pilot.press("enter")
            await pilot.pause(0.1)

        await typed("/add a.py")
        tok = app.engine.tokenizer
        tokens = len(tok.encode_plain(read_all(["a.py"])[0].block()))
        assert prompt.text == "" and prompt.border_subtitle == f"attached a.py: {tokens:,} tokens · /drop takes them back"
        await typed("/add x.bin")  # refused with one line; what is attached stays
        assert any("not attached: x.bin: a binary file" in n for n in notices())
        assert prompt.border_subtitle.startswith("attached a.py:")
        await typed("/add proj")  # a folder: its .gitignore respected
        assert prompt.border_subtitle.startswith("attached a.py, proj/notes.txt: ")
        (tmp_path / "a.py").write_text("x = 2\n")  # read when the message is sent
        await send(pilot, app, "what do they do?")
        assert prompt.border_subtitle == ""
        first = Store().latest().messages[0].content
        assert first == "what do they do?\n\na.py:\n```py\nx = 2\n```\n\nproj/notes.txt:\n```txt\nhello\n```"
        await typed("/add a.py")
        await typed("/drop")
        assert prompt.border_subtitle == ""
        await send(pilot, app, "plain")
        assert Store().latest().messages[2].content == "plain"
        # a file that grew past the limit after /add: not sent, the text kept
        await typed("/add a.py")
        (tmp_path / "a.py").write_bytes(b"a" * ((1 << 20) + 1))
        done = app.turns_done
        await typed("too big now")
        await until(pilot, lambda: any(n.startswith("not sent: ") for n in notices()))
        assert app.turns_done == done and prompt.text == "too big now" and len(Store().latest().messages) == 4
