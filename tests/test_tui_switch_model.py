"""The TUI (Pilot): "switch model" keeps the working model until the new one has loaded; sidebar titles are
shown as plain text; an export that cannot be written is a notice."""

from __future__ import annotations

from helpers import answer, make_app, ready, replies, send, until
from textual.widgets import Label

from dschat.history.store import Store
from dschat.tui.ask_screen import AskScreen


async def test_switching_to_a_broken_checkpoint_keeps_the_old_model(chat_models, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "deepseek_v3"}')
    app = make_app(chat_models["v3"], "-n", "4")
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        working = app.engine
        app.chat_screen.action_switch_model()
        await until(pilot, lambda: isinstance(app.screen, AskScreen) and bool(app.screen.query("#answer")))
        answer = app.screen.query_one("#answer")
        answer.value = str(broken)
        answer.focus()
        await pilot.press("enter")
        await until(pilot, lambda: any("failed to load" in n.message for n in app._notifications))
        await until(pilot, lambda: not app.loading)
        assert app.engine is working and app.opts.model == str(chat_models["v3"])
        assert any("still using" in n.message for n in app._notifications)
        await send(pilot, app, "still there?")
        assert replies(app)[-1].text.strip()


async def test_a_title_with_markup_or_escapes_is_shown_as_text(chat_models):
    with Store() as store:
        cid = store.create(model=str(chat_models["v3"]))
        store.add_message(cid, "user", "hello")
        store.rename(cid, "a [/] b [link=x]c\x1b]0;pwned\x07")
    app = make_app(chat_models["v3"])
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        label = app.query_one("#conversations").query_one(Label)
        assert str(label.render()) == "a [/] b [link=x]c"


async def test_an_export_that_cannot_be_written_is_a_notice(chat_models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app = make_app(chat_models["v3"], "-n", "2")
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "export me")
        (tmp_path / f"dschat-{app.conv_id}.md").mkdir()  # the target is taken by a directory
        app.chat_screen.action_export()
        await answer(pilot, app, str(tmp_path / f"dschat-{app.conv_id}.md"))
        assert any("not exported" in n.message for n in app._notifications)
        await send(pilot, app, "still here?")  # the app goes on
        assert len(replies(app)) == 2
