"""One conversation as the app runs it, turn by turn, the same in pipe mode, line mode and the TUI.

A ChatSession owns the Chat (the messages and their exact token ids), the conversation's id in the
history, the saved ids of its last exchange, a pending edit, and --no-save. A turn goes: `turn` (or
`regenerate`, or an edited prompt after `edit_last`), `stream` the reply, then `finish` it: the exchange
is committed and saved at once (an interrupted reply too, marked), or, when the reply failed before its
first token, taken back as if it had never been asked. The history's latent cache is saved beside it, so
that `dschat -c` in a new process starts without a prefill.

A turn in a saved conversation holds it from `turn` (or `regenerate`) to `finish` (turn_lock.py), and first
catches up with the turns another dschat saved in it meanwhile: the session re-reads the conversation and
the turn is asked after them (`caught_up` lists them, for the front end to show), so the saved transcript
is what each turn saw. A prompt being edited (`edit_last`) then becomes a new turn after them.
"""

from __future__ import annotations

import secrets
from typing import Iterator

from .chat import Chat, Turn
from .paths import cache_key_file, kv_dir
from .runtime import Options, sampling_params
from .errors import error_text
from .store import Conversation, Message, Store, StoreError, keep_pending
from .turn_lock import TurnLock


def history_ids(messages) -> list[int] | None:
    """The exact token ids of a saved conversation: the last user message holds the prompt ids of its
    turn, the assistant message after it the ids generated; together they are the whole history."""
    if len(messages) < 2 or messages[-1].role != "assistant" or messages[-2].role != "user":
        return None
    prompt, reply = messages[-2].token_ids, messages[-1].token_ids
    if not prompt or reply is None:
        return None
    return list(prompt) + list(reply)


def saved_conversation(store: Store, conversation_id: str | None) -> Conversation | None:
    """The conversation an id (prefix) names, or the latest one; None if there is none."""
    return store.get(store.resolve_id(conversation_id)) if conversation_id else store.latest()


def continued_chat(tokenizer, conv: Conversation, system: str | None = None, raw: bool = False) -> Chat:
    """A saved conversation as a Chat, with its exact token ids (unless another system prompt is given)."""
    same_system = system is None or system == conv.system
    return Chat(tokenizer, system=conv.system if system is None else system, raw=raw,
                messages=[{"role": m.role, "content": m.content} for m in conv.messages if m.role != "system"],
                history_ids=history_ids(conv.messages) if same_system else None)


def open_chat(tokenizer, opts: Options) -> tuple[Chat, Conversation | None]:
    """The chat a run starts with: a new one, or with -c / --conversation the saved conversation (--system
    replaces its system prompt, in the history too)."""
    if not opts.continuing:
        return Chat(tokenizer, system=opts.system_prompt, raw=opts.raw), None
    with Store() as store:
        conv = saved_conversation(store, opts.conversation)
        if conv is None:
            raise StoreError("there is no saved conversation to continue yet")
        if opts.system is not None and opts.system != conv.system and not opts.no_save:
            store.set_system(conv.id, opts.system)
    return continued_chat(tokenizer, conv, opts.system, opts.raw), conv


def check_history(opts: Options):
    """Before the model loads: a run that will save its turns can (the history and its folder are writable,
    turns.lock is a file), or one line says why and that --no-save chats without saving."""
    if opts.no_save:
        return
    try:
        path = Store.default_path()
        problem = None if Store.writable(path) else "it is read-only"
        lock = path.parent / "turns.lock"
        if problem is None and (lock.exists() or lock.is_symlink()) and not lock.is_file():
            problem = f"{lock} is not a regular file (dschat keeps its turn lock there)"
        if problem is None:
            Store(path).close()  # a corrupt history, one from a newer dschat: said now
    except StoreError as e:
        raise StoreError(f"the history cannot be written: {error_text(e)}; fix that, or pass --no-save to chat "
                         "without saving") from None
    if problem:
        raise StoreError(f"the history cannot be written ({path}): {problem}; fix that, or pass --no-save to chat "
                         "without saving")


class ChatSession:
    def __init__(self, engine, opts: Options):
        self.engine, self.opts = engine, opts
        self.chat, conv = open_chat(engine.tokenizer, opts)
        self.conversation_id: str | None = None  # in the history; None until the first reply is saved
        self.saved_ids: tuple[str | None, str | None] = (None, None)  # the last user and assistant messages
        self.pending_edit: str | None = None  # the saved user message an edited prompt replaces
        self.regenerating = False
        self.opened: Conversation | None = None  # the saved conversation continued, if any
        self.head: str | None = None  # the last message saved in the conversation, as this session knows it
        self.caught_up: list[Message] = []  # what another dschat saved before this turn (see `turn`)
        self.lock = TurnLock()
        if conv is not None:
            self._continue(conv)

    # -- which conversation ------------------------------------------------------------------------------------
    def new(self):
        """A new conversation with the same system prompt (saved with its first reply)."""
        self.chat = Chat(self.engine.tokenizer, system=self.chat.system, raw=self.opts.raw)
        self.conversation_id, self.saved_ids, self.pending_edit, self.opened = None, (None, None), None, None
        self.head = None

    def open(self, conv: Conversation):
        """Continue a saved conversation (the sidebar, /load)."""
        self.chat = continued_chat(self.engine.tokenizer, conv, raw=self.opts.raw)
        self._continue(conv)

    def _continue(self, conv: Conversation):
        self.opened, self.head = conv, conv.head
        if self.chat.ids:  # its latent cache, when an earlier process saved it
            self.engine.load_prefix(self.chat.ids, directory=kv_dir(), secret_file=cache_key_file())
        self.conversation_id = None if self.opts.no_save else conv.id
        msgs = [m for m in conv.messages if m.role != "system"]
        user = next((m.id for m in reversed(msgs) if m.role == "user"), None)
        reply = next((m.id for m in reversed(msgs) if m.role == "assistant"), None)
        self.saved_ids, self.pending_edit = (user, reply), None

    # -- a turn -------------------------------------------------------------------------------------------------
    def turn(self, text: str, wait: bool = True) -> Turn:
        """The next turn: from here to `finish` the saved conversation is held (with `wait` False, another
        run holding it is ConversationBusy rather than a wait)."""
        turn = self._held_turn(lambda: self.chat.turn(text), wait)
        self.regenerating = False
        return turn

    def regenerate(self, wait: bool = True) -> Turn:
        """A new answer to the last prompt; saved as a sibling of the old one."""
        turn = self._held_turn(self.chat.regenerate_turn, wait)
        self.regenerating = True
        return turn

    def _held_turn(self, make, wait: bool) -> Turn:
        self.caught_up = []
        if self.conversation_id is not None:  # saved: hold it (one not saved yet nobody else can reach)
            self.lock.acquire(self.conversation_id, wait)
        try:
            self._catch_up()
            self.chat.context = self.engine.context_length  # a prompt that cannot fit fails before it is tokenized
            return make()
        except BaseException:  # no turn (a template that refuses it, nothing to regenerate): let it go
            self.lock.release()
            raise

    def _catch_up(self):
        """Continue the saved conversation from what is saved now: another dschat may have added turns."""
        if self.conversation_id is None:
            return
        with Store() as store:
            try:
                conv = store.get(self.conversation_id)
            except StoreError:  # its first turn is still pending (the history was busy): nothing to catch up on
                return
        if conv.head != self.head:
            known = [m.id for m in conv.messages]
            start = known.index(self.head) + 1 if self.head in known else 0
            self.open(conv)
            self.caught_up = [m for m in conv.messages[start:] if m.role != "system"]

    def edit_last(self) -> str:
        """Take back the last exchange to edit its prompt (the next turn is saved as a sibling); its text."""
        text = self.chat.rewind()
        self.pending_edit = self.saved_ids[0]
        return text

    def set_system(self, text: str | None):
        self.chat.set_system(text)
        if self.conversation_id:
            with Store() as store:
                store.set_system(self.conversation_id, text or None)

    def stream(self, turn: Turn) -> Iterator[str]:
        """The reply's text as it is generated; turn.stats follows the engine's live figures."""
        tokens = self.engine.generate(turn.prompt_ids, sampling_params(self.opts, self.engine, len(turn.prompt_ids)))
        try:
            for piece in self.chat.stream(turn, tokens):
                turn.stats = self.engine.stats.as_dict()
                yield piece
        finally:
            tokens.close()  # a stopped reply ends the engine's generation now, in this thread
            turn.stats = self.engine.stats.as_dict()

    def cut_notice(self, turn: Turn) -> str | None:
        """What to tell the user when the reply stopped because the context window was full (it used every
        position left and did not end with an end-of-turn token); None otherwise."""
        ids, size = turn.output_ids, self.engine.context_length
        if not ids or turn.interrupted or len(turn.prompt_ids) + len(ids) < size:
            return None
        if ids[-1] in self.engine.eos_token_ids:  # it ended on the last position
            return None
        return f"the reply was cut short: the context window ({size} tokens) is full; start a new conversation"

    def finish(self, turn: Turn, failed: bool = False) -> bool:
        """After the reply ended, was stopped (turn.interrupted) or failed: keep the exchange (committed and
        saved), or, when it has no token and was not stopped by the user, take it back as if it had never been
        asked (a regeneration restores the old answer). Whether it was kept."""
        regenerating, self.regenerating = self.regenerating, False
        try:
            if not turn.output_ids and (failed or not turn.interrupted):
                if regenerating:
                    self.chat.restore()
                return False
            self.chat.commit(turn)
            self.save(turn, answer_of=self.saved_ids[1] if regenerating else None)
            return True
        finally:
            self.lock.release()

    # -- the history -----------------------------------------------------------------------------------------------
    def save(self, turn: Turn, answer_of: str | None = None):
        """Save one exchange at once: the user message with the prompt ids it ran as, the reply with the ids
        generated. `answer_of`: a regenerated answer, a sibling of that assistant message; an edited prompt is
        a sibling of the user message it replaces. When the history cannot be written (busy beyond its wait,
        read-only), the exchange is kept in a pending file that the next dschat to open the history adds to it:
        TurnKept says where."""
        if self.opts.no_save:
            return
        x = self.exchange(turn, answer_of)
        self.conversation_id = x["conversation_id"]
        self.saved_ids, self.pending_edit, self.head = (x["ids"]["user"], x["ids"]["reply"]), None, x["ids"]["reply"]
        store = None
        try:
            store = Store()
            store.save_exchange(x)
        except (StoreError, OSError) as e:
            try:
                path = keep_pending(x, store.path if store else None)
            except (StoreError, OSError) as e2:
                raise StoreError(f"{error_text(e)}; the turn could not be kept either ({error_text(e2)})") from None
            raise TurnKept(f"{error_text(e)}; this turn is kept in {path} and is added to the history the next "
                           "time dschat opens it") from None
        finally:
            if store is not None:
                store.close()
        if self.chat.ids:
            self.engine.save_prefix(self.chat.ids, directory=kv_dir(), secret_file=cache_key_file())  # so that `dschat -c` starts warm

    def exchange(self, turn: Turn, answer_of: str | None) -> dict:
        """What `save` writes, with its ids chosen here (see Store.save_exchange)."""
        cid = self.conversation_id or new_id()
        return {
            "conversation_id": cid,
            "create": None if self.conversation_id else dict(
                model=str(self.opts.model or self.engine.path), fingerprint=self.engine.fingerprint,
                system=self.chat.system, params=self.opts.sampling_flags()),
            "answer_of": answer_of, "pending_edit": self.pending_edit,
            "ids": {"user": self.saved_ids[0] if answer_of else new_id(), "reply": new_id()},
            "user": dict(content=turn.user, token_ids=turn.prompt_ids, prompt_tokens=len(turn.prompt_ids)),
            "reply": dict(content=turn.content, token_ids=turn.output_ids, generated_tokens=len(turn.output_ids),
                          interrupted=turn.interrupted, timings=turn.stats or {}),
        }


class TurnKept(StoreError):
    """The history could not be written; the turn is kept in a pending file (the message says where)."""


def new_id() -> str:
    return secrets.token_hex(4)
