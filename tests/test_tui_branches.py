"""Branches in the TUI (issue 23 section 2): any earlier prompt edited and resent starts a new branch there (a
sibling in the history; the later turns stay on the old one); a message with versions shows "2/3" and Alt+Left /
Alt+Right move between them, showing that branch's later turns; the next turn's prompt is that branch's own and
its greedy tokens are what a fresh run of that prompt gives; export says which branch it wrote, and imports."""

from __future__ import annotations

import json
from dataclasses import replace

from helpers import answer as answer_ask
from helpers import call, make_app, ready, replies, send, until

from dschat.conversation.template import chat_prompt
from dschat.engine import SamplingParams
from dschat.history.store import Store
from dschat.tui.message_view import MessageView
from dschat.tui.prompt_area import PromptArea


def shown(app) -> list[tuple[str, str]]:
    """(text, title) of each message in the view."""
    return [(v.text.strip(), v.title()) for v in app.query(MessageView) if not getattr(v, "_pruning", False)]


def fresh(engine, prompt_ids, n) -> list[int]:
    """The greedy tokens a separate engine (its own cache) gives for these prompt ids."""
    return list(engine.generate(prompt_ids, SamplingParams(max_tokens=n)))


async def test_edit_an_earlier_prompt_branches_and_versions_switch(chat_models, chat_engines, tmp_path):
    app = make_app(chat_models["v3"], "-n", "3")
    tok = chat_engines["v3"].tokenizer
    async with app.run_test(size=(100, 40)) as pilot:
        await ready(pilot, app)
        for text in ("one", "two", "three"):
            await send(pilot, app, text)
        r1, r2, r3 = [v.text.strip() for v in replies(app)]
        old_head = Store().latest().head
        for _ in range(4):  # from the last message up to "two"
            await pilot.press("alt+up")
        assert app.chat_screen.selected == 2 and "selected" in app.query(MessageView)[2].classes
        await pilot.press("alt+e")
        await pilot.pause(0.1)
        prompt = app.query_one(PromptArea)
        assert prompt.text == "two" and [t for t, _ in shown(app)] == ["one", r1]
        await send(pilot, app, "TWO")
        conv = Store().latest()
        assert [m.content for m in conv.messages][:3] == ["one", r1, "TWO"] and len(conv.messages) == 4
        assert sorted(m.content for m in Store().siblings(conv.messages[2].id)) == ["TWO", "two"]
        assert [m.content for m in Store().branch(conv.id, old_head)] == ["one", r1, "two", r2, "three", r3]
        assert shown(app)[2] == ("TWO", "You  ‹2/2›")
        # the edited turn's prompt is the branch's own, and its greedy answer is a fresh run's
        user, answer = conv.messages[2], conv.messages[3]
        assert tok.decode(user.token_ids) == chat_prompt(tok, [{"role": "user", "content": "one"},
                                                               {"role": "assistant", "content": r1},
                                                               {"role": "user", "content": "TWO"}])[0]
        assert answer.token_ids == fresh(chat_engines["v3"], user.token_ids, 3)

        await pilot.press("alt+left")  # none selected: the last message with versions, "TWO" -> "two"
        await until(pilot, lambda: len(shown(app)) == 6)
        assert shown(app) == [("one", "You"), (r1, "Assistant"), ("two", "You  ‹1/2›"), (r2, "Assistant"),
                              ("three", "You"), (r3, "Assistant")]
        assert Store().latest().head == old_head
        await send(pilot, app, "four")  # follows the old branch: its prompt is that branch's own
        conv = Store().latest()
        assert [m.content for m in conv.messages][:6] == ["one", r1, "two", r2, "three", r3]
        user, answer = conv.messages[6], conv.messages[7]
        text = tok.decode(user.token_ids)
        assert "three" in text and "TWO" not in text
        assert answer.token_ids == fresh(chat_engines["v3"], user.token_ids, 3)
        assert answer.timings["cached_tokens"] > 0  # what it shares with the branch before is reused

        await pilot.press("alt+up", "alt+up", "alt+up", "alt+up", "alt+up", "alt+up")  # "two" again
        assert app.chat_screen.selected == 2
        await pilot.press("alt+right")  # back to "TWO", its own later turn
        await until(pilot, lambda: len(shown(app)) == 4)
        assert [t for t, _ in shown(app)][2] == "TWO" and app.chat_screen.selected == 2
        assert [m["content"] for m in app.chat.messages][2] == "TWO"

        # regenerate: the answer shows 2/2, and the older answer can be reached
        before = replies(app)[-1].text.strip()
        app.session.sampling = replace(app.session.sampling, temperature=1.0, seed=5)
        done = app.turns_done
        await pilot.press("ctrl+r")
        await until(pilot, lambda: app.turns_done > done)
        await pilot.pause(0.1)
        assert shown(app)[-1][1] == "Assistant  ‹2/2›"
        app.chat_screen.select(None)
        await pilot.press("alt+left")
        await until(pilot, lambda: shown(app)[-1][1] == "Assistant  ‹1/2›")
        assert shown(app)[-1][0] == before
        conv_id = conv.id
        app.chat_screen.action_export()  # the TUI's export says the branch too
        await answer_ask(pilot, app, str(tmp_path / "branch.md"))
        assert any("(branch: leaf `" in n.message and "version 1/2 of message 4" in n.message
                   for n in app._notifications)
        assert "- branch: leaf `" in (tmp_path / "branch.md").read_text()

    # export says which branch it wrote; import takes it back
    r = call(["export", conv_id])
    data = json.loads(r.stdout)
    assert data["branch"]["leaf"] == Store().get(conv_id).head
    assert data["branch"]["versions"] == [{"message": 3, "version": 2, "of": 2}, {"message": 4, "version": 1, "of": 2}]
    md = call(["export", conv_id, "--format", "md"]).stdout.decode()
    assert f"- branch: leaf `{data['branch']['leaf']}`, version 2/2 of message 3; version 1/2 of message 4" in md
    assert "## User (version 2/2)" in md and "## Assistant (version 1/2)" in md
    (tmp_path / "c.json").write_text(r.stdout.decode())
    assert call(["import", str(tmp_path / "c.json")]).returncode == 0
    imported = Store().get(next(c["id"] for c in Store().list() if c["id"] != conv_id))
    assert [m.content for m in imported.messages] == [m["content"] for m in data["messages"]]
