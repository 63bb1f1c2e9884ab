"""Concurrent `dschat -c` runs: each turn is answered on, and saved after, every turn saved before it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pexpect
from helpers import PROMPT, ask, call, dschat_cmd, make_app, ready, run, send, spawn, until

from dschat.engine import Tokenizer
from dschat.history.store import Store
from dschat.tui.message_view import MessageView
from dschat.tui.prompt_area import PromptArea

HOLD = ("import sys; from dschat.history.turn_lock import TurnLock; t = TurnLock(); t.acquire(sys.argv[1]); "
        "print(1, flush=True); input()")  # a process that holds a conversation until its stdin closes


def assert_each_turn_saw_the_turns_before(model_dir, n_messages: int, regenerated: int = 0):
    """The latest conversation is one chain of `n_messages` (beside it only `regenerated` answers), and the
    prompt each turn ran with holds every message saved before it, in order."""
    with Store() as store:
        conv = store.latest()
        everything = store._messages(conv.id)
    msgs = conv.messages
    assert len(everything) - regenerated == len(msgs) == n_messages  # one chain: no turn saved beside another
    tok = Tokenizer.from_dir(model_dir)
    for k in range(2, n_messages, 2):
        prompt = tok.decode(msgs[k].token_ids, skip_special_tokens=True)
        for m in msgs[:k + 1]:
            assert m.content.strip() in prompt, f"turn {k // 2} did not see {m.content!r}"
            prompt = prompt[prompt.index(m.content.strip()) + len(m.content.strip()):]
    return msgs


def test_four_concurrent_continued_turns_each_see_the_turns_saved_before(chat_models):
    model = ["--model", str(chat_models["v3"]), "-t", "0", "-n", "6"]
    assert call(model + ["first question"], stdin=None).returncode == 0
    runs = [subprocess.Popen(dschat_cmd() + model + ["-c", f"question {i}"], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ))
            for i in range(4)]
    assert [p.wait(timeout=120) for p in runs] == [0] * 4, [p.stderr.read() for p in runs]
    msgs = assert_each_turn_saw_the_turns_before(chat_models["v3"], 10)
    assert sorted(m.content for m in msgs[2::2]) == [f"question {i}" for i in range(4)]


def test_a_line_mode_turn_follows_a_dschat_c_run_between_its_turns(chat_models):
    """Line mode holds the conversation per turn, not per session: a `dschat -c` runs between two of its
    turns, and its next turn is asked after (and shows) what that run saved."""
    model = ["--model", str(chat_models["v3"]), "-t", "0", "-n", "6"]
    p = spawn("--plain", *model)
    p.expect_exact(PROMPT)
    ask(p, "line one")
    r = run(model + ["-c", "piped between"], stdin=None, timeout=60)  # does not wait for line mode to end
    assert r.returncode == 0, r.stderr
    out = ask(p, "line two")
    assert "saved meanwhile by another dschat" in out and "you> piped between" in out
    p.sendline("/exit")
    p.expect(pexpect.EOF)
    msgs = assert_each_turn_saw_the_turns_before(chat_models["v3"], 6)
    assert [m.content for m in msgs[::2]] == ["line one", "piped between", "line two"]


async def test_a_tui_turn_does_not_wait_and_follows_what_was_saved_meanwhile(chat_models):
    """While another process holds the conversation, the TUI says so and keeps the text; once it is saved,
    the TUI's next turn shows it and is asked after it; so does a regeneration."""
    app = make_app(chat_models["v3"], "-n", "6")
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "tui one")
        holder = subprocess.Popen([sys.executable, "-c", HOLD, app.conv_id], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, env=dict(os.environ))
        assert holder.stdout.readline()  # it holds the conversation
        prompt = app.query_one(PromptArea)
        prompt.text = "tui two"
        prompt.focus()
        await pilot.press("enter")
        await pilot.pause(0.3)
        assert not app.busy and app.turns_done == 1 and prompt.text == "tui two"  # not sent, not lost
        assert any(f"another dschat (pid {holder.pid}) is answering" in str(n.message) for n in app._notifications)
        holder.communicate(b"\n", timeout=30)
        pipe = ["--model", str(chat_models["v3"]), "-t", "0", "-n", "6", "-c"]
        assert run(pipe + ["piped between"], stdin=None).returncode == 0
        await send(pilot, app, "tui two")
        assert [v.text.strip() for v in app.query(MessageView) if v.role == "user"] == \
            ["tui one", "piped between", "tui two"]
        assert run(pipe + ["piped again"], stdin=None).returncode == 0
        done = app.turns_done
        await pilot.press("ctrl+r")  # a new answer to the last prompt, which is now "piped again"
        await until(pilot, lambda: app.turns_done > done)
        await pilot.pause(0.2)
        shown = [(v.role, v.text.strip()) for v in app.query(MessageView)]
    assert [text for role, text in shown if role == "user"] == ["tui one", "piped between", "tui two", "piped again"]
    assert [role for role, _ in shown] == ["user", "assistant"] * 4
    msgs = assert_each_turn_saw_the_turns_before(chat_models["v3"], 8, regenerated=1)
    assert [m.content for m in msgs[::2]] == ["tui one", "piped between", "tui two", "piped again"]
    assert len(Store().siblings(msgs[-1].id)) == 2  # the regenerated answer beside the piped one


def test_a_pipe_mode_run_says_whom_it_waits_for_and_gives_up(chat_models, monkeypatch):
    """Behind a stopped process holding the conversation, `dschat -c` waited silently, for ever."""
    from dschat.history import turn_lock

    model = ["--model", str(chat_models["v3"]), "-t", "0", "-n", "2"]
    assert call(model, stdin="question").returncode == 0
    holder = subprocess.Popen([sys.executable, "-c", HOLD, Store().latest().id], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, env=dict(os.environ))
    try:
        assert holder.stdout.readline()  # it holds the conversation
        os.kill(holder.pid, signal.SIGSTOP)
        monkeypatch.setattr(turn_lock, "TURN_WAIT_S", 1)
        r = call([*model, "-c"], stdin="again")
        err = r.stderr.decode()
        assert f"dschat: waiting: another dschat (pid {holder.pid}) is answering" in err, err
        assert r.returncode == 1 and err.splitlines()[-1].startswith("dschat: error: gave up after 1 s"), err
        assert str(holder.pid) in err.splitlines()[-1] and "Traceback" not in err
    finally:
        os.kill(holder.pid, signal.SIGCONT)
        holder.communicate(b"\n", timeout=30)
    assert len(Store().latest().messages) == 2  # nothing saved by the run that gave up
