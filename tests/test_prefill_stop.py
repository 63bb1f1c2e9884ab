"""Between sending and the first token the TUI said "ready · context 0/4096" (5 s under load) and Esc did
nothing until the prefill had run to its end. Now the status line says "prefilling N tokens" (N: the prompt's
tokens the cache does not hold) and Esc stops the prefill between two of its chunks: the engine's generate
takes a `stop` event; what was prefilled stays cached, whole, so the next turn reuses it and its tokens are
those of a prefill from scratch."""

from __future__ import annotations

import threading
import time

from helpers import ServerThread, make_app, ready, until

from dschat.engine import Engine, SamplingParams
from dschat.history.store import Store


class StopAfter(threading.Event):
    """An event that reads as set from its `n`-th look on: the engine looks once before each prefill chunk."""

    def __init__(self, n: int):
        super().__init__()
        self.looks, self.n = 0, n

    def is_set(self) -> bool:
        self.looks += 1
        return self.looks > self.n or super().is_set()


def prompt(engine, n: int) -> list[int]:
    text = " ".join(f"word{i}" for i in range(n))
    return engine.tokenizer.encode_plain(text)[:n]


def test_a_stopped_prefill_leaves_the_cache_valid(chat_models, monkeypatch):
    monkeypatch.setattr("dschat.engine.engine.PREFILL_CHUNK", 64)
    eng = Engine.from_pretrained(chat_models["v3"], speculative="none")
    ids = prompt(eng, 300)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    want = list(eng.generate(ids, params, reuse_cache=False))  # a prefill from scratch

    fresh = Engine.from_pretrained(chat_models["v3"], speculative="none")
    gen = fresh.generate(ids, params, stop=StopAfter(3))  # three chunks of 64, then stopped
    assert list(gen) == [] and not gen.done
    assert gen.stats.prefilled_tokens == 3 * 64 and gen.stats.generated_tokens == 0
    again = fresh.generate(ids, params)
    assert list(again) == want  # the rows kept are right
    assert again.stats.cached_tokens == 3 * 64  # and reused

    # a stop already set: nothing runs; set during decoding: it ends before the next forward pass
    assert list(fresh.generate(prompt(fresh, 50), params, stop=StopAfter(0))) == []
    stop = threading.Event()
    out = []
    for t in fresh.generate(prompt(fresh, 40), params, stop=stop):
        out.append(t)
        stop.set()
    assert len(out) == 1
    follow = prompt(fresh, 40) + out  # what that stop left cached is right too
    assert list(fresh.generate(follow, params)) == list(fresh.generate(follow, params, reuse_cache=False))


def slowed(monkeypatch, seconds: float) -> dict:
    """Each prefill chunk (64 tokens) of every engine in this process takes `seconds` longer; {"on": ...}."""
    monkeypatch.setattr("dschat.engine.engine.PREFILL_CHUNK", 64)
    slow = {"on": True}
    forward = Engine._forward

    def slow_forward(self, seq, new):
        if slow["on"] and len(new) > 1:  # a prefill chunk
            time.sleep(seconds)
        return forward(self, seq, new)

    monkeypatch.setattr(Engine, "_forward", slow_forward)
    return slow


def test_a_stop_reaches_the_server(chat_models, monkeypatch):
    """With `dschat serve` (--server): the client's stop hangs up at once, and the server's prefill stops with
    it (a next request is not kept waiting behind it)."""
    from dschat.serve.client import RemoteEngine, Server

    eng = Engine.from_pretrained(chat_models["v3"], speculative="none")
    ids = prompt(eng, 1500)
    slowed(monkeypatch, 0.25)  # ~6 s of prefill
    with ServerThread(eng) as s:
        server = Server(f"http://127.0.0.1:{s.port}")
        remote = RemoteEngine(server, server.info())
        stop = threading.Event()
        threading.Timer(0.8, stop.set).start()
        t0 = time.monotonic()
        gen = remote.generate(ids, SamplingParams(max_tokens=4), stop=stop)
        assert list(gen) == [] and time.monotonic() - t0 < 2.0
        t1 = time.monotonic()
        assert len(list(remote.generate(ids[:8], SamplingParams(max_tokens=2, ignore_eos=True)))) == 2
        assert time.monotonic() - t1 < 2.0  # the server's prefill had stopped


async def test_esc_stops_a_long_prefill_at_once(chat_models, monkeypatch):
    """A prompt of ~1500 tokens whose prefill chunks each take 0.25 s (~6 s in all): the status line says
    what is prefilled; Esc ends it within a chunk; the next turn's tokens are exact and reuse what was done."""
    slow = slowed(monkeypatch, 0.25)
    app = make_app(chat_models["v3"], "-n", "4")
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        status = app.query_one("#status")
        prompt_area = app.query_one("#prompt")
        prompt_area.text = " ".join(f"word{i}" for i in range(700))
        prompt_area.focus()
        await pilot.press("enter")
        await until(pilot, lambda: "prefilling 1" in str(status.render()), timeout=10)
        text = str(status.render())
        assert "Esc stops" in text and "ready" not in text
        total = int(text.split("prefilling ")[1].split()[0])
        assert total > 1000
        await until(pilot, lambda: "done)" in str(status.render()), timeout=10)  # some chunks, not all
        t0 = time.monotonic()
        await pilot.press("escape")
        await until(pilot, lambda: app.turns_done == 1, timeout=10)
        stopped_in = time.monotonic() - t0
        assert stopped_in < 1.5, stopped_in  # the prefill had ~5 s to go
        assert "ready" in str(status.render())
        stats = app.session.last_stats
        assert stats.generated_tokens == 0 and 0 < stats.prefilled_tokens < total

        slow["on"] = False
        prompt_area.text = "and now?"
        await pilot.press("enter")
        await until(pilot, lambda: app.turns_done == 2)
        conv = Store().latest()
        user, reply = conv.messages[-2], conv.messages[-1]
        assert conv.messages[1].interrupted and conv.messages[1].token_ids == []
        assert app.session.last_stats.cached_tokens >= stats.prefilled_tokens  # what the stopped prefill did
        want = list(app.engine.generate(user.token_ids, SamplingParams(max_tokens=len(reply.token_ids)),
                                        reuse_cache=False))
        assert reply.token_ids == want[:len(reply.token_ids)] and reply.token_ids

