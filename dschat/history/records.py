"""What the history holds and how it fails: a Conversation and its Messages as read back, and the errors and
warnings of the history's modules (store, schema, transfer)."""

from __future__ import annotations

import datetime as dt
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
