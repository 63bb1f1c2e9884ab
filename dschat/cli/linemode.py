"""`dschat --plain`: a line-mode chat in the terminal's own scrollback (prompt-toolkit input).

Enter sends; Alt+Enter (Esc then Enter) inserts a new line, and a message that starts with \"\"\" continues
until a line that ends with \"\"\". Ctrl+C stops a reply (it is kept, marked interrupted) or clears the input;
Ctrl+D exits; Ctrl+X Ctrl+E composes the message in $EDITOR. Slash commands: /system, /clear, /save, /load,
/regen, /edit, /stats, /thinking, /add, /drop, /help, /exit.
"""

from __future__ import annotations

import shutil
import sys
import time
from contextlib import suppress

from prompt_toolkit.utils import get_cwidth

from dschat.conversation.attachments import AttachmentError, describe, read_all, with_files
from dschat.conversation.chat import Turn
from dschat.errors import error_text
from dschat.files import write_conversation
from dschat.terminal.highlight import ansi, colour_terminal, lexer_for, terminal_formatter
from dschat.settings.paths import private_dir, private_file
from dschat.runtime import Options, print_stats, session_settings, stats_json
from dschat.serve.client import open_engine
from dschat.conversation.session import ChatSession
from dschat.signals import Stopped
from dschat.history.store import StoreError
from dschat.history.transfer import names_a_file, read_json_file
from dschat.terminal.text import SafeStream, say, terminal_safe
from dschat.history.turn_lock import ConversationBusy

HELP = """\
  /system TEXT   set the system prompt (/system alone clears it)
  /clear         start a new conversation
  /save FILE     export this conversation as JSON (for `dschat import` and `dschat replay`)
  /load ID|FILE  open a saved conversation (an id from `dschat conversations`, or an exported file)
  /regen         a new answer to the last prompt (the old one is kept in the history)
  /edit [N]      edit and resend your message N (1 = the first; default the last): the chat goes back to
                 before it, and the old turns stay in the history as another branch
  /stats         statistics of the last reply
  /thinking      a reasoning model's thinking for the last reply, unfolded
  /add PATH      put a file (or a folder's text files) into your next message; /add alone lists them
  /drop          take back the files /add attached
  /help          this help
  /exit          leave (or Ctrl+D)
Alt+Enter inserts a new line; a message that starts with \"\"\" ends at a line ending with \"\"\".
Ctrl+X Ctrl+E writes the message in $EDITOR."""


class Printer:
    """Streams reply text to stdout as it comes. On a colour terminal a code block's line is highlighted as it
    grows (redrawn in place while it fits on one row), and its fences are dimmed when they end."""

    def __init__(self, out=None, formatter=None):
        self.out = out or sys.stdout
        self.colour = colour_terminal(self.out)
        self.line = ""
        self.in_code = False
        self.lexer = None
        self.formatter = formatter or terminal_formatter(None)
        self.safe = SafeStream()

    def write(self, text: str):
        text = self.safe.feed(text)
        if not self.colour:
            self.out.write(text)
            self.out.flush()
            return
        while text:
            head, newline, text = text.partition("\n")
            self.line += head
            if head:
                if self.in_code and not self._fence(self.line) and self._fits(self.line):
                    self.out.write("\r\x1b[2K" + self._code(self.line))  # the line so far, highlighted
                else:
                    self.out.write(head)  # prose, and what cannot be redrawn, as it comes
            if newline:
                self._end_line()
                self.out.write("\n")
        self.out.flush()

    def close(self):
        rest = self.safe.flush()  # an unfinished escape sequence at the end: nothing
        if self.colour:
            self.line += rest
            self.out.write(rest)
            if self.line:
                self._end_line()
        else:
            self.out.write(rest)
        self.out.write("\n")
        self.out.flush()

    def _end_line(self):
        """The line is complete: drawn once more as it ends up (a fence dimmed, code highlighted)."""
        line, self.line = self.line, ""
        rendered = self._render(line)
        if rendered != line and self._fits(line):
            self.out.write("\r\x1b[2K" + rendered)

    @staticmethod
    def _fence(line: str) -> bool:
        return line.lstrip().startswith("```")

    @staticmethod
    def _fits(line: str) -> bool:
        return get_cwidth(line) < shutil.get_terminal_size().columns

    def _code(self, line: str) -> str:
        return ansi(line, self.lexer, self.formatter).rstrip("\n")

    def _render(self, line: str) -> str:
        if self._fence(line):
            self.in_code = not self.in_code
            if self.in_code:
                self.lexer = lexer_for(line.strip()[3:].strip())
            return f"\x1b[2m{line}\x1b[0m"
        if self.in_code:
            return self._code(line)
        return line


class Thinking:
    """A reasoning model's thinking, streamed dimmed as it comes, then folded to one line when the answer
    starts (the lines it took are erased, where they are still on the screen)."""

    def __init__(self, out=None):
        self.out = out or sys.stdout
        self.colour = colour_terminal(self.out)
        self.safe = SafeStream()
        self.shown = ""  # what was written, for the rows it took
        self.started: float | None = None
        self.folded = False

    def write(self, piece: str):
        if self.started is None:
            self.started = time.monotonic()
            self._put("thinking: ")
        self._put(self.safe.feed(piece))

    def _put(self, text: str):
        self.shown += text
        self.out.write(f"\x1b[2m{text}\x1b[0m" if self.colour else text)
        self.out.flush()

    def fold(self):
        """End the thinking: one line in its place (said once; nothing when there was none)."""
        if self.started is None or self.folded:
            return
        self.folded = True
        self._put(self.safe.flush())
        seconds = time.monotonic() - self.started
        size = shutil.get_terminal_size()
        rows = sum(max(1, -(-get_cwidth(line) // max(size.columns, 1))) for line in self.shown.split("\n"))
        summary = f"(thought for {seconds:.1f} s; /thinking shows it)"
        if self.out.isatty() and rows < size.lines:
            up = f"\x1b[{rows - 1}A" if rows > 1 else ""
            self.out.write(f"\r{up}\x1b[J")  # back to where the thinking began, and clear below
        else:
            self.out.write("\n")  # scrolled out of reach (or not a terminal): the summary follows it
        self.out.write((f"\x1b[2m{summary}\x1b[0m" if self.colour else summary) + "\n")
        self.out.flush()


def read_message(session, draft: str = "") -> str | None:
    """One message from the user (None at Ctrl+D); `draft` is the input's text to start from (/edit)."""
    try:
        text = session.prompt("you> ", default=draft)
    except EOFError:
        return None
    except Stopped:
        raise
    except KeyboardInterrupt:
        return ""
    if text.lstrip().startswith('"""'):
        lines = [text.lstrip()[3:]]
        while not lines[-1].rstrip().endswith('"""'):
            try:
                lines.append(session.prompt("...  "))
            except Stopped:
                raise
            except (EOFError, KeyboardInterrupt):
                return ""
        text = "\n".join(lines).rstrip()[:-3]
    return text


def run_line_mode(opts: Options) -> int:
    engine = open_engine(opts)
    session = ChatSession(engine, session_settings(opts))
    formatter = terminal_formatter(opts.config.code_style)
    prompts = prompt_session()
    say(f"dschat: {engine.path.name} on {engine.device}. /help for commands, Ctrl+D to leave.", sys.stdout)
    show_messages(session.chat.messages)
    attached = list(opts.files or [])  # -f: files for the first message; /add: for the next
    if attached:
        add_files(session, attached, [])
    draft = ""
    while True:
        text, draft = read_message(prompts, draft), ""
        if text is None:
            print()
            return 0
        if not text.strip():
            continue
        if text.startswith("/"):
            cmd, _, rest = text[1:].partition(" ")
            if cmd in ("exit", "quit"):
                return 0
            if cmd == "edit":
                draft = edit_message(session, rest.strip())
                continue
            turn = command(session, cmd, rest.strip(), attached)
        else:
            text = attach(text, attached)
            turn = None if text is None else start_turn(session, lambda wait: session.turn(text, wait))
        if turn is not None:
            reply(session, turn, formatter, opts.stats)


def start_turn(session: ChatSession, make) -> Turn | None:
    """A turn (`make(wait)`), once no other dschat is answering in this conversation; first the turns saved
    in it meanwhile, which this one follows. None if it cannot start (said why)."""
    try:
        try:
            turn = make(False)
        except ConversationBusy:
            print("(waiting: another dschat is answering in this conversation)", flush=True)
            turn = make(True)
    except Stopped:
        raise
    except KeyboardInterrupt:
        print("(not sent)")
        return None
    except Exception as e:  # a template that refuses the conversation, say
        say(f"(error: {error_text(e)})", sys.stdout)
        return None
    if session.caught_up:
        print("(saved meanwhile by another dschat:)")
        show_messages([{"role": m.role, "content": m.content} for m in session.caught_up])
    return turn


def prompt_session():
    """prompt-toolkit's input, with the prompt history kept in the data directory."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory
    from prompt_toolkit.key_binding import KeyBindings

    keys = KeyBindings()

    @keys.add("escape", "enter")
    def _(event):
        event.current_buffer.insert_text("\n")

    history_file = private_file(private_dir("DATA") / "prompt_history")
    return PromptSession(history=FileHistory(str(history_file)), key_bindings=keys, multiline=False,
                         enable_open_in_editor=True)  # Ctrl+X Ctrl+E: compose in $EDITOR


def show_messages(messages: list[dict]):
    """A conversation opened from the history, as it was said (without escape sequences)."""
    for m in messages:
        if m["role"] != "system":
            print(f"{'you' if m['role'] == 'user' else 'assistant'}> {terminal_safe(m['content'], body=True)}")


def reply(session: ChatSession, turn: Turn, formatter, stats: bool = False):
    """Stream a reply and save it. Ctrl+C stops it (kept, marked) and the chat goes on; SIGTERM and SIGHUP
    stop it the same way, then end dschat. An error (context full, out of memory, ...) is said, and the chat
    goes on; so does a turn the history could not take (kept pending, where the message says)."""
    printer = Printer(formatter=formatter)
    thinking = Thinking()
    answer = session.reply(turn)

    def show(piece: str):
        thinking.fold()  # the answer begins
        printer.write(piece)

    def flush():
        thinking.fold()
        printer.close()
        if answer.error is not None:
            say(f"(error: {error_text(answer.error)})", sys.stdout)

    try:
        answer.run(show, flush, thinking.write)
    except StoreError as e:  # not saved now (kept pending, where the message says): the chat goes on
        answer.kept, answer.notice = True, session.cut_notice(turn)
        with suppress(OSError):
            say(f"(not saved: {error_text(e)})", sys.stdout)
    if isinstance(answer.interrupt, Stopped):
        raise answer.interrupt
    if answer.kept and turn.interrupted and answer.error is None:
        print("(stopped)")
    if answer.kept and answer.notice:
        say(f"({answer.notice})", sys.stdout)
    if answer.kept and stats:
        print_stats(turn.stats or answer.stats)


def attach(text: str, attached: list[str]) -> str | None:
    """The message with the files /add attached, read now (then no longer attached); None, said why, when one
    cannot be read (they stay attached)."""
    if not attached:
        return text
    try:
        message = with_files(text, read_all(attached))
    except AttachmentError as e:
        say(f"(not sent: {error_text(e)}; /drop takes the files back)", sys.stdout)
        return None
    attached.clear()
    return message


def add_files(session: ChatSession, paths: list[str], attached: list[str]):
    """Attach files to the next message, saying what is attached and its size in tokens."""
    try:
        found = read_all(paths)
    except AttachmentError as e:
        say(f"(not attached: {error_text(e)})", sys.stdout)
        return
    attached += [p for p in paths if p not in attached]
    say(f"(attached {describe(found, session.engine.tokenizer)}; sent with your next message)", sys.stdout)


def command(session: ChatSession, cmd: str, arg: str, attached: list[str] | None = None) -> Turn | None:
    """Run a slash command; the turn to answer, for /regen."""
    attached = [] if attached is None else attached
    if cmd == "add":
        if arg:
            add_files(session, [arg], attached)
        else:
            print(f"(attached: {', '.join(attached)})" if attached else "(nothing attached: /add PATH)")
        return None
    if cmd == "drop":
        attached.clear()
        print("(no files attached)")
        return None
    if cmd == "help":
        print(HELP)
    elif cmd == "clear":
        session.new()
        print("(new conversation)")
    elif cmd == "system":
        session.set_system(arg)
        print("(system prompt set)" if arg else "(system prompt cleared)")
    elif cmd == "stats":
        print(stats_json(session.last_stats) if session.last_stats else "(no reply yet)")
    elif cmd == "thinking":
        last = session.last_turn
        print(terminal_safe(last.reasoning, body=True) if last is not None and last.reasoning
              else "(no thinking in the last reply)")
    elif cmd == "regen":
        return start_turn(session, session.regenerate)
    elif cmd == "save":
        save_to(arg, session)
    elif cmd == "load":
        load_from(arg, session)
    else:
        say(f"(unknown command /{cmd}: /help lists them)", sys.stdout)
    return None


def edit_message(session: ChatSession, arg: str) -> str:
    """/edit [N]: take the chat back to before your message N (1-based; the last by default) and return its
    text, for the next input to start from; sent, it is saved as a sibling of that message (a new branch)."""
    msgs = [m for m in session.chat.messages if m["role"] != "system"]
    users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
    if not users:
        print("(nothing to edit yet)")
        return ""
    try:
        n = int(arg) if arg else len(users)
    except ValueError:
        n = 0
    if not 1 <= n <= len(users):
        print(f"(usage: /edit [N], N from 1 to {len(users)})")
        return ""
    text = session.edit(users[n - 1])
    print(f"(editing your message {n} of {len(users)}: Enter sends it as a new branch; the old turns stay saved)")
    return text


def save_to(path: str, session: ChatSession):
    conv_id = session.conversation_id
    if not path or conv_id is None:
        print("(usage: /save FILE, once something has been said)" if not path else "(nothing saved yet)")
        return
    try:
        text = session.store.export_text(conv_id)
        write_conversation(path, text)
    except (OSError, StoreError) as e:  # a bad path is reported; the chat goes on
        say(f"(not saved: {error_text(e)})", sys.stdout)
        return
    say(f"(saved to {path})", sys.stdout)


def load_from(source: str, session: ChatSession):
    """Open a saved conversation by id, or import an exported file and open that (or say why not)."""
    if not source:
        print("(usage: /load ID or /load FILE)")
        return
    try:
        store = session.store
        imported = store.import_json(read_json_file(source)) if names_a_file(source) else None
        conv = store.get(imported or store.resolve_id(source))
    except StoreError as e:
        say(f"(cannot load {source}: {e})", sys.stdout)
        return
    session.open(conv)
    show_messages(session.chat.messages)
