"""Text from a model's files, a path or the history reaches the terminal only through the terminal-safe
printer (terminal_text.say, the TUI's notify): a chat template's raise_exception message, a model directory's
name and a theme or style name cannot set the title or clear the screen, and square brackets in them are text,
not Textual markup (a "[/]" ended the TUI with a MarkupError)."""

from __future__ import annotations

import pexpect
from helpers import PROMPT, assert_clean_error, call, make_app, model_copy, ready, spawn, until

from dschat.tui.prompt_area import PromptArea

ESCAPES = "\x1b]0;PWNED\x07\x1b[2J\x9b1;1H\u202e"
RAISING = "{{ raise_exception('" + ESCAPES.replace("\x1b", "\\x1b") + "bad [/] [bold]template') }}"


def assert_no_escapes(text: str):
    assert not any(c in text for c in "\x1b\x07\x9b\u202e"), repr(text)


def test_a_template_error_is_printed_clean_in_pipe_mode(chat_models, tmp_path):
    model = model_copy(chat_models["v3"], tmp_path / "m", chat_template=RAISING)
    r = call(["--model", str(model), "-t", "0", "-n", "2"], stdin="question")
    assert_clean_error(r, "refused this conversation", "bad [/] [bold]template")
    assert_no_escapes(r.stderr.decode())


def test_a_model_directory_named_with_escapes_is_shown_clean(chat_models, tmp_path):
    model = model_copy(chat_models["v3"], tmp_path / f"m{ESCAPES}x")
    missing = call(["--model", str(tmp_path / f"gone{ESCAPES}"), "-n", "2"], stdin="question")
    assert_clean_error(missing, "gone")
    assert_no_escapes(missing.stderr.decode())
    p = spawn("--plain", "--model", str(model), "-t", "0", "-n", "2")
    p.expect_exact(PROMPT)
    header = p.before
    p.sendline("/exit")
    p.expect(pexpect.EOF)
    assert "dschat: m" in header and "x on cpu" in header
    assert "\x1b]0;" not in header and "\x9b" not in header and "\u202e" not in header, repr(header)


async def test_tui_notices_are_clean_and_square_brackets_are_text(chat_models, tmp_path):
    """A template error with escapes and "[/]" is a notice, and so are a theme and a code style named "[/]";
    a model path with "[/]" in it loads; the app goes on."""
    model = model_copy(chat_models["v3"], tmp_path / "m[/]x", chat_template=RAISING)
    app = make_app(model, "--theme", "[/]")
    app.conf.code_style = "[/]"
    async with app.run_test(size=(100, 30)) as pilot:
        await until(pilot, lambda: len(app._notifications) >= 2)
        messages = [n.message for n in app._notifications]
        assert any("no theme called '[/]'" in m for m in messages), messages
        assert any("no Pygments style called '[/]'" in m for m in messages), messages
        await ready(pilot, app)
        prompt = app.query_one(PromptArea)
        prompt.text = "question"
        prompt.focus()
        await pilot.press("enter")
        await until(pilot, lambda: any("refused" in n.message for n in app._notifications))
        await pilot.pause(0.2)
        messages = [n.message for n in app._notifications]
        refused = next(m for m in messages if "refused" in m)
        assert "bad [/] [bold]template" in refused
        assert_no_escapes(refused)
        assert app.sub_title == "]x on cpu"  # the directory m[/]x is ]x in m[
        assert app.is_running
