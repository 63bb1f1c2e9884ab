"""The Textual app driven by Textual's Pilot on tiny checkpoints, and snapshots of its main screens."""

from __future__ import annotations

import asyncio
import stat
import time
from dataclasses import replace

import pytest
from helpers import answer, call, make_app, ready, replies, send, until

from dschat.settings.config import Settings
from dschat.engine import SamplingParams
from dschat.history.store import Store
from dschat.tui.message_view import MessageView
from dschat.tui.prompt_area import PromptArea


async def test_send_streams_the_engines_answer_and_saves_it(chat_models, chat_engines):
    from dschat.conversation.template import chat_prompt

    app = make_app(chat_models["v3"], "-n", "12")
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "What is MLA?")
        eng = chat_engines["v3"]
        _, ids = chat_prompt(eng.tokenizer, [{"role": "user", "content": "What is MLA?"}])
        want = eng.tokenizer.decode(list(eng.generate(ids, SamplingParams(max_tokens=12))),
                                    skip_special_tokens=True).strip()
        assert replies(app)[-1].text.strip() == want
        status = str(app.query_one("#status").render())
        assert "ready" in status and "tok/forward" in status  # what the drafter did
        conv = Store().latest()
        assert [m.content for m in conv.messages] == ["What is MLA?", want]
        # the sidebar lists it
        assert [i.name for i in app.query("#conversations ListItem")] == [conv.id]


async def test_esc_stops_the_reply_and_keeps_it(chat_models):
    app = make_app(chat_models["v3"], "-n", "100000", "-t", "1.0", "--seed", "1")
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        prompt = app.query_one(PromptArea)
        prompt.text = "a long story"
        prompt.focus()
        await pilot.press("enter")
        await until(pilot, lambda: replies(app) and len(replies(app)[-1].text) > 20)
        status = str(app.query_one("#status").render())  # live figures while it streams
        used = int(status.split("context ")[1].split("/")[0])
        assert "streaming" in status and "tok/s" in status
        assert used > len(app.chat.turn("a long story").prompt_ids)
        t0 = time.monotonic()
        await pilot.press("escape")
        await until(pilot, lambda: app.turns_done == 1, timeout=10)
        assert time.monotonic() - t0 < 5
        view = replies(app)[-1]
        assert view.interrupted and "(stopped)" in view.title()
        saved = Store().latest().messages[-1]
        assert saved.interrupted and saved.content == view.text.strip()
        # still usable afterwards
        app.session.sampling = replace(app.session.sampling, max_tokens=4)
        await send(pilot, app, "short one")
        assert len(replies(app)) == 2


async def test_ctrl_q_while_streaming_saves_the_partial_reply_then_quits(chat_models):
    app = make_app(chat_models["v3"], "-n", "100000", "-t", "1.0", "--seed", "4")
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        app.query_one(PromptArea).text = "go on and on"
        await pilot.press("enter")
        await until(pilot, lambda: replies(app) and len(replies(app)[-1].text) > 20)
        shown = replies(app)[-1].text.strip()
        await pilot.press("ctrl+q")
        await until(pilot, lambda: not app.is_running, timeout=10)
    saved = Store().latest().messages
    assert [m.role for m in saved] == ["user", "assistant"] and saved[1].interrupted
    assert saved[1].content.startswith(shown)


async def test_a_worker_that_finishes_after_the_app_closed_is_harmless(chat_models):
    app = make_app(chat_models["v3"])
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        await pilot.press("ctrl+q")
    # what a loader or a stream still running in its thread does once the app has gone
    result = await asyncio.to_thread(app._ui, app.chat_screen.set_status, "loading: 100%")
    assert result is None


async def test_regenerate_copy_new_chat_and_recall(chat_models):
    app = make_app(chat_models["v3"], "-n", "8")
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "first prompt")
        first = replies(app)[-1].text
        app.opts.temperature, app.opts.seed = 1.0, 7  # a different answer this time
        done = app.turns_done
        await pilot.press("ctrl+r")
        await until(pilot, lambda: app.turns_done > done)
        assert len(replies(app)) == 1 and len(list(app.query(MessageView))) == 2
        second = replies(app)[-1].text
        conv = Store().latest()
        assert conv.messages[-1].content == second.strip()
        siblings = Store().siblings(conv.messages[-1].id)
        assert sorted(m.content for m in siblings) == sorted([first.strip(), second.strip()])
        await pilot.press("ctrl+o")
        assert app.clipboard == second.strip()
        await pilot.press("ctrl+n")
        await pilot.pause(0.1)
        assert not list(app.query(MessageView)) and app.chat.messages == []
        app.query_one(PromptArea).focus()
        await pilot.press("up")
        assert app.query_one(PromptArea).text == "first prompt"


async def test_copy_a_code_block(chat_models):
    app = make_app(chat_models["v3"])
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        view = MessageView("assistant", "Here:\n\n```python\nprint('hi')\n```\n\nand more text")
        await app.query_one("#conversation").mount(view)
        app.chat_screen.action_copy_code()
        assert app.clipboard == "print('hi')\n"


async def test_copy_a_chosen_code_block(chat_models):
    from textual.widgets import OptionList

    from dschat.tui.pick_screen import PickScreen

    app = make_app(chat_models["v3"])
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        view = app.query_one("#conversation")
        await view.mount(MessageView("assistant", "One:\n\n```python\nfirst = 1\n```\n\nTwo:\n\n```sh\nls -l\nwc\n```"))
        await view.mount(MessageView("user", "```not = 'a reply'\n```"))
        await view.mount(MessageView("assistant", "```\nthird()\n```"))
        app.query_one(PromptArea).focus()
        await pilot.press("ctrl+l")
        await until(pilot, lambda: isinstance(app.screen, PickScreen))
        options = app.screen.query_one(OptionList)
        shown = [str(options.get_option_at_index(i).prompt) for i in range(options.option_count)]
        assert shown == [" 1  python: first = 1  (1 line)", " 2  sh: ls -l  (2 lines)", " 3  code: third()  (1 line)"]
        assert options.highlighted == 2  # the last one
        await pilot.press("2")  # its number picks it
        await until(pilot, lambda: not isinstance(app.screen, PickScreen))
        assert app.clipboard == "ls -l\nwc\n"
        await pilot.press("ctrl+l")
        await until(pilot, lambda: isinstance(app.screen, PickScreen))
        await pilot.press("up", "up", "enter")
        await until(pilot, lambda: not isinstance(app.screen, PickScreen))
        assert app.clipboard == "first = 1\n"
        await pilot.press("ctrl+l")
        await until(pilot, lambda: isinstance(app.screen, PickScreen))
        await pilot.press("escape")  # none
        await until(pilot, lambda: not isinstance(app.screen, PickScreen))
        assert app.clipboard == "first = 1\n"


async def test_switching_theme_is_remembered(chat_models):
    app = make_app(chat_models["v3"])
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        assert app.theme == "deepseek-dark" and "deepseek-light" in app.available_themes
        app.theme = "deepseek-light"
        await pilot.pause(0.2)
    assert Settings.load().theme == "deepseek-light"
    config = Settings.path_default()  # private to the user, as the history is
    assert stat.S_IMODE(config.parent.stat().st_mode) == 0o700 and stat.S_IMODE(config.stat().st_mode) == 0o600
    app2 = make_app(chat_models["v3"])
    async with app2.run_test(size=(100, 30)) as pilot:
        await pilot.pause(0.1)
        assert app2.theme == "deepseek-light"


async def test_open_a_saved_conversation_from_the_sidebar(chat_models):
    r = call(["--model", str(chat_models["v3"]), "-t", "0", "-n", "6"], stdin="saved question")
    assert r.returncode == 0
    saved = Store().latest()
    app = make_app(chat_models["v3"], "-n", "6")
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        lv = app.query_one("#conversations")
        lv.focus()
        lv.index = 0
        await pilot.press("enter")
        await until(pilot, lambda: len(list(app.query(MessageView))) == 2)
        assert [v.text for v in app.query(MessageView)][0] == "saved question"
        await pilot.press(*"typed")  # the input has the focus again: nothing typed is dropped
        assert app.query_one(PromptArea).text == "typed"
        await send(pilot, app, "follow-up")
        # resumed from the saved token ids: the history came from the cache, not a new prefill
        conv = Store().get(saved.id)
        assert len(conv.messages) == 4
        assert conv.messages[3].timings["cached_tokens"] >= len(conv.messages[0].token_ids)


async def test_a_model_that_fails_to_load_is_a_notice(tmp_path, chat_models):
    app = make_app(tmp_path / "missing")
    async with app.run_test(size=(100, 30)) as pilot:
        await until(pilot, lambda: "no model loaded" in str(app.query_one("#status").render()))
        prompt = app.query_one(PromptArea)
        prompt.text = "keep me"
        prompt.focus()
        await pilot.press("enter")
        await pilot.pause(0.1)
        assert prompt.text == "keep me"  # nothing typed is lost
        assert any("failed to load" in n.message for n in app._notifications)
        # another model can still be loaded
        app.load_model(str(chat_models["v3"]))
        await ready(pilot, app)


# -- snapshots ---------------------------------------------------------------------------------------------------------
def snapshot_app(theme: str, with_history: bool):
    from dschat.runtime import DEMO_DIR

    if with_history:
        s = Store()
        cid = s.create(model=str(DEMO_DIR), title="What does os.path.join do?")
        s.add_message(cid, "user", "What does os.path.join do?")
        s.add_message(cid, "assistant", "`os.path.join(a, *p)` joins path components:\n\n"
                                        "```python\nos.path.join('a', 'b')  # 'a/b'\n```")
        s.close()
        extra = ["--conversation", cid]
    else:
        extra = []
    return make_app("demo", "--theme", theme, *extra)


@pytest.mark.parametrize("theme", ["deepseek-dark", "deepseek-light"])
@pytest.mark.parametrize("with_history", [False, True], ids=["empty", "conversation"])
def test_snapshots(snap_compare, theme, with_history):
    app = snapshot_app(theme, with_history)

    async def loaded(pilot):
        await ready(pilot, app)
        prompt = app.query_one(PromptArea)
        await until(pilot, lambda: prompt.has_focus)
        # A blinking cursor would make the picture racy. Textual's TextArea caches rendered lines under a key
        # that leaves cursor_blink out, so a line drawn in the blink's off phase would be reused without the
        # cursor: reloading the text clears that cache.
        prompt.cursor_blink = False
        prompt.load_text(prompt.text)
        if with_history:
            await until(pilot, lambda: len(list(app.query(MessageView))) == 2)
        await pilot.pause(0.3)
        await asyncio.sleep(0)

    assert snap_compare(app, terminal_size=(100, 28), run_before=loaded)


async def test_code_blocks_use_the_configured_pygments_style(chat_models):
    from pygments.styles import get_style_by_name
    from pygments.token import Keyword

    from dschat.tui.reply_markdown import ReplyFence

    app = make_app(chat_models["v3"])
    app.conf.code_style = "monokai"
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        await app.query_one("#conversation").mount(MessageView("assistant", "```python\nimport os\n```"))
        await pilot.pause(0.1)
        fence = app.query_one(ReplyFence)
        keyword = "#" + get_style_by_name("monokai").style_for_token(Keyword.Namespace)["color"]
        spans = [str(s.style) for s in fence._highlighted_code.spans]
        assert any(keyword in s for s in spans), spans
    # an unknown style is a notice, and code falls back to the theme's colours
    app = make_app(chat_models["v3"])
    app.conf.code_style = "no-such-style"
    async with app.run_test(size=(100, 30)) as pilot:
        await until(pilot, lambda: any("no-such-style" in n.message for n in app._notifications))
        await ready(pilot, app)
        assert app.code_theme is None


async def test_a_user_message_is_shown_as_typed(chat_models):
    from textual.widgets import Markdown

    typed = "# done\n\n    indented code\nline two  *not emphasis*"
    app = make_app(chat_models["v3"], "-n", "2")
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, typed)
        you, reply = list(app.query(MessageView))
        assert not you.query(Markdown) and reply.query(Markdown)  # the reply is Markdown, the prompt is not
        assert str(you.query_one(".typed").render()) == typed  # line breaks, indentation, # and * as typed


async def test_edit_and_resend_keeps_the_old_prompt_as_a_sibling(chat_models):
    app = make_app(chat_models["v3"], "-n", "6")
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "frist try")
        app.chat_screen.action_edit_last()
        await pilot.pause(0.1)
        prompt = app.query_one(PromptArea)
        assert prompt.text == "frist try" and not list(app.query(MessageView))
        prompt.text = "first try"
        done = app.turns_done
        await pilot.press("enter")
        await until(pilot, lambda: app.turns_done > done)
        assert [v.text for v in app.query(MessageView)][0] == "first try"
        assert app.chat.messages[0]["content"] == "first try" and len(app.chat.messages) == 2
        conv = Store().latest()
        assert [m.content for m in conv.messages][0] == "first try" and len(conv.messages) == 2
        assert sorted(m.content for m in Store().siblings(conv.messages[0].id)) == ["first try", "frist try"]


async def test_system_prompt_rename_search_export_delete(chat_models, tmp_path, monkeypatch):
    from textual.widgets import Input

    from dschat.conversation.template import chat_prompt
    from dschat.tui.ask_screen import AskScreen, ConfirmScreen

    monkeypatch.chdir(tmp_path)
    app = make_app(chat_models["v3"], "-n", "4")
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        app.chat_screen.action_set_system()
        await answer(pilot, app, "Be brief.")
        await send(pilot, app, "alpha question")
        _, want = chat_prompt(app.engine.tokenizer, [{"role": "system", "content": "Be brief."},
                                                     {"role": "user", "content": "alpha question"}])
        conv = Store().latest()
        assert conv.system == "Be brief." and conv.messages[0].token_ids == want
        app.chat_screen.action_rename()
        await answer(pilot, app, "Renamed one")
        assert Store().get(conv.id).title == "Renamed one"
        assert [str(i.query_one("Label.title").render()) for i in app.query("#conversations ListItem")] == ["Renamed one"]
        app.chat_screen.action_export()  # asks where, offering a name in the current directory
        await until(pilot, lambda: isinstance(app.screen, AskScreen) and app.screen.query(Input))
        assert app.screen.query_one(Input).value == str(tmp_path / f"dschat-{conv.id}.md")
        await answer(pilot, app, str(tmp_path / "notes.md"))
        exported = (tmp_path / "notes.md").read_text()
        assert "alpha question" in exported and conv.messages[1].content in exported
        assert stat.S_IMODE((tmp_path / "notes.md").stat().st_mode) == 0o600  # private, as the history is
        app.chat_screen.action_export()
        await until(pilot, lambda: isinstance(app.screen, AskScreen))
        await pilot.press("escape")  # not exported: nothing written
        await pilot.pause(0.1)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.md"]
        app.chat_screen.action_search()
        await answer(pilot, app, "nothing like this")
        assert not list(app.query("#conversations ListItem"))
        app.chat_screen.action_search()
        await answer(pilot, app, "alpha")
        assert [i.name for i in app.query("#conversations ListItem")] == [conv.id]
        app.chat_screen.action_delete()  # asks first: Esc (or n) keeps it
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("escape")
        await pilot.pause(0.1)
        assert Store().latest().id == conv.id and len(list(app.query(MessageView))) == 2
        app.chat_screen.action_delete()
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await pilot.pause(0.1)
        assert Store().latest() is None and not list(app.query(MessageView))


async def test_palette_reaches_the_actions(chat_models):
    app = make_app(chat_models["v3"])
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        titles = {c.title for c in app.get_system_commands(app.screen)}
        for want in ("New chat", "Regenerate", "Edit last prompt", "Copy reply", "Copy code block", "System prompt",
                     "Rename conversation", "Delete conversation", "Export conversation", "Search conversations",
                     "Switch model", "Toggle sidebar", "Help"):
            assert want in titles
        await pilot.press("ctrl+p")
        await pilot.pause(0.2)
        await pilot.press(*"toggle sidebar")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await pilot.pause(0.2)
        assert app.query_one("#sidebar").has_class("hidden")


async def test_keys_are_rebindable_in_the_config_file(chat_models):
    app = make_app(chat_models["v3"])
    app.conf.keys = {"toggle_sidebar": "ctrl+t"}
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        await pilot.press("ctrl+t")
        await pilot.pause(0.1)
        assert app.query_one("#sidebar").has_class("hidden")


async def test_scrolling_up_is_not_yanked_back_by_the_stream(chat_models):
    app = make_app(chat_models["v3"], "-n", "100000", "-t", "1.0", "--seed", "3")
    async with app.run_test(size=(100, 20)) as pilot:
        await ready(pilot, app)
        view = app.query_one("#conversation")
        for i in range(6):
            await view.mount(MessageView("user", f"earlier message {i}\n\nwith a second paragraph"))
        prompt = app.query_one(PromptArea)
        prompt.text = "stream a lot"
        await pilot.press("enter")
        await until(pilot, lambda: replies(app) and len(replies(app)[-1].text) > 20)
        await until(pilot, lambda: view.max_scroll_y > 5)
        assert view.scroll_y == view.max_scroll_y  # following the stream at the bottom
        view.scroll_to(y=0, animate=False)
        await pilot.pause(0.1)
        grown = len(replies(app)[-1].text)
        await until(pilot, lambda: len(replies(app)[-1].text) > grown + 40)
        assert view.scroll_y == 0  # the reader stays where they scrolled
        await pilot.press("escape")
        await until(pilot, lambda: app.turns_done == 1)


def test_user_theme_files(tmp_path):
    from dschat.themes import ThemeError, load_themes, read_theme

    (tmp_path / "mine.toml").write_text('primary = "#ff8800"\ndark = true\n')
    (tmp_path / "broken.toml").write_text('primary = "not a colour"\n')
    themes, problems = load_themes(tmp_path)
    names = [t.name for t in themes]
    assert {"deepseek-dark", "deepseek-light", "mine"} <= set(names)
    assert len(problems) == 1 and "broken.toml" in problems[0]
    (tmp_path / "odd.toml").write_text('primary = "#ffffff"\nsparkle = 1\n')
    with pytest.raises(ThemeError, match="sparkle"):
        read_theme(tmp_path / "odd.toml")


async def test_a_full_context_is_a_notice_and_the_message_goes_back_into_the_input(chat_models, monkeypatch):
    from dschat.engine import Engine

    app = make_app(chat_models["v3"], "-n", "4")
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "short")
        answer = replies(app)[-1].text
        with monkeypatch.context() as m:
            m.setattr(Engine, "context_length", property(lambda self: 40))
            long = "word " * 60
            done = app.turns_done
            prompt = app.query_one(PromptArea)
            prompt.text = long
            await pilot.press("enter")
            await until(pilot, lambda: app.turns_done > done)
            await pilot.pause(0.1)
            assert any("context window" in n.message for n in app._notifications)
            assert prompt.text == long  # nothing typed is lost
            assert [v.text for v in app.query(MessageView)] == ["short", answer]
            assert len(app.chat.messages) == 2 and len(Store().latest().messages) == 2
            # a regeneration that cannot start leaves the old answer in place
            m.setattr(Engine, "context_length", property(lambda self: 8))
            done = app.turns_done
            await pilot.press("ctrl+r")
            await until(pilot, lambda: app.turns_done > done)
            await pilot.pause(0.1)
            assert [v.text for v in app.query(MessageView)] == ["short", answer]
            assert app.chat.messages[-1]["content"] == answer and len(Store().latest().messages) == 2
        await send(pilot, app, "again")  # and the chat goes on from the same history
        assert len(Store().latest().messages) == 4
        assert Store().latest().messages[3].timings["cached_tokens"] > 0


async def test_raw_is_honoured(chat_models, chat_engines):
    from dschat.conversation.template import completion_prompt

    app = make_app(chat_models["v3"], "-n", "4", "--raw")
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "def f(x):")
    _, ids = completion_prompt(chat_engines["v3"].tokenizer, "def f(x):")
    assert Store().latest().messages[0].token_ids == ids  # text completion, not the chat template
