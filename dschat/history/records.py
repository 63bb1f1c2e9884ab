"""What the history holds and how it fails: a Conversation and its Messages as read back, and the errors and
warnings of the history's modules (store, schema, transfer)."""

from __future__ import annotations

import datetime as dt
import json
from array import array
from dataclasses import dataclass, field


class StoreError(Exception):
    pass


class StoreBusy(StoreError):
    """Another process held the history longer than BUSY_WAIT_S."""


class StoreWarning(UserWarning):
    """Something about the history the user should know (a wait, a pending turn added)."""


@dataclass
class Message:
    id: str
    conversation_id: str
    parent_id: str | None
    role: str
    content: str
    token_ids: list[int] | None = None
    prompt_tokens: int | None = None
    generated_tokens: int | None = None
    timings: dict = field(default_factory=dict)
    created: float = 0.0
    interrupted: bool = False
    reasoning: str = ""  # a reasoning model's thinking (its content holds the whole reply)
    system: str | None = None  # the system prompt it was written under ('' none; None: not recorded)


@dataclass
class Conversation:
    id: str
    title: str  # as stored (the user's, an import's, or the first line of the first message): shown made safe
    model: str
    fingerprint: str
    system: str | None
    params: dict
    created: float
    updated: float
    head: str | None
    messages: list[Message] = field(default_factory=list)


def pack_ids(ids) -> bytes | None:
    """Token ids as stored (a BLOB of 32-bit integers)."""
    return None if ids is None else array("i", [int(i) for i in ids]).tobytes()


def unpack_ids(blob) -> list[int] | None:
    if blob is None:
        return None
    a = array("i")
    a.frombytes(blob)
    return a.tolist()


def iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


# -- rows, as the store's writes and import write them ------------------------------------------------------
def insert_conversation(db, cid: str, *, title: str, title_auto: bool, model: str = "", fingerprint: str = "",
                        system: str | None = None, params: dict | None = None, created: float, updated: float):
    """One conversations row (the store's writes and import share it)."""
    db.execute("INSERT INTO conversations (id, title, title_auto, model, fingerprint, system, params, created, "
               "updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
               (cid, title, int(title_auto), model or "", fingerprint or "", system, json.dumps(params or {}),
                created, updated))


def insert_message(db, mid: str, conv_id: str, parent_id: str | None, role: str, content: str, *, token_ids=None,
                   prompt_tokens=None, generated_tokens=None, timings=None, created: float,
                   interrupted: bool = False, reasoning: str = "", system: str | None = None):
    """One messages row (the store's writes and import share it). `system`: the system prompt in force ('' for
    none; None: not recorded)."""
    db.execute("INSERT INTO messages (id, conversation_id, parent_id, role, content, token_ids, prompt_tokens, "
               "generated_tokens, timings, created, interrupted, reasoning, system) "
               "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
               (mid, conv_id, parent_id, role, content, pack_ids(token_ids), prompt_tokens, generated_tokens,
                json.dumps(timings or {}), created, int(bool(interrupted)), reasoning or "", system))


def system_timeline(conv: Conversation) -> list[tuple[int, str]]:
    """Where the system prompt changed along `conv`'s branch: (index, new prompt, '' for none) pairs, index 0
    the one it began with, len(messages) a change made after the last message (the conversation's `system`,
    which the next turn uses). Empty where it never changed (or nothing was recorded): `conv.system` applies
    from the start."""
    recorded = [m.system for m in conv.messages]
    known = [s for s in recorded if s is not None]
    if not known:
        return []
    now, changes = known[0], [(0, known[0])]
    for i, s in enumerate(recorded + [conv.system or ""]):
        if s is not None and s != now:
            now = s
            changes.append((i, s))
    return changes if len(changes) > 1 else []
