"""A reply cut short by the context window says so: a warning on stderr in pipe mode, a line in line mode, a
notice in the TUI. A reply that ends by itself or at --max-tokens says nothing."""

from __future__ import annotations

import pexpect
from helpers import PROMPT, ask, call, make_app, ready, send, spawn

CUT = "the reply was cut short: the context window (48 tokens) is full"


def test_pipe_mode_warns_on_stderr(small_context):
    cut = call(["--model", str(small_context), "-t", "0"], stdin="hi")
    assert cut.returncode == 0 and cut.stdout.strip()
    assert f"dschat: warning: {CUT}" in cut.stderr.decode()
    whole = call(["--model", str(small_context), "-t", "0", "-n", "3", "--no-save"], stdin="hi")
    assert whole.returncode == 0 and "cut short" not in whole.stderr.decode()


def test_line_mode_says_so(small_context):
    p = spawn("--plain", "--model", str(small_context), "-t", "0")
    p.expect_exact(PROMPT)
    assert f"({CUT}" in ask(p, "hi").replace("\n", " ")
    p.sendline("/exit")
    p.expect(pexpect.EOF)
    p.close()
    assert p.exitstatus == 0


async def test_the_tui_shows_a_notice(small_context):
    app = make_app(small_context)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "hi")
        assert any(CUT in n.message for n in app._notifications)
