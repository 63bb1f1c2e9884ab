"""A system prompt set mid-chat (`/system`) was exported as if it had applied from the start: the export's
"system" was the last one and its messages said nothing of the change, so the earlier answers read as given
under it, and import and replay ran every turn under it. Each message now records the system prompt it was
written under (schema m003); export (JSON and Markdown, CLI and TUI) places the change where it happened,
and import and replay keep it."""

from __future__ import annotations

import json

import pexpect
from helpers import PROMPT, answer, ask, call, make_app, ready, send, spawn

from dschat.history.store import Store


def chat_with_a_change(model, *changes: str) -> str:
    """Line mode: a turn, then for each of `changes` `/system TEXT` (or `/system` alone: cleared) and a turn.
    The conversation's id."""
    p = spawn("--plain", "--model", str(model), "-t", "0", "-n", "3")
    p.expect_exact(PROMPT)
    ask(p, "first question")
    for n, text in enumerate(changes, start=2):
        assert "(system prompt" in ask(p, f"/system {text}".rstrip())
        ask(p, f"question {n}")
    p.sendline("/exit")
    p.expect(pexpect.EOF)
    return Store().latest().id


def roles(data: dict) -> list[tuple[str, str]]:
    return [(m["role"], m["content"] if m["role"] != "assistant" else "") for m in data["messages"]]


def test_export_import_and_replay_place_a_mid_chat_system_prompt(chat_models, tmp_path):
    cid = chat_with_a_change(chat_models["v3"], "Be brief.")
    r = call(["export", cid])
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["system"] == "Be brief."  # what the next turn uses
    assert roles(data) == [("system", ""), ("user", "first question"), ("assistant", ""),
                           ("system", "Be brief."), ("user", "question 2"), ("assistant", "")]
    md = call(["export", cid, "--format", "md"]).stdout.decode()
    first, second = md.index("## User\n\nfirst question"), md.index("## User\n\nquestion 2")
    change = md.index("## System prompt changed")
    assert "## System\n" not in md[:first]  # it began without one
    assert first < change < second and md.index("Be brief.", change) < second

    # import keeps it: the imported conversation exports the same
    (tmp_path / "chat.json").write_bytes(r.stdout)
    r2 = call(["import", str(tmp_path / "chat.json")])
    assert r2.returncode == 0, r2.stderr
    again = json.loads(call(["export", Store().latest().id]).stdout)
    assert roles(again) == roles(data) and again["system"] == "Be brief."

    # replay renders each turn under the prompt it ran under: without the saved ids (rendered from the text),
    # greedy answers equal the saved ones only if turn 1 runs without the system prompt and turn 2 with it
    for m in data["messages"]:
        m.pop("token_ids", None)
    (tmp_path / "text.json").write_text(json.dumps(data))
    r3 = call(["replay", str(tmp_path / "text.json"), "--compare", "--model", str(chat_models["v3"]), "-n", "3"])
    out = r3.stdout.decode()
    assert r3.returncode == 0, out + r3.stderr.decode()
    assert "2 of 2 turns unchanged" in out and out.index("system prompt changed") < out.index("user (2)")


def test_a_prompt_never_changed_exports_as_before(chat_models):
    """No change: the export is as it was (no system messages), "system" applies from the start."""
    p = spawn("--plain", "--model", str(chat_models["v3"]), "-t", "0", "-n", "2", "--system", "Be kind.")
    p.expect_exact(PROMPT)
    ask(p, "only question")
    p.sendline("/exit")
    p.expect(pexpect.EOF)
    data = json.loads(call(["export", Store().latest().id]).stdout)
    assert data["system"] == "Be kind." and [m["role"] for m in data["messages"]] == ["user", "assistant"]


async def test_tui_export_places_the_change(chat_models, tmp_path, monkeypatch):
    """The TUI's /system (the palette's "System prompt") mid-chat, then removed after the last turn: its
    Markdown export shows the start, the change and the removal where they happened."""
    monkeypatch.chdir(tmp_path)
    app = make_app(chat_models["v3"], "-n", "2", "--system", "Start here.")
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "alpha question")
        app.chat_screen.action_set_system()
        await answer(pilot, app, "Now brief.")
        await send(pilot, app, "beta question")
        app.chat_screen.action_set_system()
        await answer(pilot, app, "")
        app.chat_screen.action_export()
        await answer(pilot, app, str(tmp_path / "out.md"))
    md = (tmp_path / "out.md").read_text()
    at = [md.index(s) for s in ("## System\n", "Start here.", "## User\n\nalpha question", "## System prompt changed",
                                "Now brief.", "## User\n\nbeta question", "(removed: no system prompt from here on)")]
    assert at == sorted(at), md
