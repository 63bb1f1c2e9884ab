"""A reasoning model's thinking shown apart from its answer (issue 23 section 1): R1's real chat template,
which opens <think> itself and drops earlier reasoning from the next prompt."""

from __future__ import annotations

import io
import json
import os
import shutil

import pytest
import torch
from helpers import call, greedy

from dschat.cli.linemode import Thinking
from dschat.conversation.chat import Chat
from dschat.conversation.session import ChatSession, Sampling, SessionSettings
from dschat.dev import tiny_checkpoints as tc
from dschat.dev.fake_engine import FakeEngine
from dschat.history.store import Store

REASONING, ANSWER = "Let me see: two and two.", "The answer is 4."


@pytest.fixture(scope="module")
def r1_tokenizer_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("r1_tok")
    tc.install_tokenizer(d, "deepseek-r1")
    return d


@pytest.fixture(scope="module")
def r1_model(chat_models, tmp_path_factory):
    """The tiny V3 checkpoint with R1's real tokenizer and chat template (the same vocabulary)."""
    d = tmp_path_factory.mktemp("r1") / "r1"
    shutil.copytree(chat_models["v3"], d, copy_function=os.symlink)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (d / name).unlink()
    tc.install_tokenizer(d, "deepseek-r1")
    return d


def run_turn(session, text, thoughts=None):
    shown = []
    turn = session.turn(text)
    session.reply(turn).run(shown.append, None, thoughts.append if thoughts is not None else None)
    return turn, "".join(shown)


def test_the_answer_is_shown_and_the_thinking_apart(r1_tokenizer_dir):
    engine = FakeEngine(r1_tokenizer_dir)
    session = ChatSession(engine, SessionSettings())
    tok = engine.tokenizer
    end = tok.token_id("</think>")
    engine.enqueue(tok.encode_plain(f"{REASONING}\n") + [end] + tok.encode_plain(f"\n\n{ANSWER}"))
    thoughts = []
    turn, shown = run_turn(session, "2+2?", thoughts)
    assert turn.prompt_text.endswith("<think>\n")  # R1's template opens the block
    assert shown == ANSWER and "".join(thoughts) == f"{REASONING}\n" and turn.reasoning == f"{REASONING}\n"
    end = turn.output_ids.index(end) + 1
    assert turn.stats["thinking_tokens"] == end and turn.stats["answer_tokens"] == len(turn.output_ids) - end
    # the conversation keeps the reply as generated; the template decides what the next turn sees
    assert session.chat.messages[-1]["content"] == turn.reply and REASONING in turn.reply
    engine.enqueue("ok</think>fine")
    second, _ = run_turn(session, "and 3+3?")
    assert REASONING not in second.prompt_text and ANSWER in second.prompt_text  # R1 drops old reasoning
    assert second.prompt_ids == Chat(tok, messages=session.chat.messages[:-2]).turn("and 3+3?").prompt_ids


def test_without_a_thinking_consumer_the_reasoning_is_not_shown(r1_tokenizer_dir):
    engine = FakeEngine(r1_tokenizer_dir)
    session = ChatSession(engine, SessionSettings(no_save=True))
    engine.enqueue(f"{REASONING}</think>{ANSWER}")
    turn, shown = run_turn(session, "q")
    assert shown == ANSWER and turn.reasoning == REASONING and turn.answer == ANSWER


def test_a_model_that_does_not_think_has_no_thinking_counts():
    engine = FakeEngine()
    session = ChatSession(engine, SessionSettings(no_save=True))
    engine.enqueue("<think>is text here</think>")
    turn, shown = run_turn(session, "q")
    assert shown == "<think>is text here</think>" and "thinking_tokens" not in turn.stats


def test_pipe_mode_prints_the_answer_and_the_thinking_only_on_request(r1_model):
    from dschat.engine import Engine

    engine = Engine.from_pretrained(r1_model, dtype=torch.float32, speculative="none")
    ids = Chat(engine.tokenizer).turn("why?").prompt_ids
    out, want = greedy(engine, ids, 6)
    assert "</think>" not in want  # a random model: all of it is thinking
    args = ["--model", str(r1_model), "-t", "0", "-n", "6", "--no-save", "--stats", "why?"]
    quiet = call(args, stdin=None)
    assert quiet.returncode == 0 and quiet.stdout.decode().strip() == ""
    stats = json.loads(quiet.stderr.decode().strip().splitlines()[-1])
    assert stats["thinking_tokens"] == len(out) and stats["answer_tokens"] == 0
    shown = call(args + ["--show-thinking"], stdin=None)
    assert shown.returncode == 0 and shown.stdout.decode().strip() == ""
    assert shown.stderr.decode().startswith(want.strip())


def test_the_history_keeps_the_reply_whole(r1_tokenizer_dir):
    engine = FakeEngine(r1_tokenizer_dir)
    session = ChatSession(engine, SessionSettings())
    engine.enqueue(f"{REASONING}</think>{ANSWER}")
    turn, _ = run_turn(session, "q")
    saved = Store().latest().messages[-1]
    assert saved.content == turn.reply and saved.token_ids == turn.output_ids


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_line_mode_folds_the_thinking_to_one_line(monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setattr(shutil, "get_terminal_size", lambda *a: os.terminal_size((20, 24)))
    out = Tty()
    t = Thinking(out)
    t.write("a" * 25 + "\nsecond line")  # "thinking: " + 25 characters: two rows at 20 columns, then one
    t.fold()
    t.fold()  # once
    text = out.getvalue()
    assert text.count("(thought for") == 1 and "\r\x1b[2A\x1b[J(thought for" in text


def test_line_mode_thinking_off_screen_is_followed_by_its_summary(monkeypatch):
    monkeypatch.setattr(shutil, "get_terminal_size", lambda *a: os.terminal_size((20, 3)))
    out = Tty()
    t = Thinking(out)
    t.write("x\n" * 10)
    t.fold()
    assert "\x1b[J" not in out.getvalue() and out.getvalue().rstrip().endswith("/thinking shows it)\x1b[0m") \
        or out.getvalue().rstrip().endswith("/thinking shows it)")


THOUGHT = "Let me see</think>\n\nThe answer."


@pytest.fixture(scope="module")
def r1_parrot(chat_models, tmp_path_factory):
    """A tiny model with R1's tokenizer and template that thinks, then answers (greedily, to any message)."""
    from helpers import parrot

    return parrot(chat_models["v3"], tmp_path_factory.mktemp("r1p") / "r1", THOUGHT, tokenizer="deepseek-r1")


def test_a_real_engine_thinks_then_answers(r1_parrot):
    args = ["--model", str(r1_parrot), "-t", "0", "-n", "20", "--no-save", "--stats", "--show-thinking", "hi"]
    r = call(args, stdin=None)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode() == "The answer.\n"
    err = r.stderr.decode().splitlines()
    assert err[0] == "Let me see"
    stats = json.loads(err[-1])
    assert stats["thinking_tokens"] >= 2 and stats["answer_tokens"] >= 2
    assert stats["thinking_tokens"] + stats["answer_tokens"] == stats["generated_tokens"]


def test_the_next_turn_drops_the_thinking_and_reuses_the_cache(r1_parrot):
    from dschat.engine import Engine

    engine = Engine.from_pretrained(r1_parrot, dtype=torch.float32, speculative="none")
    session = ChatSession(engine, SessionSettings(no_save=True, sampling=Sampling(temperature=0)))
    first, shown = run_turn(session, "hi")
    assert shown == "The answer." and first.reasoning == "Let me see"
    second, _ = run_turn(session, "again")
    assert "Let me see" not in second.prompt_text and "The answer." in second.prompt_text
    history = first.prompt_ids + first.output_ids
    common = next((i for i, (a, b) in enumerate(zip(history, second.prompt_ids)) if a != b),
                  min(len(history), len(second.prompt_ids)))
    assert common < len(history)  # the template changed the history: the reasoning is gone
    assert second.stats["cached_tokens"] == common  # only the stripped answer and the new message prefilled


async def test_the_tui_folds_the_thinking_away_when_the_answer_starts(r1_parrot):
    from helpers import make_app, ready, replies, send

    app = make_app(r1_parrot, "-n", "20", "--no-save")
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "hi")
        view = replies(app)[-1]
        assert view.text.strip() == "The answer." and view.reasoning == "Let me see"
        assert view.thinking is not None and view.thinking.collapsed
        assert view.thinking.title.startswith("Thinking (") and " tokens, " in view.thinking.title


def test_the_history_keeps_the_thinking_in_its_own_field_and_exports_it_marked(r1_tokenizer_dir, tmp_path):
    engine = FakeEngine(r1_tokenizer_dir)
    session = ChatSession(engine, SessionSettings())
    engine.enqueue(f"{REASONING}</think>{ANSWER}")
    turn, _ = run_turn(session, "q")
    store = Store()
    conv = store.latest()
    saved = conv.messages[-1]
    assert saved.reasoning == REASONING and saved.content == turn.reply  # the reply whole, the thinking apart
    data = store.export_json(conv.id)
    assert data["messages"][-1]["reasoning"] == REASONING and "reasoning" not in data["messages"][0]
    md = store.export_text(conv.id, "md")
    assert f"> **Thinking**\n>\n> {REASONING}\n\n{ANSWER}\n" in md
    copy = store.get(store.import_json(data))
    assert copy.messages[-1].reasoning == REASONING
