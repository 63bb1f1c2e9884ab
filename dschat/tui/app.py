"""The full-screen chat (Textual): the app holds the model and the session and runs the chat screen.

The engine runs in worker threads, so typing, scrolling and Esc stay live while a model loads or a reply
streams (chat_view.py), and a turn is saved in one too (chat_screen.py), as the history may be busy. Replies
stream into a Markdown widget through Textual's MarkdownStream (fragments are appended, the message is not
re-rendered per token); the view follows the stream only while it is scrolled to the bottom (Textual's
anchor). Every completed or stopped turn is saved at once.

The parts: ChatApp (this file: themes, keys, notices, the model, quitting), ChatScreen (chat_screen.py: the
layout, the actions, the turn), and its widgets, which post messages the screen handles: ConversationList
(the sidebar), ChatView (the conversation and the streaming reply), PromptArea (the input), StatusBar.
"""

from __future__ import annotations

import asyncio
import threading
import warnings
from dataclasses import replace
from pathlib import Path

from pygments.util import ClassNotFound
from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.css.query import NoMatches

from dschat.conversation.chat import Chat
from dschat.conversation.session import ChatSession
from dschat.errors import error_text
from dschat.history.store import StoreError
from dschat.runtime import DEMO_DIR, Options, load_engine, model_name, session_settings
from dschat.settings.keymap import check_keymap
from dschat.settings.paths import xdg
from dschat.signals import STOPPING, Stopped
from dschat.terminal.text import terminal_safe
from dschat.themes import load_themes
from dschat.tui.chat_screen import ChatScreen
from dschat.tui.help_screen import HelpScreen
from dschat.tui.reply_markdown import code_theme
from dschat.tui.terminal_driver import ClosableTerminalDriver


HEADER_SPARE = 30  # the header's columns besides its subtitle: its icon, its right side, "dschat — ", a margin


class ChatApp(App):
    TITLE = "dschat"
    CSS_PATH = "chat.tcss"
    # Quit and help from any screen (a dialog too); the chat screen shows them in its footer (ChatScreen.BINDINGS).
    BINDINGS = [
        Binding("ctrl+q", "quit", "Quit", id="quit", priority=True, show=False),
        Binding("f1", "help", "Help", id="help", show=False),
    ]

    def __init__(self, opts: Options):
        super().__init__(driver_class=ClosableTerminalDriver)
        self.opts = opts
        self.conf = opts.config
        self.engine = None
        self.session: ChatSession | None = None
        self.busy = False  # a turn is under way: streaming, or being saved
        self.loading = False  # a model is loading (a reply cannot start meanwhile)
        self.stop_event = threading.Event()
        self.last_stats = None  # the GenerationStats of the last reply
        self.model_label = ""
        self.turns_done = 0  # completed or stopped replies, once saved (tests wait on it)
        self.code_theme = None  # a Pygments style for code blocks, when the config names one
        self.closing = False  # quitting: a streaming reply is saved, then the app exits; late workers keep quiet
        self.stopped_by: int | None = None  # SIGTERM, SIGHUP or SIGINT, when one ended the app
        self.chat_screen: ChatScreen | None = None
        self._showwarning = None

    def get_default_screen(self) -> ChatScreen:
        self.chat_screen = ChatScreen()
        return self.chat_screen

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
        # warnings (the history is busy, a pending turn was added, ...) are notices here: stderr is not shown
        self._showwarning, warnings.showwarning = warnings.showwarning, self.show_warning
        self.load_model()

    def show_warning(self, message, category, filename, lineno, file=None, line=None):
        """warnings.showwarning while the app runs, from any thread (notify is thread-safe)."""
        self.notify(str(message), severity="warning", timeout=10)

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
    @property
    def chat(self) -> Chat | None:
        return self.session.chat if self.session else None

    @property
    def conv_id(self) -> str | None:
        return self.session.conversation_id if self.session else None

    @work(thread=True, exclusive=True, group="engine")
    def load_model(self, name: str | None = None):
        """Load the model (`name`, else the options'); a model already loaded stays until the new one has."""
        opts = replace(self.opts, model=name) if name else self.opts
        self.loading = True
        try:
            from dschat.serve.client import find  # a running `dschat serve` (--server, or found), else load here

            engine = find(opts, lambda line: self._ui(self.notify, line.removeprefix("dschat: "), timeout=10))
            label = engine.name if engine is not None else model_name(opts)
            if engine is None:
                self._ui(self.chat_screen.set_status, f"loading {label} ...")
                engine = load_engine(opts, progress=lambda done, total: self._ui(
                    self.chat_screen.set_status, f"loading {label}: {done / max(total, 1):.0%}"))
            engine.tokenizer  # fail here, not on the first message
        except Exception as e:
            self._ui(self._model_failed, error_text(e))
            return
        demo = Path(engine.path).resolve() == DEMO_DIR
        label = "demo model (tiny; not a DeepSeek release)" if demo else Path(str(label)).name
        self._ui(self._model_ready, engine, opts, label)

    def show_model(self):
        """The header's "MODEL on DEVICE": the device always, the model's name shortened (…) to fit the width."""
        if self.engine is None:
            return
        label, where = terminal_safe(self.model_label), terminal_safe(f" on {self.engine.device}")
        room = self.size.width - HEADER_SPARE - len(where)
        if len(label) > room:
            label = label[:max(room - 1, 6)] + "…"
        self.sub_title = label + where

    def _model_failed(self, error: str):
        self.loading = False
        kept = f"; still using {self.model_label}" if self.engine is not None else ""
        self.notify(f"model failed to load: {error}{kept}", severity="error", timeout=15)
        if self.engine is None:
            self.chat_screen.set_status("no model loaded")
        else:
            self.chat_screen.update_status()

    def _model_ready(self, engine, opts: Options, label: str):
        self.engine, self.opts, self.model_label, self.loading = engine, opts, label, False
        self.show_model()
        settings = session_settings(self.opts)
        if self.session is not None:
            self.session.close()
        try:
            self.session = ChatSession(engine, settings)
        except StoreError as e:  # nothing to continue (-c), say: a new conversation
            self.notify(str(e), severity="warning")
            self.session = ChatSession(engine, settings.new_conversation())
        self.chat_screen.model_ready()

    # -- app-wide actions -------------------------------------------------------------------------------------------
    def action_quit(self):
        self.closing = True
        if self.busy:  # the streaming reply stops, is saved, then the app goes (ChatScreen.saved)
            self.stop_event.set()
            self.set_timer(10, self._exit_unless_saving)  # should the engine not answer at once
            return
        self.exit()

    def _exit_unless_saving(self):
        if not self.chat_screen.saving:  # a turn being saved is waited for (it is kept pending at worst)
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
        if self._showwarning is not None:
            warnings.showwarning = self._showwarning
        if self.session is not None:
            self.session.close()

    def action_help(self):
        keys = "\n".join(f"| `{b.key}` | {b.description} |" for b in ChatScreen.BINDINGS)
        self.push_screen(HelpScreen(
            "# dschat\n\n| key | action |\n|---|---|\n" + keys +
            "\n| `enter` | send |\n| `tab` | to the sidebar and back (Enter there opens a conversation) |\n| `ctrl+j` | new line |\n| `up` | earlier prompts (empty input) |"
            "\n| `ctrl+p` | command palette: every action |\n\nKeys can be changed in the `[keys]` table of "
            "`~/.config/dschat/config.toml`, e.g. `stop = \"ctrl+s\"`."))

    def get_system_commands(self, screen):
        yield from super().get_system_commands(screen)
        for title, help_, action in ChatScreen.COMMANDS_LIST:
            target = self if action.startswith("app.") else self.chat_screen
            yield SystemCommand(title, help_, getattr(target, "action_" + action.removeprefix("app.")))


def run_tui(opts: Options) -> int:
    """Run the app. SIGTERM, SIGHUP and SIGINT are handled on its loop, as Textual's own events are: a handler
    that raised in the main thread, as pipe and line mode's do, would interrupt Textual wherever it was."""
    check_keymap(opts.config.keys, {b.id: b.key for b in ChatScreen.BINDINGS if b.id}, opts.config.path)
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
