"""The chat screen: the sidebar (ConversationList), the conversation (ChatView), the input (PromptArea) and the
status line (StatusBar), and what the keys and the palette do with them.

The widgets post messages (PromptArea.Submitted, ConversationList.Opened, ChatView.Streamed, ChatView.Ended)
and this screen handles them; it tells the widgets what to show by calling their methods. The model and the
session (the engine, the history) are the app's (app.py); the history is used from here, on the UI thread,
except while a turn is being saved, which a worker thread does (it may wait for a busy history).

The keys and the turn are here; what some keys do lives beside it, mixed in: versions and branches
(branches.py), copying (copy_actions.py), the history's actions (history_actions.py).
"""

from __future__ import annotations

from textual import on, work
from textual.app import ComposeResult, SuspendNotSupported
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Header

from dschat.conversation.attachments import AttachmentError, describe, read_all, with_files
from dschat.conversation.chat import Turn
from dschat.errors import error_text
from dschat.terminal.text import terminal_safe
from dschat.tui.ask_screen import AskScreen
from dschat.tui.branches import BranchActions
from dschat.tui.chat_view import ChatView
from dschat.tui.conversation_list import ConversationList
from dschat.tui.copy_actions import CopyActions
from dschat.tui.editor import EditorError, compose
from dschat.tui.footer import NARROW, ChatFooter
from dschat.tui.history_actions import LAST, HistoryActions
from dschat.tui.message_view import MessageView
from dschat.tui.prompt_area import PromptArea
from dschat.tui.status_bar import StatusBar


class ChatScreen(BranchActions, CopyActions, HistoryActions, Screen):
    # The keys shown in the footer, in this order; [keys] in the config file rebinds them by id (run_tui checks).
    BINDINGS = [
        Binding("ctrl+q", "app.quit", "Quit", id="quit", priority=True),
        Binding("escape", "stop", "Stop", id="stop"),
        Binding("ctrl+n", "new_chat", "New chat", id="new_chat"),
        Binding("ctrl+r", "regenerate", "Regenerate", id="regenerate"),
        Binding("ctrl+o", "copy_reply", "Copy reply", id="copy_reply"),
        Binding("ctrl+b", "toggle_sidebar", "Sidebar", id="toggle_sidebar"),
        Binding("f1", "app.help", "Help", id="help"),
        # in F1's list and the palette, not the footer
        Binding("ctrl+g", "compose_in_editor", "Write the message in $EDITOR", id="compose_in_editor", show=False),
        Binding("ctrl+l", "pick_code", "Copy a code block (pick one)", id="pick_code", show=False),
        Binding("alt+up", "select(-1)", "Select the message above", id="select_up", show=False),
        Binding("alt+down", "select(1)", "Select the message below", id="select_down", show=False),
        Binding("alt+left", "version(-1)", "Previous version of the selected message (or the last with versions)",
                id="version_prev", show=False),
        Binding("alt+right", "version(1)", "Next version of the selected message (or the last with versions)",
                id="version_next", show=False),
        Binding("alt+e", "edit_message", "Edit the selected prompt (or the last) and resend it: a new branch",
                id="edit_message", show=False, priority=True),  # before the input takes it as an "e"
    ]
    # The command palette's entries (ChatApp.get_system_commands): title, help, this screen's action.
    COMMANDS_LIST = (
        ("New chat", "Start a new conversation", "new_chat"),
        ("Regenerate", "A new answer to the last prompt (the old one is kept)", "regenerate"),
        ("Edit last prompt", "Put the last prompt back in the input to edit and resend", "edit_last"),
        ("Edit selected prompt", "Edit the prompt selected with Alt+Up/Down and resend it: a new branch (Alt+E)",
         "edit_message"),
        ("Copy reply", "Copy the last reply to the clipboard", "copy_reply"),
        ("Copy code block", "Copy the last code block of the last reply", "copy_code"),
        ("Copy a chosen code block", "Pick any code block of the conversation to copy (Ctrl+L)", "pick_code"),
        ("Write in $EDITOR", "Compose the message in $VISUAL or $EDITOR (Ctrl+G)", "compose_in_editor"),
        ("System prompt", "Set the system prompt", "set_system"),
        ("Rename conversation", "Give this conversation a title", "rename"),
        ("Delete conversation", "Delete this conversation from the history", "delete"),
        ("Export conversation", "Write this conversation as Markdown", "export"),
        ("Search conversations", "Full-text search of the history", "search"),
        ("Switch model", "Load another model", "switch_model"),
        ("Toggle sidebar", "Show or hide saved conversations", "toggle_sidebar"),
        ("Help", "Keys and actions", "app.help"),
    )

    class Saved(Message):
        """The save worker is done with a turn: `kept` as Reply.finish says, or `error` (it could not be saved,
        nor kept pending)."""

        def __init__(self, reply, view: MessageView, regenerating: bool, kept: bool, error: Exception | None):
            super().__init__()
            self.reply, self.view, self.regenerating, self.kept, self.error = reply, view, regenerating, kept, error

    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (NARROW, "-wide")]  # -narrow: a narrower sidebar (chat.tcss)

    def __init__(self):
        super().__init__()
        self.saving = False  # a turn is being saved in a worker thread: the history is the worker's meanwhile
        self.attached: list[str] = []  # /add: files for the next message
        self.selected: int | None = None  # the message selected (Alt+Up/Down), by its place in the view

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal():
            yield ConversationList(id="sidebar")
            with Vertical(id="main"):
                yield ChatView(id="conversation")
                yield PromptArea(id="prompt")
                yield StatusBar(id="status")
        yield ChatFooter()

    def on_resize(self):
        self.app.show_model()  # the header keeps the device: the model's name is shortened to fit

    def on_mount(self):
        self.chat_view.anchor()
        self.prompt.focus()
        self.refresh_conversations()

    # -- the parts ------------------------------------------------------------------------------------------------
    @property
    def chat_view(self) -> ChatView:
        return self.query_one(ChatView)

    @property
    def prompt(self) -> PromptArea:
        return self.query_one(PromptArea)

    @property
    def session(self):
        return self.app.session

    def set_status(self, text: str):
        self.query_one(StatusBar).say(text)

    def update_status(self, stats=LAST):
        """The status line: ready or streaming, the context used, and the figures of `stats` (a GenerationStats;
        None: none; by default the last reply's)."""
        app = self.app
        if app.engine is None:
            return
        s = app.last_stats if stats is LAST else stats
        used = len(app.chat.ids) if app.chat else 0
        if app.busy and s is not None and s.prompt_tokens:  # the reply so far counts too
            used = s.prompt_tokens + s.generated_tokens
        self.query_one(StatusBar).figures(busy=app.busy, used=used, context_length=app.engine.context_length,
                                          stats=s, speculative=app.engine.speculative)

    def show_conversation(self, msgs):
        self.chat_view.show(msgs)
        self.prompt.prompts = [terminal_safe(m.content, body=True) for m in msgs if m.role == "user"]
        self.select(None)
        self.show_versions()

    def model_ready(self):
        """The app has a (new) model and session: show what it opened."""
        opened = self.session.opened
        self.show_conversation([m for m in opened.messages if m.role != "system"] if opened else [])
        self.update_status()

    # -- sending ----------------------------------------------------------------------------------------------------
    @on(PromptArea.Submitted)
    def submitted(self, event: PromptArea.Submitted):
        app = self.app
        if app.engine is None or app.chat is None or app.loading:
            app.notify("the model is still loading (or failed to load); your text is kept", severity="warning")
            return
        words = event.text.split(maxsplit=1)
        if words[0] in ("/add", "/drop"):  # files for the next message (as line mode's /add and /drop)
            self.attach_command(words[0], words[1].strip() if len(words) > 1 else "")
            return
        if self.saving:
            app.notify("the last turn is still being saved (the history is busy); your text is kept",
                       severity="warning")
            return
        if app.busy:
            app.notify("a reply is still streaming: Esc stops it", severity="warning")
            return
        prompt = self.prompt
        text = event.text
        if self.attached:  # the files are read now, as the message is sent
            try:
                text = with_files(text, read_all(self.attached))
            except AttachmentError as e:
                app.notify(f"not sent: {error_text(e)}; /drop takes the files back", severity="error")
                return
        prompt.prompts.append(event.text)
        try:  # a saved conversation: held until the turn is saved (another dschat answering in it: a notice)
            turn = self.session.turn(text, wait=False)
        except Exception as e:
            app.notify(error_text(e), severity="error")
            return
        prompt.text = ""
        self.show_attached([])
        self.select(None)
        self.show_caught_up()
        self.run_turn(turn, user_view=True)

    def attach_command(self, cmd: str, path: str):
        """/add PATH: a file (or a folder's text files) for the next message, checked now and read again when
        it is sent; /add alone says what is attached; /drop takes the files back."""
        app, prompt = self.app, self.prompt
        if cmd == "/drop":
            self.show_attached([])
            app.notify("no files attached")
        elif not path:
            app.notify(f"attached: {', '.join(self.attached)}" if self.attached else "nothing attached: /add PATH")
        else:
            try:
                read_all([path])
                found = read_all(self.attached + [path])
            except AttachmentError as e:
                app.notify(f"not attached: {error_text(e)}", severity="error")
                return
            self.show_attached(self.attached + [path], describe(found, app.engine.tokenizer))
        prompt.text = ""

    def show_attached(self, paths: list[str], what: str = ""):
        """The files attached to the next message, shown under the input with their tokens until it is sent."""
        self.attached = list(dict.fromkeys(paths))
        self.prompt.border_subtitle = terminal_safe(f"attached {what} · /drop takes them back") if paths else ""

    def show_caught_up(self, regenerating: bool = False) -> bool:
        """Turns another dschat saved in this conversation meanwhile: the conversation is shown again (less
        the answer being regenerated). Whether there were any."""
        if not self.session.caught_up:
            return False
        msgs = [m for m in self.session.opened.messages if m.role != "system"]
        self.show_conversation(msgs[:-1] if regenerating else msgs)
        self.app.notify("turns saved meanwhile by another dschat are shown; this one follows them")
        return True

    def run_turn(self, turn: Turn, user_view: bool):
        app = self.app
        app.busy = True
        app.stop_event.clear()
        reply = self.session.reply(turn, app.stop_event)
        self.chat_view.stream(reply, turn.user if user_view else None)
        self.set_status("prefilling · Esc stops")  # until the first token: how many tokens, once the engine knows
        timer = self.set_interval(0.1, lambda: self.show_prefill(reply, timer))

    def show_prefill(self, reply, timer):
        """The status line while the prompt is prefilled (no token yet): the prompt's tokens the cache does
        not hold, and how many of them are done (the engine's live figures)."""
        s, app = reply.stats, self.app
        if not app.busy or reply.turn.output_ids or (s is not None and s.generated_tokens):
            timer.stop()
            return
        if s is None or app.stop_event.is_set():
            return
        n = s.prompt_tokens - s.cached_tokens
        done = f" ({s.prefilled_tokens} done)" if 0 < s.prefilled_tokens < n else ""
        self.set_status(f"prefilling {n} tokens{done} · Esc stops")

    @on(ChatView.Streamed)
    def streamed(self, event: ChatView.Streamed):
        self.update_status(event.stats)

    @on(ChatView.Ended)
    async def reply_ended(self, event: ChatView.Ended):
        reply = event.reply
        await event.view.finish(reply.turn.interrupted)
        if reply.error is not None:  # context full, out of memory, ...: a notice, and the app goes on
            self.app.notify(error_text(reply.error), severity="error", timeout=10)
        self.saving = True
        self.set_status("saving the reply ...")
        self._save(reply, event.view, self.session.regenerating)

    @work(thread=True, group="save")
    def _save(self, reply, view: MessageView, regenerating: bool):
        """Save the turn in this worker thread: the history may be busy (another dschat writing it), and its
        wait (with a notice, app.show_warning) must not stop the screen. A turn that cannot be saved in the end
        is kept in a pending file (the session's save), so the answer is never lost."""
        kept, error = True, None
        try:
            kept = reply.finish()
        except Exception as e:
            error = e
        self.post_message(self.Saved(reply, view, regenerating, kept, error))

    @on(Saved)
    async def saved(self, event: Saved):
        app, reply = self.app, event.reply
        self.saving = False
        if event.error is not None:
            app.notify(f"could not save the conversation: {error_text(event.error)}", severity="error")
        if not event.kept:
            await self._take_back(reply.turn, event.view, event.regenerating)
        elif reply.notice:
            app.notify(reply.notice, severity="warning", timeout=10)
        self.refresh_conversations()
        if event.kept:
            self.show_versions()
        app.last_stats = reply.stats
        app.busy = False
        app.turns_done += 1
        if app.closing:
            app.exit()
            return
        self.update_status(reply.stats)

    async def _take_back(self, turn: Turn, view: MessageView, regenerating: bool):
        """A turn that failed before its first token (context full, say) leaves no trace: its message goes
        back into the input, so nothing typed is lost."""
        await self.chat_view.take_back(view, self.app.chat.messages[-1]["content"] if regenerating else None)
        if not regenerating and not self.prompt.text.strip():
            self.prompt.text = turn.user

    # -- the history (history_actions.py has the rest) --------------------------------------------------------------
    @on(ConversationList.Cleared)
    def search_cleared(self):
        self.refresh_conversations(None)

    @on(ConversationList.Opened)
    def conversation_opened(self, event: ConversationList.Opened):
        app = self.app
        if app.busy or app.engine is None:
            app.notify("wait for the reply (or the model) first", severity="warning")
            return
        conv = self.with_store(lambda s: s.get(event.conversation_id))
        if conv is not None:
            self.session.open(conv)
            self.show_conversation([m for m in conv.messages if m.role != "system"])
            self.update_status()
            self.prompt.focus()

    # -- actions ----------------------------------------------------------------------------------------------------
    def action_stop(self):
        if self.app.busy:  # a streaming reply stops after the piece shown, a prefill between two chunks
            self.app.stop_event.set()
            if not self.saving:
                self.set_status("stopping ...")

    def action_new_chat(self):
        app = self.app
        if app.busy:
            app.stop_event.set()
            return
        if app.session is not None:
            app.session.new()
            self.selected = None
            self.chat_view.remove_children()
            self.update_status(None)

    def action_regenerate(self):
        app = self.app
        if app.busy or app.chat is None:
            return
        try:
            turn = self.session.regenerate(wait=False)
        except Exception as e:  # nothing to regenerate, another dschat answering in this conversation
            app.notify(error_text(e), severity="warning")
            return
        views = self.chat_view.messages
        if not self.show_caught_up(regenerating=True) and views and views[-1].role == "assistant":
            views[-1].remove()
        self.run_turn(turn, user_view=False)

    def action_compose_in_editor(self):
        """The input in $VISUAL or $EDITOR, the app suspended meanwhile; what the editor leaves comes back into
        the input (not sent: Enter sends it)."""
        app, prompt = self.app, self.prompt
        try:
            with app.suspend():
                text = compose(prompt.text)
        except SuspendNotSupported:
            app.notify("this terminal cannot hand the screen to an editor", severity="warning")
            return
        except EditorError as e:
            app.notify(str(e), severity="error")
            return
        prompt.text = text
        prompt.move_cursor(prompt.document.end)
        prompt.focus()

    def action_toggle_sidebar(self):
        self.query_one(ConversationList).toggle_class("hidden")

    def action_switch_model(self):
        app = self.app

        def done(name):
            if name and not app.busy and not app.loading:
                app.load_model(name.strip())  # the current model stays until this one has loaded

        app.push_screen(AskScreen("Model (directory, hub id or demo):", terminal_safe(app.opts.model or "")), done)
