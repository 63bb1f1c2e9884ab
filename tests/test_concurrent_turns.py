"""Concurrent `dschat -c` runs: each turn is answered on, and saved after, every turn saved before it."""

from __future__ import annotations

import os
import subprocess

from test_pipe_mode import dschat_cmd, run

from dschat.engine import Tokenizer
from dschat.store import Store


def test_four_concurrent_continued_turns_each_see_the_turns_saved_before(chat_models):
    model = ["--model", str(chat_models["v3"]), "-t", "0", "-n", "6"]
    assert run(model + ["first question"], stdin=None).returncode == 0
    runs = [subprocess.Popen(dschat_cmd() + model + ["-c", f"question {i}"], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ))
            for i in range(4)]
    assert [p.wait(timeout=120) for p in runs] == [0] * 4, [p.stderr.read() for p in runs]
    with Store() as store:
        conv = store.latest()
        everything = store._messages(conv.id)
    msgs = conv.messages
    assert len(everything) == len(msgs) == 10  # one chain: no turn was saved beside another
    assert sorted(m.content for m in msgs[2::2]) == [f"question {i}" for i in range(4)]
    tok = Tokenizer.from_dir(chat_models["v3"])
    for k in range(2, 10, 2):  # the prompt each turn ran with holds every message saved before it, in order
        prompt = tok.decode(msgs[k].token_ids, skip_special_tokens=True)
        for m in msgs[:k + 1]:
            assert m.content.strip() in prompt, f"turn {k // 2} did not see {m.content!r}"
            prompt = prompt[prompt.index(m.content.strip()) + len(m.content.strip()):]
