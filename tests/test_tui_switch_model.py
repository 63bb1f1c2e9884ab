"""The TUI's "switch model" keeps the working model until the new one has loaded (Pilot)."""

from __future__ import annotations

from test_tui import make_app, ready, replies, send, until

from dschat.tui import AskScreen


async def test_switching_to_a_broken_checkpoint_keeps_the_old_model(chat_models, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "deepseek_v3"}')
    app = make_app(chat_models["v3"], "-n", "4")
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        working = app.engine
        app.action_switch_model()
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
