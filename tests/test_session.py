"""ChatSession and its reply driver (reply.py) on a FakeEngine: no weights, each test in milliseconds."""

from __future__ import annotations

import json

import pytest
from helpers import call

from dschat.dev.fake_engine import FakeEngine
from dschat.engine import ContextLengthError, ModelError
from dschat.conversation.session import ChatSession, Sampling, SessionSettings
from dschat.signals import Stopped
from dschat.history.store import Store


@pytest.fixture
def engine():
    return FakeEngine()


def reply_text(session, turn, **kw):
    pieces = []
    reply = session.reply(turn).run(pieces.append)
    return reply, "".join(pieces)


def test_a_turn_streams_the_reply_and_saves_it_with_its_ids(engine):
    session = ChatSession(engine, SessionSettings())
    engine.enqueue("Hello there")
    turn = session.turn("hi")
    reply, text = reply_text(session, turn)
    assert text == "Hello there" and reply.kept and reply.error is None and reply.notice is None
    assert engine.prompts == [turn.prompt_ids] and turn.output_ids[-1] == engine.tokenizer.eos_token_id
    assert reply.stats.generated_tokens == len(turn.output_ids) and reply.stats.stop_reason == "stop"
    assert session.last_stats is reply.stats and turn.stats["generated_tokens"] == len(turn.output_ids)
    conv = Store().latest()
    assert [(m.role, m.content) for m in conv.messages] == [("user", "hi"), ("assistant", "Hello there")]
    assert conv.messages[0].token_ids == turn.prompt_ids and conv.messages[1].token_ids == turn.output_ids
    # the next turn extends the exact ids of this one
    engine.enqueue("Again")
    nxt = session.turn("more")
    history = turn.prompt_ids + turn.output_ids
    assert nxt.continued and nxt.prompt_ids[: len(history)] == history


def test_sampling_is_flags_then_config_then_the_model_resolved_once(engine):
    engine.generation_config = {"temperature": 0.3, "top_p": 0.9, "top_k": 7, "max_new_tokens": 50}
    settings = SessionSettings(sampling=Sampling(temperature=0.0).over(Sampling(temperature=0.8, top_p=0.5)))
    session = ChatSession(engine, settings)
    reply_text(session, session.turn("hi"))
    p = engine.params[-1]
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens) == (0.0, 0.5, 7, 50)
    engine.generation_config = {"top_k": "bad"}  # read once: the first reply's resolution stays
    reply_text(session, session.turn("again"))
    assert engine.params[-1].top_k == 7
    # nothing chosen: built-in defaults, and max_tokens what the window leaves (at most 2048)
    small = FakeEngine(context_length=100)
    s2 = ChatSession(small, SessionSettings())
    turn = s2.turn("hi")
    reply_text(s2, turn)
    p = small.params[-1]
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens) == (0.6, 1.0, 0, 100 - len(turn.prompt_ids))


def test_do_sample_false_is_greedy_and_a_bad_model_default_is_the_reply_error(engine):
    engine.generation_config = {"do_sample": False, "temperature": 0.7}
    session = ChatSession(engine, SessionSettings(no_save=True))
    reply_text(session, session.turn("hi"))
    assert engine.params[-1].temperature == 0.0
    bad = FakeEngine(generation_config={"top_p": 5})
    session = ChatSession(bad, SessionSettings())
    reply, _ = reply_text(session, session.turn("hi"))
    assert isinstance(reply.error, ModelError) and "generation_config.json: 'top_p'" in str(reply.error)
    assert not reply.kept and Store().list() == [] and session.chat.messages == []


def test_a_prompt_that_fills_the_window_is_taken_back(engine):
    session = ChatSession(FakeEngine(context_length=20), SessionSettings())
    with pytest.raises(ValueError, match="context window"):  # it does not fit: found before it is tokenized whole
        session.turn("word\n" * 400)
    small = FakeEngine(context_length=12)
    session = ChatSession(small, SessionSettings())
    turn = session.turn("word " * 8)
    reply, text = reply_text(session, turn)
    assert isinstance(reply.error, ContextLengthError) and "fills the context window" in str(reply.error)
    assert not reply.kept and text == "" and Store().list() == [] and small.prompts == []


def test_a_reply_that_fills_the_window_says_it_was_cut(engine):
    small = FakeEngine(context_length=40)
    session = ChatSession(small, SessionSettings())
    turn = session.turn("hi")
    small.enqueue("word " * 60, end=False)
    reply, _ = reply_text(session, turn)
    assert reply.kept and len(turn.prompt_ids) + len(turn.output_ids) == 40
    assert "context window (40 tokens) is full" in reply.notice
    small.context_length = 4096
    small.enqueue("short")
    reply, _ = reply_text(session, session.turn("next"))
    assert reply.notice is None


def test_stop_and_interrupt_keep_the_reply_marked(engine):
    session = ChatSession(engine, SessionSettings())
    engine.enqueue("one two three four five six")
    turn = session.turn("count")
    reply = session.reply(turn)
    reply.run(lambda piece: reply.stop())
    assert reply.kept and turn.interrupted and reply.interrupt is None and reply.error is None
    assert 0 < len(turn.output_ids) < 7
    assert Store().latest().messages[-1].interrupted

    engine.enqueue("one two three four five six")
    turn = session.turn("again")

    def signal(piece):
        raise Stopped(15)

    reply = session.reply(turn).run(signal)
    assert reply.kept and turn.interrupted and isinstance(reply.interrupt, Stopped)
    with pytest.raises(Stopped):
        reply.reraise()
    assert len(Store().latest().messages) == 4


def test_regenerate_saves_a_sibling_and_a_failed_one_restores_the_answer(engine):
    session = ChatSession(engine, SessionSettings())
    engine.enqueue("first")
    reply_text(session, session.turn("hi"))
    engine.enqueue("second")
    reply, text = reply_text(session, session.regenerate())
    assert text == "second" and session.chat.messages[-1]["content"] == "second"
    store = Store()
    conv = store.latest()
    assert [m.content for m in store.siblings(conv.messages[-1].id)] == ["first", "second"]
    engine.context_length = 3  # the regeneration cannot start: the old answer stays
    reply, _ = reply_text(session, session.regenerate())
    assert not reply.kept and session.chat.messages[-1]["content"] == "second"


def test_no_save_and_continuing_a_saved_conversation(engine):
    session = ChatSession(engine, SessionSettings(no_save=True))
    reply_text(session, session.turn("hi"))
    assert Store().list() == []
    session = ChatSession(engine, SessionSettings(system="be brief", model="fake-model",
                                                  saved_params={"temperature": 0.0}))
    engine.enqueue("saved")
    first = session.turn("hi")
    reply_text(session, first)
    conv = Store().latest()
    assert (conv.model, conv.system, conv.params) == ("fake-model", "be brief", {"temperature": 0.0})
    again = ChatSession(engine, SessionSettings(continue_latest=True))
    assert again.conversation_id == conv.id and again.chat.messages[-1]["content"] == "saved"
    assert again.chat.ids == first.prompt_ids + first.output_ids  # the exact history: no re-tokenizing
    engine.enqueue("more")
    turn = again.turn("next")
    assert turn.continued
    reply_text(again, turn)
    assert len(Store().latest().messages) == 4  # two exchanges


# -- the front ends on the fake engine -------------------------------------------------------------------------------
@pytest.fixture
def fake(monkeypatch):
    """Every front end's load_engine gives this FakeEngine."""
    engine = FakeEngine()
    for module in ("dschat.runtime", "dschat.tui.app"):  # pipe and line mode load through dschat.serve.client
        monkeypatch.setattr(f"{module}.load_engine", lambda opts, progress=None: engine)
    return engine


def test_pipe_mode_streams_the_enqueued_answer_with_its_stats(fake):
    fake.enqueue("Forty-two.\nExactly.")
    r = call(["--model", "demo", "--stats", "what is it?"])
    assert r.returncode == 0 and r.stdout == b"Forty-two.\nExactly.\n"
    stats = json.loads(r.stderr.decode().strip().splitlines()[-1])
    assert stats["generated_tokens"] == len(fake.tokenizer.encode_plain("Forty-two.\nExactly.")) + 1
    assert stats["stop_reason"] == "stop" and stats["prompt_tokens"] == len(fake.prompts[0])
    conv = Store().latest()
    assert [m.content for m in conv.messages] == ["what is it?", "Forty-two.\nExactly."]
    fake.context_length = len(fake.prompts[0]) + 6
    fake.enqueue("word " * 20, end=False)
    r = call(["--model", "demo", "--no-save", "what is it?"])
    assert r.returncode == 0 and b"the context window (" in r.stderr and len(r.stdout) > 0


def test_line_mode_reply_says_stopped_cut_and_error(fake, capsys):
    from dschat.cli.linemode import reply as line_reply
    from dschat.terminal.highlight import terminal_formatter

    session = ChatSession(fake, SessionSettings(no_save=True))
    fake.enqueue("one two three")
    turn = session.turn("count")
    line_reply(session, turn, terminal_formatter(None), stats=True)
    out, err = capsys.readouterr()
    assert out == "one two three\n" and json.loads(err)["generated_tokens"] == len(turn.output_ids)
    fake.context_length = len(session.chat.ids) + 3  # the next prompt does not leave room for a reply
    line_reply(session, session.turn("more"), terminal_formatter(None))
    out, _ = capsys.readouterr()
    assert "(error: the prompt (" in out and "fills the context window" in out
    assert len(session.chat.messages) == 2  # taken back


async def test_the_tui_on_the_fake_engine(fake):
    from helpers import make_app, ready, replies, send

    fake.enqueue("Hello from the fake.")
    app = make_app("demo")
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "hi")
        assert replies(app)[-1].text.strip() == "Hello from the fake."
        status = str(app.query_one("#status").render())
        assert status.startswith("ready") and f"context {len(app.chat.ids)}/4096" in status and "reused 0" in status
        assert app.last_stats.generated_tokens == len(fake.tokenizer.encode_plain("Hello from the fake.")) + 1
        assert [m.content for m in Store().latest().messages] == ["hi", "Hello from the fake."]


def test_one_store_per_session_and_counts_in_sql(engine, monkeypatch):
    opened, real = [], Store._open
    monkeypatch.setattr(Store, "_open", lambda self: opened.append(1) or real(self))
    session = ChatSession(engine, SessionSettings())
    for text in ("one", "two", "three"):
        engine.enqueue(f"answer {text}")
        reply_text(session, session.turn(text))
    engine.enqueue("again")
    reply_text(session, session.regenerate())  # a sibling: the branch stays 6 messages long
    assert len(opened) == 1  # not one (each with its integrity check) for every read and write
    again = ChatSession(engine, SessionSettings(continue_latest=True))
    engine.enqueue("four")
    reply_text(again, again.turn("four"))
    assert len(opened) == 2
    session.close(), again.close()
    store = Store()
    conv = store.latest()
    assert store.list()[0]["messages"] == len(store.branch(conv.id, conv.head)) == 8
