"""One conversation as the app runs it, turn by turn, the same in pipe mode, line mode, the TUI and replay.

A ChatSession owns the Chat (the messages and their exact token ids), the conversation's id in the
history, the saved ids of its last exchange, a pending edit, and whether it saves. It knows nothing of the
command line: what the run asked for comes as a SessionSettings (runtime.session_settings builds one from the
flags and the config file). A turn goes: `turn` (or `regenerate`, or an edited prompt after `edit_last`),
then its reply, driven by `reply(turn)` (reply.py: stream, stop, save, the same for every front end), which
ends in `finish`: the exchange is committed and saved at once (an interrupted reply too, marked), or, when
the reply failed before its first token, taken back as if it had never been asked. The history's latent
cache is saved beside it, so that `dschat -c` in a new process starts without a prefill.

A turn in a saved conversation holds it from `turn` (or `regenerate`) to `finish` (dschat.history.turn_lock), and first
catches up with the turns another dschat saved in it meanwhile: the session re-reads the conversation and
the turn is asked after them (`caught_up` lists them, for the front end to show), so the saved transcript
is what each turn saw. A prompt being edited (`edit_last`) then becomes a new turn after them.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from dschat.conversation.chat import Chat, Turn
from dschat.conversation.context_window import ContextWindow
from dschat.settings.paths import cache_key_file, kv_dir
from dschat.errors import error_text
from dschat.settings.checks import problem
from dschat.history.store import Conversation, Message, Store, StoreError, keep_pending
from dschat.history.turn_lock import TurnLock

BUILT_IN = {"temperature": 0.6, "top_p": 1.0, "top_k": 0}  # where neither the run nor the model sets one


@dataclass(frozen=True)
class Sampling:
    """How replies are sampled. From the run (flags over the config file) every field may be None: not chosen;
    `resolved` fills them from the model's generation_config.json, then the built-in defaults. max_tokens
    stays None when nothing sets it: as many as the context window leaves, at most 2048."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    max_tokens: int | None = None

    def over(self, other: "Sampling") -> "Sampling":
        """These choices, and `other`'s where these have none."""
        return Sampling(**{f.name: getattr(self, f.name) if getattr(self, f.name) is not None
                           else getattr(other, f.name) for f in fields(self)})

    def resolved(self, generation_config: dict, source: Path | str = "generation_config.json") -> "Sampling":
        """Every field chosen (but max_tokens, see above): a field the run left unset comes from the model's
        generation_config.json (`source` names it in errors), checked as the flag is, else the built-in
        default; `do_sample: false` there means greedy unless the run chose a temperature."""
        def model(key: str, default):
            return model_default(generation_config, key, default, source)

        pick = {name: getattr(self, name) if getattr(self, name) is not None else model(name, default)
                for name, default in BUILT_IN.items()}
        if self.temperature is None and generation_config.get("do_sample") is False:
            pick["temperature"] = 0.0
        max_tokens = self.max_tokens if self.max_tokens is not None else model("max_new_tokens", None)
        return Sampling(temperature=float(pick["temperature"]), top_p=float(pick["top_p"]), top_k=int(pick["top_k"]),
                        seed=self.seed, max_tokens=None if max_tokens is None else int(max_tokens))

    def params(self, max_tokens: int):
        """The engine's SamplingParams for a reply of at most `max_tokens` (a resolved Sampling)."""
        from dschat.engine import SamplingParams  # deferred: torch

        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed,
                              max_tokens=max_tokens)


def model_default(generation_config: dict, key: str, default, source: Path | str = "generation_config.json"):
    """A sampling default from a model's generation_config.json (`default` when it has none), checked as the
    flag is: a bad one is a ModelError naming the file (`source`) and the field."""
    value = generation_config.get(key)
    if value is None:
        return default
    why = problem("max_tokens" if key == "max_new_tokens" else key, value)
    if why:
        from dschat.engine import ModelError  # deferred: torch

        raise ModelError(f"{source}: {key!r} {why} (it is {json.dumps(value)})")
    return value


@dataclass(frozen=True)
class SessionSettings:
    """What a ChatSession needs of the run, resolved once (runtime.session_settings: flags over the config file).
    The model's own sampling defaults join them at the first reply (`ChatSession.sampling`)."""

    system: str | None = None  # --system: the system prompt, replacing a continued conversation's
    default_system: str | None = None  # a new conversation's when `system` is None (the config file's)
    raw: bool = False  # plain text completion, no chat template
    no_save: bool = False  # nothing goes into the history
    continue_latest: bool = False  # continue the latest saved conversation
    conversation: str | None = None  # continue this one (an id or a prefix of one)
    model: str | None = None  # the model's name as saved with a new conversation (None: the engine's path)
    sampling: Sampling = field(default_factory=Sampling)  # the run's choices, unresolved
    saved_params: dict = field(default_factory=dict)  # the sampling flags given, saved with a new conversation

    @property
    def system_prompt(self) -> str | None:
        """A new conversation's system prompt."""
        return self.system if self.system is not None else self.default_system

    @property
    def continuing(self) -> bool:
        return self.continue_latest or self.conversation is not None

    def new_conversation(self) -> "SessionSettings":
        """The same, starting a new conversation (nothing to continue)."""
        return replace(self, continue_latest=False, conversation=None)


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


def open_chat(tokenizer, settings: SessionSettings, store: Store | None = None) -> tuple[Chat, Conversation | None]:
    """The chat a run starts with: a new one, or with -c / --conversation the saved conversation (--system
    replaces its system prompt, in the history too). `store`: the history (None: opened for this, and closed)."""
    if not settings.continuing:
        return Chat(tokenizer, system=settings.system_prompt, raw=settings.raw), None
    history = store or Store()
    try:
        conv = saved_conversation(history, settings.conversation)
        if conv is None:
            raise StoreError("there is no saved conversation to continue yet")
        if settings.system is not None and settings.system != conv.system and not settings.no_save:
            history.set_system(conv.id, settings.system)
    finally:
        if store is None:
            history.close()
    return continued_chat(tokenizer, conv, settings.system, settings.raw), conv


def check_history(settings):
    """Before the model loads: a run that will save its turns can (the history and its folder are writable,
    turns.lock is a file), or one line says why and that --no-save chats without saving. `settings`: a run's
    Options or a SessionSettings (its no_save)."""
    if settings.no_save:
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
    """One conversation with one engine (see the module's docstring). The engine is anything with the Engine's
    chat face: tokenizer, context_length, eos_token_ids, generation_config, path, fingerprint, generate() returning
    a Generation, load_prefix() and save_prefix() (tests use dschat.dev.fake_engine.FakeEngine)."""

    def __init__(self, engine, settings: SessionSettings):
        self.engine, self.settings = engine, settings
        self._sampling: Sampling | None = None  # resolved at the first reply
        self.last_stats = None  # the GenerationStats of the last reply
        self.last_turn = None  # the last reply's Turn (its reasoning, for /thinking)
        self._store: Store | None = None  # the history, opened once (see `store`)
        self.chat, conv = open_chat(engine.tokenizer, settings, self.store if settings.continuing else None)
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

    @property
    def store(self) -> Store:
        """The history, opened (and checked) once for the session rather than for each read and write, in the
        thread that first asks: SQLite's connections stay in their thread (the TUI uses it from its UI thread).
        Closed by `close`, and after a write that failed, so that the next opening adds what was kept pending."""
        if self._store is None:
            self._store = Store()
        return self._store

    def close(self):
        """Close the history (it opens again when next asked for)."""
        if self._store is not None:
            self._store.close()
            self._store = None

    # -- which conversation ------------------------------------------------------------------------------------
    def new(self):
        """A new conversation with the same system prompt (saved with its first reply)."""
        self.chat = Chat(self.engine.tokenizer, system=self.chat.system, raw=self.settings.raw)
        self.conversation_id, self.saved_ids, self.pending_edit, self.opened = None, (None, None), None, None
        self.head = None

    def open(self, conv: Conversation):
        """Continue a saved conversation (the sidebar, /load)."""
        self.chat = continued_chat(self.engine.tokenizer, conv, raw=self.settings.raw)
        self._continue(conv)

    def _continue(self, conv: Conversation):
        self.opened, self.head = conv, conv.head
        if self.chat.ids:  # its latent cache, when an earlier process saved it
            self.engine.load_prefix(self.chat.ids, directory=kv_dir(), secret_file=cache_key_file())
        self.conversation_id = None if self.settings.no_save else conv.id
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
            self.chat.window = self.window  # a prompt that cannot fit fails before it is tokenized
            return make()
        except BaseException:  # no turn (a template that refuses it, nothing to regenerate): let it go
            self.lock.release()
            raise

    def _catch_up(self):
        """Continue the saved conversation from what is saved now: another dschat may have added turns."""
        if self.conversation_id is None:
            return
        try:
            conv = self.store.get(self.conversation_id)
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

    def edit(self, index: int) -> str:
        """Take back the conversation from its user message `index` (counted in the messages without the system
        prompt) to edit and resend it: the chat goes back to before it, and the next turn is saved as a sibling
        of it, a new branch (the turns after it stay on the old one). Its text. The last prompt is `edit_last`."""
        msgs = [m for m in self.chat.messages if m["role"] != "system"]
        if not 0 <= index < len(msgs) or msgs[index]["role"] != "user":
            raise ValueError("that is not one of your messages")
        if index == len(msgs) - 2:
            return self.edit_last()
        saved = self._saved_branch()
        if saved is not None and len(saved) == len(msgs):
            before = [m for m in saved[:index]]
            self.chat = Chat(self.engine.tokenizer, system=self.chat.system, raw=self.settings.raw,
                             messages=[{"role": m.role, "content": m.content} for m in before],
                             history_ids=history_ids(before))
            self.saved_ids = (next((m.id for m in reversed(before) if m.role == "user"), None),
                              next((m.id for m in reversed(before) if m.role == "assistant"), None))
            self.pending_edit = saved[index].id
        else:  # not saved (--no-save, or its last turn still pending): no sibling to keep
            self.chat = Chat(self.engine.tokenizer, system=self.chat.system, raw=self.settings.raw,
                             messages=msgs[:index])
            self.pending_edit = None
        return msgs[index]["content"]

    def switch(self, message_id: str):
        """Go to another version of a saved message (a sibling: an edited prompt, a regenerated answer): its
        branch becomes the conversation's active one, later turns and all, and the next turn follows it (its
        prompt is that branch's own; the engine's cache reuses what it shares with the branch it held)."""
        if self.conversation_id is None:
            raise ValueError("nothing saved yet")
        self.store.switch(self.conversation_id, message_id)
        self.open(self.store.get(self.conversation_id))

    def _saved_branch(self) -> list[Message] | None:
        """The active branch as saved, without system messages (None when the conversation is not saved)."""
        if self.conversation_id is None:
            return None
        try:
            conv = self.store.get(self.conversation_id)
        except StoreError:
            return None
        return [m for m in conv.messages if m.role != "system"]

    def set_system(self, text: str | None):
        self.chat.set_system(text)
        if self.conversation_id:
            self.store.set_system(self.conversation_id, self.chat.system)  # None for none, as the chat has it

    # -- a reply ----------------------------------------------------------------------------------------------------
    @property
    def window(self) -> ContextWindow:
        """The engine's context window: whether a prompt fits, how long a reply may be, whether it was cut."""
        return ContextWindow(self.engine.context_length, self.engine.eos_token_ids)

    @property
    def sampling(self) -> Sampling:
        """The run's sampling choices over the model's defaults, resolved once (at the first reply: a bad
        default in the model's generation_config.json is that reply's error)."""
        if self._sampling is None:
            self._sampling = self.settings.sampling.resolved(
                self.engine.generation_config, Path(self.engine.path) / "generation_config.json")
        return self._sampling

    @sampling.setter
    def sampling(self, sampling: Sampling):
        """Sample the next replies so (a resolved Sampling)."""
        self._sampling = sampling

    def generate(self, turn: Turn, stop=None):
        """The engine's Generation of the turn's reply (token ids; its own stats). `stop`: a threading.Event that
        ends it before the engine's next forward pass (a long prefill between its chunks)."""
        n = len(turn.prompt_ids)
        params = self.sampling.params(self.window.max_tokens(n, self.sampling.max_tokens))
        turn.sampling = dict(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
        return self.engine.generate(turn.prompt_ids, params, stop=stop)

    def reply(self, turn: Turn, stop=None):
        """The driver of the turn's reply (reply.py): every front end streams and saves it through this."""
        from dschat.conversation.reply import Reply

        return Reply(self, turn, stop)

    def cut_notice(self, turn: Turn) -> str | None:
        """What to tell the user when the reply stopped because the context window was full; None otherwise."""
        return self.window.cut_notice(len(turn.prompt_ids), turn.output_ids, turn.interrupted)

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
        if self.settings.no_save:
            return
        x = self.exchange(turn, answer_of)
        self.conversation_id = x["conversation_id"]
        self.saved_ids, self.pending_edit, self.head = (x["ids"]["user"], x["ids"]["reply"]), None, x["ids"]["reply"]
        try:
            self.store.save_exchange(x)
        except (StoreError, OSError) as e:
            path = self._store.path if self._store else None
            self.close()  # opened again for the next turn, which first adds what is kept pending
            try:
                path = keep_pending(x, path)
            except (StoreError, OSError) as e2:
                raise StoreError(f"{error_text(e)}; the turn could not be kept either ({error_text(e2)})") from None
            raise TurnKept(f"{error_text(e)}; this turn is kept in {path} and is added to the history the next "
                           "time dschat opens it") from None
        if self.chat.ids:
            self.engine.save_prefix(self.chat.ids, directory=kv_dir(), secret_file=cache_key_file())  # so that `dschat -c` starts warm

    def exchange(self, turn: Turn, answer_of: str | None) -> dict:
        """What `save` writes, with its ids chosen here (see Store.save_exchange)."""
        cid = self.conversation_id or new_id()
        return {
            "conversation_id": cid,
            "create": None if self.conversation_id else dict(
                model=str(self.settings.model or self.engine.path), fingerprint=self.engine.fingerprint,
                system=self.chat.system, params=dict(self.settings.saved_params)),
            "answer_of": answer_of, "pending_edit": self.pending_edit,
            "ids": {"user": self.saved_ids[0] if answer_of else new_id(), "reply": new_id()},
            "user": dict(content=turn.user, token_ids=turn.prompt_ids, prompt_tokens=len(turn.prompt_ids),
                         system=self.chat.system or ""),  # the system prompt it ran under (export places changes)
            "reply": dict(content=turn.content, token_ids=turn.output_ids, generated_tokens=len(turn.output_ids),
                          interrupted=turn.interrupted, timings=turn.stats or {}, reasoning=turn.reasoning,
                          system=self.chat.system or ""),
        }


class TurnKept(StoreError):
    """The history could not be written; the turn is kept in a pending file (the message says where)."""


def new_id() -> str:
    return secrets.token_hex(4)
