"""Glue between a live Chat and the history store: open (-c / --session), save each turn as it ends."""

from __future__ import annotations

from .chat import Chat, Turn
from .runtime import Options
from .store import Store, StoreError


def history_ids(messages) -> list[int] | None:
    """The exact token ids of a saved conversation: the last user message holds the prompt ids of its
    turn, the assistant message after it the ids generated; together they are the whole history."""
    if len(messages) < 2 or messages[-1].role != "assistant" or messages[-2].role != "user":
        return None
    prompt, reply = messages[-2].token_ids, messages[-1].token_ids
    if not prompt or reply is None:
        return None
    return list(prompt) + list(reply)


def chat_from_conversation(engine, conv, system: str | None = None, raw: bool = False) -> Chat:
    msgs = [{"role": m.role, "content": m.content} for m in conv.messages if m.role != "system"]
    return Chat(engine, system=system if system is not None else conv.system, raw=raw, messages=msgs,
                history_ids=history_ids(conv.messages) if system is None or system == conv.system else None)


def saved_conversation(store, session_id: str | None):
    """The conversation `--session ID` names (an id prefix), or the latest one (`-c`); None if there is none."""
    return store.get(store.resolve_id(session_id)) if session_id else store.latest()


def new_conversation(opts: Options, engine, system: str | None) -> str:
    """Create a conversation in the history for this model, system prompt and sampling flags; its id."""
    with Store() as store:
        return store.create(model=str(opts.model or engine.path), fingerprint=engine.fingerprint, system=system,
                            params=opts.sampling_flags())


def open_conversation(opts: Options, engine):
    """(chat, conversation id or None). -c continues the latest conversation, --session ID a given one."""
    if not opts.continuing:
        conv_id = None if opts.no_save else new_conversation(opts, engine, opts.system_prompt)
        return Chat(engine, system=opts.system_prompt, raw=opts.raw), conv_id
    with Store() as store:
        conv = saved_conversation(store, opts.session)
        if conv is None:
            raise StoreError("there is no saved conversation to continue yet")
        chat = chat_from_conversation(engine, conv, system=opts.system, raw=opts.raw)
        if opts.system is not None and opts.system != conv.system:
            store.set_system(conv.id, opts.system)
    if chat.ids:  # the latent cache of this history, if an earlier process saved it
        engine.load_prefix(chat.ids)
    return chat, (None if opts.no_save else conv.id)


def save_turn(conv_id: str | None, chat: Chat, turn: Turn, engine, *, answer_of: str | None = None,
              edit_of: str | None = None) -> tuple[str | None, str | None]:
    """Commit one exchange at once: the user message with the prompt ids it ran as, the reply with the
    ids generated (an interrupted reply is kept and marked). `answer_of`: a regenerated answer, saved as a
    sibling of that assistant message; `edit_of`: an edited prompt, a sibling of that user message.
    Returns (user message id, assistant message id)."""
    if conv_id is None:
        return None, None
    stats = turn.stats or {}
    reply = dict(token_ids=turn.output_ids, generated_tokens=len(turn.output_ids), interrupted=turn.interrupted,
                 timings={k: stats[k] for k in ("ttft_s", "decode_tokens_per_s", "cached_tokens", "draft_tokens",
                                                "accepted_tokens") if k in stats})
    with Store() as store:
        if answer_of:
            user_id = None
            reply_id = store.add_sibling(conv_id, answer_of, "assistant", turn.content, **reply)
        else:
            user = dict(token_ids=turn.prompt_ids, prompt_tokens=len(turn.prompt_ids))
            user_id = (store.add_sibling(conv_id, edit_of, "user", turn.user, **user) if edit_of
                       else store.add_message(conv_id, "user", turn.user, **user))
            reply_id = store.add_message(conv_id, "assistant", turn.content, **reply)
    if chat.ids:
        engine.save_prefix(chat.ids)  # so that `dschat -c` starts without re-prefilling
    return user_id, reply_id
