"""Concurrent `dschat -c` runs: each turn is answered on, and saved after, every turn saved before it."""

from __future__ import annotations

import os
import subprocess

import pexpect
from helpers import PROMPT, ask, dschat_cmd, run, spawn

from dschat.engine import Tokenizer
from dschat.store import Store


def assert_each_turn_saw_the_turns_before(model_dir, n_messages: int):
    """The latest conversation is one chain of `n_messages`, and the prompt each turn ran with holds every
    message saved before it, in order."""
    with Store() as store:
        conv = store.latest()
        everything = store._messages(conv.id)
    msgs = conv.messages
    assert len(everything) == len(msgs) == n_messages  # one chain: no turn was saved beside another
    tok = Tokenizer.from_dir(model_dir)
    for k in range(2, n_messages, 2):
        prompt = tok.decode(msgs[k].token_ids, skip_special_tokens=True)
        for m in msgs[:k + 1]:
            assert m.content.strip() in prompt, f"turn {k // 2} did not see {m.content!r}"
            prompt = prompt[prompt.index(m.content.strip()) + len(m.content.strip()):]
    return msgs


def test_four_concurrent_continued_turns_each_see_the_turns_saved_before(chat_models):
    model = ["--model", str(chat_models["v3"]), "-t", "0", "-n", "6"]
    assert run(model + ["first question"], stdin=None).returncode == 0
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
