"""The full-screen chat (Textual): the app, its layout, its actions and its worker threads.

The engine runs in worker threads, so typing, scrolling and Esc stay live while a model loads or a reply
streams. Replies stream into a Markdown widget through Textual's MarkdownStream (fragments are appended,
the message is not re-rendered per token); the view follows the stream only while it is scrolled to the
bottom (Textual's anchor). Every completed or stopped turn is saved at once.
"""

from __future__ import annotations

import asyncio
import re
import threading
from dataclasses import replace
from pathlib import Path

from pygments.util import ClassNotFound
from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.css.query import NoMatches
from textual.widgets import Footer, Header, Label, ListItem, ListView, Static

from dschat.themes import load_themes

from dschat.conversation.chat import Chat, Turn
from dschat.errors import error_text
from dschat.files import write_output
from dschat.settings.keymap import check_keymap
from dschat.settings.paths import xdg
from dschat.runtime import DEMO_DIR, Options, load_engine, model_name, session_settings
from dschat.conversation.session import ChatSession
from dschat.signals import STOPPING, Stopped
from dschat.history.store import Store, StoreError
from dschat.terminal.text import terminal_safe
from dschat.tui.ask_screen import AskScreen
from dschat.tui.help_screen import HelpScreen
from dschat.tui.message_view import MessageView
from dschat.tui.prompt_area import PromptArea
from dschat.tui.reply_markdown import code_theme
from dschat.tui.terminal_driver import ClosableTerminalDriver

CODE_BLOCK = re.compile(r"```[^\n]*\n(.*?)```", re.S)
LAST = object()  # update_status: the last reply's figures


class ChatApp(App):
    TITLE = "dschat"
    CSS_PATH = "chat.tcss"
    BINDINGS = [
        Binding("ctrl+q", "quit", "Quit", id="quit", priority=True),
        Binding("escape", "stop", "Stop", id="stop"),
        Binding("ctrl+n", "new_chat", "New chat", id="new_chat"),
        Binding("ctrl+r", "regenerate", "Regenerate", id="regenerate"),
        Binding("ctrl+o", "copy_reply", "Copy reply", id="copy_reply"),
        Binding("ctrl+b", "toggle_sidebar", "Sidebar", id="toggle_sidebar"),
        Binding("f1", "help", "Help", id="help"),
    ]

    def __init__(self, opts: Options):
        super().__init__(driver_class=ClosableTerminalDriver)
        self.opts = opts
        self.conf = opts.config
        self.engine = None
        self.session: ChatSession | None = None
        self.busy = False
        self.loading = False  # a model is loading (a reply cannot start meanwhile)
        self.stop_event = threading.Event()
        self.last_stats = None  # the GenerationStats of the last reply
        self.model_label = ""
        self.turns_done = 0  # completed or stopped replies (tests wait on it)
        self.code_theme = None  # a Pygments style for code blocks, when the config names one
        self.closing = False  # quitting: a streaming reply is saved, then the app exits; late workers keep quiet
        self.stopped_by: int | None = None  # SIGTERM, SIGHUP or SIGINT, when one ended the app

    # -- layout -------------------------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal():
            with Vertical(id="sidebar"):
                yield Label("Conversations", classes="heading")
                yield ListView(id="conversations")
            with Vertical(id="main"):
                yield VerticalScroll(id="conversation")
                yield PromptArea(id="prompt")
                yield Static("", id="status", markup=False)
        yield Footer()

    def on_mount(self):
        themes, problems = load_themes(xdg("CONFIG") / "themes")
        for t in themes:
            self.register_theme(t)
        for p in problems:
            self.notify(p, severity="warning")
        wanted = self.opts.theme or self.conf.theme or "deepseek-dark"
        if wanted in self.available_themes:
            self.theme = wanted
        else:
            self.notify(f"no theme called {wanted!r}", severity="warning")
            self.theme = "deepseek-dark"
        self.theme_changed_signal.subscribe(self, self._remember_theme)
        if self.conf.code_style:
            try:
                self.code_theme = code_theme(self.conf.code_style)
            except ClassNotFound:
                self.notify(f"no Pygments style called {self.conf.code_style!r}; code uses the theme's colours",
                            severity="warning")
        if self.conf.keys:
            self.set_keymap(self.conf.keys)
        self.query_one("#conversation").anchor()
        self.query_one(PromptArea).focus()
        self.refresh_conversations()
        self.load_model()

    def notify(self, message: str, *, title: str = "", severity="information", timeout=None, markup: bool = False):
        """A notice, as text (no markup: a "[/]" in a path or a model's message would end the app) without
        escape sequences or control characters (it may carry a model file's text, a path, the history)."""
        super().notify(terminal_safe(str(message)), title=terminal_safe(title), severity=severity,
                       timeout=timeout, markup=False)

    def _remember_theme(self, theme):
        if theme.name != self.conf.theme:
            try:
                self.conf.save(theme=theme.name)
            except OSError as e:
                self.notify(f"could not save the theme: {e}", severity="warning")

    def _ui(self, callback, *args, **kwargs):
        """Run `callback` on the UI thread from a worker thread; nothing if the app has closed meanwhile."""
        try:
            return self.call_from_thread(callback, *args, **kwargs)
        except (RuntimeError, NoMatches):
            if self.is_running and not self.closing:
                raise
            return None

    # -- model ----------------------------------------------------------------------------------------------------
    @work(thread=True, exclusive=True, group="engine")
    def load_model(self, name: str | None = None):
        """Load the model (`name`, else the options'); a model already loaded stays until the new one has."""
        opts = replace(self.opts, model=name) if name else self.opts
        self.loading = True
        try:
            label = model_name(opts)
            self._ui(self.set_status, f"loading {label} ...")
            engine = load_engine(opts, progress=lambda done, total: self._ui(
                self.set_status, f"loading {label}: {done / max(total, 1):.0%}"))
            engine.tokenizer  # fail here, not on the first message
        except Exception as e:
            self._ui(self._model_failed, error_text(e))
            return
        demo = Path(engine.path).resolve() == DEMO_DIR
        label = ("demo model (tiny, trained on Python's standard library; not a DeepSeek release)"
                 if demo else Path(str(label)).name)
        self._ui(self._model_ready, engine, opts, label)

    def _model_failed(self, error: str):
        self.loading = False
        kept = f"; still using {self.model_label}" if self.engine is not None else ""
        self.notify(f"model failed to load: {error}{kept}", severity="error", timeout=15)
        if self.engine is None:
            self.set_status("no model loaded")
        else:
            self.update_status()

    @property
    def chat(self) -> Chat | None:
        return self.session.chat if self.session else None

    @property
    def conv_id(self) -> str | None:
        return self.session.conversation_id if self.session else None

    def _model_ready(self, engine, opts: Options, label: str):
        self.engine, self.opts, self.model_label, self.loading = engine, opts, label, False
        self.sub_title = terminal_safe(f"{self.model_label} on {engine.device}")
        self.query_one("#conversation").remove_children()
        settings = session_settings(self.opts)
        if self.session is not None:
            self.session.close()
        try:
            self.session = ChatSession(engine, settings)
        except StoreError as e:  # nothing to continue (-c), say: a new conversation
            self.notify(str(e), severity="warning")
            self.session = ChatSession(engine, settings.new_conversation())
        opened = self.session.opened
        self.show_conversation([m for m in opened.messages if m.role != "system"] if opened else [])
        self.update_status()

    def open_conversation(self, conv):
        self.session.open(conv)
        self.show_conversation([m for m in conv.messages if m.role != "system"])
        self.update_status()

    def show_conversation(self, msgs):
        view = self.query_one("#conversation")
        view.remove_children()
        view.mount_all([MessageView(m.role, m.content, m.interrupted) for m in msgs])
        view.scroll_end(animate=False)
        self.query_one(PromptArea).prompts = [terminal_safe(m.content, body=True) for m in msgs if m.role == "user"]

    # -- sending ---------------------------------------------------------------------------------------------------
    @on(PromptArea.Submitted)
    def submitted(self, event: PromptArea.Submitted):
        if self.engine is None or self.chat is None or self.loading:
            self.notify("the model is still loading (or failed to load); your text is kept", severity="warning")
            return
        if self.busy:
            self.notify("a reply is still streaming: Esc stops it", severity="warning")
            return
        prompt = self.query_one(PromptArea)
        prompt.prompts.append(event.text)
        try:  # a saved conversation: held until the turn is saved (another dschat answering in it: a notice)
            turn = self.session.turn(event.text, wait=False)
        except Exception as e:
            self.notify(error_text(e), severity="error")
            return
        prompt.text = ""
        self.show_caught_up()
        self.run_turn(turn, user_view=True)

    def show_caught_up(self, regenerating: bool = False) -> bool:
        """Turns another dschat saved in this conversation meanwhile: the conversation is shown again (less
        the answer being regenerated). Whether there were any."""
        if not self.session.caught_up:
            return False
        msgs = [m for m in self.session.opened.messages if m.role != "system"]
        self.show_conversation(msgs[:-1] if regenerating else msgs)
        self.notify("turns saved meanwhile by another dschat are shown; this one follows them")
        return True

    def run_turn(self, turn: Turn, user_view: bool):
        view = self.query_one("#conversation")
        if user_view:
            view.mount(MessageView("user", turn.user))
        reply = MessageView("assistant")
        view.mount(reply)
        view.anchor()
        self.busy = True
        self.stop_event.clear()
        self.generate(turn, reply)

    @work(thread=True, exclusive=True, group="engine")
    def generate(self, turn: Turn, view: MessageView):
        """Stream the reply (reply.py) in this worker thread; Esc sets stop_event. It is saved on the UI thread."""
        reply = self.session.reply(turn, self.stop_event)
        reply.stream(lambda piece: self._ui(self._show_piece, view, piece, reply.stats))
        self._ui(self._turn_done, reply, view)

    async def _show_piece(self, view: MessageView, piece: str, stats):
        """One round trip to the UI thread per piece: the text, then the live figures."""
        await view.append(piece)
        self.update_status(stats)

    async def _turn_done(self, reply, view: MessageView):
        turn = reply.turn
        await view.finish(turn.interrupted)
        if reply.error is not None:  # context full, out of memory, ...: a notice, and the app goes on
            self.notify(error_text(reply.error), severity="error", timeout=10)
        regenerating = self.session.regenerating
        try:
            kept = reply.finish()
        except Exception as e:
            kept = True
            self.notify(f"could not save the conversation: {error_text(e)}", severity="error")
        if not kept:
            await self._take_back(turn, view, regenerating)
        elif self.session.cut_notice(turn):
            self.notify(self.session.cut_notice(turn), severity="warning", timeout=10)
        self.refresh_conversations()
        self.last_stats = reply.stats
        self.busy = False
        self.turns_done += 1
        if self.closing:
            self.exit()
            return
        self.update_status(reply.stats)

    async def _take_back(self, turn: Turn, reply: MessageView, regenerating: bool):
        """A turn that failed before its first token (context full, say) leaves no trace: its message goes
        back into the input, so nothing typed is lost."""
        await reply.remove()
        if regenerating:  # the answer it was to replace comes back
            await self.query_one("#conversation").mount(MessageView("assistant", self.chat.messages[-1]["content"]))
            return
        views = list(self.query(MessageView))
        if views and views[-1].role == "user":
            await views[-1].remove()
        prompt = self.query_one(PromptArea)
        if not prompt.text.strip():
            prompt.text = turn.user

    # -- status -----------------------------------------------------------------------------------------------------
    def set_status(self, text: str):
        self.query_one("#status", Static).update(terminal_safe(text))  # the widget takes no markup

    def update_status(self, stats=LAST):
        """The status line: ready or streaming, the context used, and the figures of `stats` (a GenerationStats;
        None: none; by default the last reply's)."""
        if self.engine is None:
            return
        s = self.last_stats if stats is LAST else stats
        used = len(self.chat.ids) if self.chat else 0
        if self.busy and s is not None and s.prompt_tokens:  # the reply so far counts too
            used = s.prompt_tokens + s.generated_tokens
        parts = ["streaming · Esc stops" if self.busy else "ready", f"context {used}/{self.engine.context_length}"]
        if s is not None:
            if s.decode_tokens_per_s:
                parts.append(f"{s.decode_tokens_per_s:.1f} tok/s")
            parts.append(f"reused {s.cached_tokens}")
            if s.draft_tokens:
                kind = "MTP" if self.engine.speculative == "mtp" else "n-gram"
                parts.append(f"{kind} {s.accepted_tokens}/{s.draft_tokens} accepted")
            if s.tokens_per_forward:  # what drafting really gained (1.00: nothing)
                parts.append(f"{s.tokens_per_forward:.2f} tok/forward")
        self.set_status("  ·  ".join(parts))

    # -- actions ----------------------------------------------------------------------------------------------------
    def action_quit(self):
        self.closing = True
        if self.busy:  # the streaming reply stops, is saved, then the app goes (_turn_done)
            self.stop_event.set()
            self.set_timer(10, self.exit)  # should the engine not answer at once
            return
        self.exit()

    def stop_on_signal(self, signum: int):
        """SIGTERM, SIGHUP or SIGINT (`kill -INT`: Ctrl+C is a key here), on the app's loop: as Ctrl+Q (a
        streaming reply stops and is saved, marked interrupted), then dschat ends with the signal's exit code
        (run_tui)."""
        self.stopped_by = self.stopped_by or signum
        self.call_later(self.action_quit)

    def on_unmount(self):
        self.closing = True
        self.stop_event.set()
        if self.session is not None:
            self.session.close()

    def action_stop(self):
        if self.busy:
            self.stop_event.set()

    def action_new_chat(self):
        if self.busy:
            self.stop_event.set()
            return
        if self.session is not None:
            self.session.new()
            self.query_one("#conversation").remove_children()
            self.update_status(None)

    def action_regenerate(self):
        if self.busy or self.chat is None:
            return
        try:
            turn = self.session.regenerate(wait=False)
        except Exception as e:  # nothing to regenerate, another dschat answering in this conversation
            self.notify(error_text(e), severity="warning")
            return
        views = list(self.query(MessageView))
        if not self.show_caught_up(regenerating=True) and views and views[-1].role == "assistant":
            views[-1].remove()
        self.run_turn(turn, user_view=False)

    def action_edit_last(self):
        """Put the last prompt back in the input; sending it replaces the last exchange (kept as a sibling)."""
        if self.busy or self.chat is None:
            return
        try:
            text = self.session.edit_last()
        except ValueError as e:
            self.notify(str(e), severity="warning")
            return
        for v in list(self.query(MessageView))[-2:]:
            v.remove()
        prompt = self.query_one(PromptArea)
        prompt.text = terminal_safe(text, body=True)
        prompt.focus()

    def last_reply(self) -> str | None:
        replies = [v for v in self.query(MessageView) if v.role == "assistant"]
        return replies[-1].text.strip() if replies else None

    def action_copy_reply(self):
        text = self.last_reply()
        if text:
            self.copy_to_clipboard(text)
            self.notify("reply copied")

    def action_copy_code(self):
        blocks = CODE_BLOCK.findall(self.last_reply() or "")
        if not blocks:
            self.notify("the last reply has no code block", severity="warning")
            return
        self.copy_to_clipboard(blocks[-1])
        self.notify("code block copied")

    def action_toggle_sidebar(self):
        self.query_one("#sidebar").toggle_class("hidden")

    def action_help(self):
        keys = "\n".join(f"| `{b.key}` | {b.description} |" for b in self.BINDINGS)
        self.push_screen(HelpScreen(
            "# dschat\n\n| key | action |\n|---|---|\n" + keys +
            "\n| `enter` | send |\n| `ctrl+j` | new line |\n| `up` | earlier prompts (empty input) |"
            "\n| `ctrl+p` | command palette: every action |\n\nKeys can be changed in the `[keys]` table of "
            "`~/.config/dschat/config.toml`, e.g. `stop = \"ctrl+s\"`."))

    def action_set_system(self):
        def done(text):
            if text is None or self.chat is None:
                return
            try:
                self.session.set_system(text)
            except StoreError as e:
                self.notify(str(e), severity="error")
                return
            self.notify("system prompt set")

        self.push_screen(AskScreen("System prompt:", terminal_safe((self.chat.system or "") if self.chat else "")),
                         done)

    def _with_store(self, fn):
        """fn(the history): the session's, once there is one (opened once, not for each call)."""
        try:
            if self.session is not None:
                return fn(self.session.store)
            with Store() as store:
                return fn(store)
        except StoreError as e:
            self.notify(str(e), severity="error")

    def action_rename(self):
        if not self.conv_id:
            self.notify("nothing saved yet to rename", severity="warning")
            return

        def done(title):
            if title:
                self._with_store(lambda s: s.rename(self.conv_id, title))
                self.refresh_conversations()

        self.push_screen(AskScreen("New title:"), done)

    def action_delete(self):
        if self.busy:
            self.notify("a reply is still streaming: Esc stops it", severity="warning")
            return
        if self.conv_id:
            self._with_store(lambda s: s.delete(self.conv_id))
            self.notify("conversation deleted")
        self.action_new_chat()
        self.refresh_conversations()

    def action_export(self):
        if not self.conv_id:
            self.notify("nothing saved yet to export", severity="warning")
            return
        text = self._with_store(lambda s: s.export_text(self.conv_id, "md"))
        if text:
            path = Path.cwd() / f"dschat-{self.conv_id}.md"
            try:
                write_output(path, text)
            except OSError as e:  # a notice; the app goes on
                self.notify(f"not exported: {error_text(e)}", severity="error")
                return
            self.notify(f"exported to {path}")

    def action_search(self):
        self.push_screen(AskScreen("Search conversations (empty: all):"), lambda q: self.refresh_conversations(q or None))

    def action_switch_model(self):
        def done(name):
            if name and not self.busy and not self.loading:
                self.load_model(name.strip())  # the current model stays until this one has loaded

        self.push_screen(AskScreen("Model (directory, hub id or demo):", terminal_safe(self.opts.model or "")), done)

    def get_system_commands(self, screen):
        yield from super().get_system_commands(screen)
        for title, help_, action in (
                ("New chat", "Start a new conversation", self.action_new_chat),
                ("Regenerate", "A new answer to the last prompt (the old one is kept)", self.action_regenerate),
                ("Edit last prompt", "Put the last prompt back in the input to edit and resend",
                 self.action_edit_last),
                ("Copy reply", "Copy the last reply to the clipboard", self.action_copy_reply),
                ("Copy code block", "Copy the last code block of the last reply", self.action_copy_code),
                ("System prompt", "Set the system prompt", self.action_set_system),
                ("Rename conversation", "Give this conversation a title", self.action_rename),
                ("Delete conversation", "Delete this conversation from the history", self.action_delete),
                ("Export conversation", "Write this conversation as Markdown", self.action_export),
                ("Search conversations", "Full-text search of the history", self.action_search),
                ("Switch model", "Load another model", self.action_switch_model),
                ("Toggle sidebar", "Show or hide saved conversations", self.action_toggle_sidebar),
                ("Help", "Keys and actions", self.action_help)):
            yield SystemCommand(title, help_, action)

    # -- sidebar ------------------------------------------------------------------------------------------------------
    def refresh_conversations(self, search: str | None = None):
        rows = self._with_store(lambda s: s.list(search=search, limit=200)) or []
        lv = self.query_one("#conversations", ListView)
        lv.clear()
        # a title is shown as text: no markup (a "[/]" in it would break the sidebar), no control characters
        lv.extend(ListItem(Label(terminal_safe(r["title"]) or "(untitled)", markup=False), name=r["id"]) for r in rows)

    @on(ListView.Selected, "#conversations")
    def conversation_selected(self, event: ListView.Selected):
        if self.busy or self.engine is None:
            self.notify("wait for the reply (or the model) first", severity="warning")
            return
        conv = self._with_store(lambda s: s.get(event.item.name))
        if conv is not None:
            self.open_conversation(conv)
            self.query_one(PromptArea).focus()


def run_tui(opts: Options) -> int:
    """Run the app. SIGTERM, SIGHUP and SIGINT are handled on its loop, as Textual's own events are: a handler
    that raised in the main thread, as pipe and line mode's do, would interrupt Textual wherever it was."""
    check_keymap(opts.config.keys, {b.id: b.key for b in ChatApp.BINDINGS if b.id}, opts.config.path)
    app, loop = ChatApp(opts), asyncio.new_event_loop()
    for sig in STOPPING:
        loop.add_signal_handler(sig, app.stop_on_signal, sig)
    try:
        app.run(loop=loop)
    finally:
        for sig in STOPPING:
            loop.remove_signal_handler(sig)
        loop.close()
    if app.stopped_by:
        raise Stopped(app.stopped_by)  # told on stderr, once the terminal is restored; exit 143 or 129
    return 0
