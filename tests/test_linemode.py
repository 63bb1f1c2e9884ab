"""`dschat --plain` driven through a pseudo-terminal (pexpect)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pexpect
from helpers import ACCEPTED, PROMPT, ask, call, clean, long_reply, spawn

from dschat.history.store import Store
from dschat.conversation.template import chat_prompt
from dschat.engine import SamplingParams


def test_line_mode_chat_commands_and_history(chat_models, chat_engines):
    p = spawn("--plain", "--model", str(chat_models["v3"]), "-t", "0", "-n", "10")
    p.expect_exact(PROMPT)
    assert "/help for commands" in clean(p.before)
    out = ask(p, "What is MLA?")
    eng = chat_engines["v3"]
    _, ids = chat_prompt(eng.tokenizer, [{"role": "user", "content": "What is MLA?"}])
    want = eng.tokenizer.decode(list(eng.generate(ids, SamplingParams(max_tokens=10))), skip_special_tokens=True)
    assert want.strip() in out
    stats = ask(p, "/stats")
    assert json.loads(stats.strip().splitlines()[-1])["generated_tokens"] >= 1
    ask(p, "/regen")
    assert "/system" in ask(p, "/help")
    p.sendline('"""two')
    p.expect_exact(ACCEPTED)
    ask(p, 'lines"""')
    p.sendline("/exit")
    p.expect(pexpect.EOF)
    p.close()
    assert p.exitstatus == 0
    conv = Store().latest()
    assert [m.role for m in conv.messages] == ["user", "assistant"] * 2
    assert conv.messages[2].content == "two\nlines"
    assert len(Store().siblings(conv.messages[1].id)) == 2  # /regen kept the first answer


def test_ctrl_c_stops_a_reply_and_ctrl_d_exits(chat_models):
    p = long_reply(chat_models["v3"])
    p.sendintr()
    p.expect(r"\(stopped\)")
    p.expect_exact(PROMPT)
    p.sendeof()
    p.expect(pexpect.EOF)
    p.close()
    assert p.exitstatus == 0
    assert Store().latest().messages[-1].interrupted


def screen(text: str) -> str:
    """What a terminal shows of `text`: a line redrawn in place (CR, erase line) shows its last drawing."""
    return "\n".join(line.split("\r\x1b[2K")[-1] for line in text.split("\n"))


def test_printer_streams_a_line_as_it_comes_and_highlights_code_as_it_grows(monkeypatch):
    import io

    from dschat.cli.linemode import Printer

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    out = Tty()
    p = Printer(out)
    p.write("A one-line answer")
    assert out.getvalue() == "A one-line answer"  # shown before its line ends
    p.write("\n```python\nimport o")
    assert "\x1b[" in screen(out.getvalue()).splitlines()[-1]  # the unfinished code line, highlighted
    p.write("s\n```")
    p.close()
    assert clean(screen(out.getvalue())) == "A one-line answer\n```python\nimport os\n```\n"


def test_printer_highlights_code_blocks_on_a_colour_terminal(monkeypatch):
    import io

    from dschat.terminal.highlight import terminal_formatter
    from dschat.cli.linemode import Printer

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    for style in (None, "monokai"):
        out = Tty()
        p = Printer(out, formatter=terminal_formatter(style))
        for piece in ["Use:\n```py", "thon\nimport os\n", "```\ndone"]:
            p.write(piece)
        p.close()
        text = screen(out.getvalue())
        assert clean(text) == "Use:\n```python\nimport os\n```\ndone\n"
        code_line = text.splitlines()[2]
        assert code_line != "import os" and "\x1b[" in code_line  # coloured
        assert text.splitlines()[0] == "Use:"  # prose is left alone
    assert "38;5;" in code_line  # the named style is drawn in 256 colours


def test_a_full_context_is_reported_and_the_session_goes_on(chat_models, tmp_path):
    small = tmp_path / "small-context"
    small.mkdir()
    for f in chat_models["v3"].iterdir():
        (small / f.name).symlink_to(f)
    config = json.loads((chat_models["v3"] / "config.json").read_text())
    config["max_position_embeddings"] = 48
    (small / "config.json").unlink()
    (small / "config.json").write_text(json.dumps(config))
    p = spawn("--plain", "--model", str(small), "-t", "0", "-n", "4")
    p.expect_exact(PROMPT)
    ask(p, "hi")
    out = ask(p, "word " * 60)
    assert "(error:" in out and "context window" in out
    assert "(error:" not in ask(p, "/regen")  # the history is intact: regenerating still works
    p.sendline("/exit")
    p.expect(pexpect.EOF)
    p.close()
    assert p.exitstatus == 0
    conv = Store().latest()
    assert [m.content for m in conv.messages][0] == "hi" and len(conv.messages) == 2


def test_regen_in_a_continued_conversation_adds_a_sibling(chat_models):
    assert call(["--model", str(chat_models["v3"]), "-t", "0", "-n", "5"], stdin="first").returncode == 0
    saved = Store().latest()
    p = spawn("--plain", "-c", "--model", str(chat_models["v3"]), "-t", "1.0", "--seed", "5", "-n", "5")
    p.expect_exact(PROMPT)
    ask(p, "/regen")
    p.sendline("/exit")
    p.expect(pexpect.EOF)
    p.close()
    conv = Store().get(saved.id)
    assert [m.role for m in conv.messages] == ["user", "assistant"]
    assert len(Store().siblings(conv.messages[1].id)) == 2


def test_edit_an_earlier_message_branches_there(chat_models, chat_engines):
    """/edit N takes the chat back to before your message N with its text in the input; sent (changed), it is a
    sibling of the old one, the turns after the old one stay saved on their branch, and the answer is what a
    fresh engine gives for the edited conversation (the cache cut back correctly)."""
    p = spawn("--plain", "--model", str(chat_models["v3"]), "-t", "0", "-n", "4")
    p.expect_exact(PROMPT)
    assert "nothing to edit yet" in ask(p, "/edit")
    answers = [ask(p, text) for text in ("one", "two", "three")]
    assert "N from 1 to 3" in ask(p, "/edit 4")
    assert "editing your message 2 of 3" in ask(p, "/edit 2")
    p.expect_exact("two")  # the input starts from the message's text
    p.send("\x15")  # Ctrl+U: clear it
    ask(p, "TWO")
    p.sendline("/exit")
    p.expect(pexpect.EOF)
    p.close()
    assert p.exitstatus == 0 and answers[0].strip()
    conv = Store().latest()
    assert [m.content for m in conv.messages if m.role == "user"] == ["one", "TWO"]
    versions = Store().siblings(conv.messages[2].id)
    assert sorted(m.content for m in versions) == ["TWO", "two"]
    eng = chat_engines["v3"]
    turns = [{"role": m.role, "content": m.content} for m in conv.messages[:3]]
    _, ids = chat_prompt(eng.tokenizer, turns)
    want = eng.tokenizer.decode(list(eng.generate(ids, SamplingParams(max_tokens=4))), skip_special_tokens=True)
    assert conv.messages[3].content == want


def test_load_by_id_and_from_an_exported_file(chat_models, tmp_path):
    assert call(["--model", str(chat_models["v3"]), "-t", "0", "-n", "4"], stdin="saved one").returncode == 0
    saved = Store().latest()
    exported = tmp_path / "chat.json"
    assert call(["export", saved.id, "-o", str(exported)]).returncode == 0
    p = spawn("--plain", "--model", str(chat_models["v3"]), "-t", "0", "-n", "4")
    p.expect_exact(PROMPT)
    assert "you> saved one" in ask(p, f"/load {saved.id[:6]}")
    assert "you> saved one" in ask(p, f"/load {exported}")
    assert "cannot load" in ask(p, "/load no-such-id")
    p.sendline("/exit")
    p.expect(pexpect.EOF)
    p.close()
    assert len(Store().list()) == 2  # the file was imported as a conversation of its own


def test_raw_is_honoured_in_a_new_line_mode_chat(chat_models, chat_engines):
    from dschat.conversation.template import completion_prompt

    p = spawn("--plain", "--raw", "--model", str(chat_models["v3"]), "-t", "0", "-n", "4")
    p.expect_exact(PROMPT)
    ask(p, "def f(x):")
    p.sendline("/exit")
    p.expect(pexpect.EOF)
    p.close()
    _, ids = completion_prompt(chat_engines["v3"].tokenizer, "def f(x):")
    assert Store().latest().messages[0].token_ids == ids  # text completion, not the chat template
    history = Path(os.environ["XDG_DATA_HOME"]) / "dschat" / "prompt_history"
    assert stat.S_IMODE(history.stat().st_mode) == 0o600 and "def f(x):" in history.read_text()
