"""Conversations in and out of the history as files: export (JSON for import and replay, Markdown for reading),
import, and the checks an export file passes before anything of it is stored or used (import, replay, /load):
its size before it is read, then each field, named when it is wrong. The functions take an open Store."""

from __future__ import annotations

import json
import time
from pathlib import Path

from dschat.files import UnreadableFile, read_regular
from dschat.history.records import StoreError, insert_conversation, insert_message, iso, system_timeline

EXPORT_VERSION = 1

MAX_IMPORT_BYTES = 64 * 2**20  # an export file (its token ids included)
MAX_IMPORT_CHARS = 4 * 2**20  # the text of its messages: more than any model's context window holds
LATEST_TIME = 32503680000.0  # 3000-01-01: later `created` times are mistakes
MAX_NAME_CHARS = 1000  # a title, a model name, a fingerprint
MAX_COUNT = 2**31 - 1  # token counts


def names_a_file(source: str) -> bool:
    """Whether a conversation named on the command line is an exported file (else it is an id)."""
    return Path(source).is_file() or source.endswith(".json")


def read_json_file(path: str) -> dict:
    """An exported conversation file, read (not yet validated: `import_json` does that); its size is
    checked before it is read."""
    try:
        size = Path(path).stat().st_size
        if size > MAX_IMPORT_BYTES:
            raise StoreError(f"{path}: {size:,} bytes is more than a conversation file may hold "
                             f"({MAX_IMPORT_BYTES:,})")
        data = json.loads(read_regular(path, MAX_IMPORT_BYTES).decode("utf-8-sig"))  # a BOM is allowed
    except FileNotFoundError:
        raise StoreError(f"{path}: no such file") from None
    except UnreadableFile as e:  # a FIFO, a directory
        raise StoreError(str(e)) from None
    except RecursionError:
        raise StoreError(f"{path}: not a conversation file (JSON nested too deeply)") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise StoreError(f"{path}: not a conversation file ({e})") from None
    if not isinstance(data, dict):
        raise StoreError(f"{path}: not a conversation file (expected a JSON object)")
    return data


def _shown(value) -> str:
    """A JSON value in a message, shortened."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:39] + "…"


def _check_time(value, field: str):
    """A time in seconds since 1970, or null."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not 0 <= value <= LATEST_TIME):
        raise StoreError(f'{field} must be a time in seconds since 1970 (or null), not {_shown(value)}')


def _check_order(msgs: list[dict]):
    """User and assistant turns taking turns, a user message first; system messages anywhere (one after the
    first turn is the system prompt changed there: `/system` mid-chat)."""
    expected = "user"
    for i, m in enumerate(msgs):
        role = m["role"]
        if role == "system":
            continue
        if role != expected:
            raise StoreError(f'message {i + 1}: "role" is {role} where {expected} comes (system messages first, '
                             f"then user and assistant in turn)")
        expected = "assistant" if role == "user" else "user"


def validate_export(data) -> list[dict]:
    """An exported conversation's messages, checked (import, replay): StoreError naming the first bad field."""
    if not isinstance(data, dict):
        raise StoreError("not a conversation export: expected a JSON object")
    if data.get("version") not in (None, EXPORT_VERSION):
        raise StoreError(f"conversation export version {data.get('version')!r} is not supported")
    msgs = data.get("messages")
    if not isinstance(msgs, list):
        raise StoreError('not a conversation export: "messages" must be a list')
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or \
                not isinstance(m.get("content"), str):
            raise StoreError(f'message {i + 1}: needs "role" (system, user or assistant) and a "content" string')
        ids = m.get("token_ids")
        if ids is not None and (not isinstance(ids, list) or not all(isinstance(t, int) and 0 <= t < 2**31
                                                                      for t in ids)):
            raise StoreError(f'message {i + 1}: "token_ids" must be a list of non-negative integers')
        _check_time(m.get("created"), f'message {i + 1}: "created"')
        for key in ("prompt_tokens", "generated_tokens"):
            n = m.get(key)
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_COUNT):
                raise StoreError(f'message {i + 1}: "{key}" must be a whole number from 0 to {MAX_COUNT} (or null), '
                                 f"not {_shown(n)}")
        if m.get("interrupted") is not None and not isinstance(m["interrupted"], bool):
            raise StoreError(f'message {i + 1}: "interrupted" must be true or false, not {_shown(m["interrupted"])}')
        if m.get("reasoning") is not None and not isinstance(m["reasoning"], str):
            raise StoreError(f'message {i + 1}: "reasoning" must be a string, not {_shown(m["reasoning"])}')
        if m.get("timings") is not None and not isinstance(m["timings"], dict):
            raise StoreError(f'message {i + 1}: "timings" must be an object, not {_shown(m["timings"])}')
    _check_order(msgs)
    chars = sum(len(m["content"]) + len(m.get("reasoning") or "") for m in msgs)
    if chars > MAX_IMPORT_CHARS:
        raise StoreError(f'"messages" hold {chars:,} characters, more than any model\'s context '
                         f"(the limit is {MAX_IMPORT_CHARS:,})")
    for key in ("created", "updated"):
        _check_time(data.get(key), f'"{key}"')
    for key in ("title", "model", "system", "fingerprint"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise StoreError(f'"{key}" must be a string')
        if key != "system" and len(data.get(key) or "") > MAX_NAME_CHARS:
            raise StoreError(f'"{key}" is {len(data[key]):,} characters long; at most {MAX_NAME_CHARS:,}')
    if chars + len(data.get("system") or "") > MAX_IMPORT_CHARS:
        raise StoreError(f'the messages and "system" hold {chars + len(data["system"]):,} characters, more than any '
                         f"model's context (the limit is {MAX_IMPORT_CHARS:,})")
    if data.get("params") is not None and not isinstance(data["params"], dict):
        raise StoreError('"params" must be an object')
    return msgs


# -- export and import ---------------------------------------------------------------------------------------------
def export_json(store, conv_id: str) -> dict:
    """A saved conversation's active branch as an export (`dschat export`, import, replay). "system" is the
    system prompt the next turn uses; where it was changed mid-chat, "messages" say where: a system message
    first (the prompt it began with, "" for none) and one at each change (see `system_changes`)."""
    c = store.get(conv_id)
    changes = dict(system_timeline(c))
    messages = []
    for i, m in enumerate(c.messages + [None]):
        if i in changes:
            messages.append({"role": "system", "content": changes[i],
                             "created": m.created if m is not None else c.updated})
        if m is not None:
            messages.append({"role": m.role, "content": m.content, "token_ids": m.token_ids,
                             "prompt_tokens": m.prompt_tokens, "generated_tokens": m.generated_tokens,
                             "timings": m.timings, "interrupted": m.interrupted, "created": m.created,
                             **({"reasoning": m.reasoning} if m.reasoning else {})})
    return {
        "version": EXPORT_VERSION, "id": c.id, "title": c.title, "model": c.model, "fingerprint": c.fingerprint,
        "system": c.system, "params": c.params, "created": c.created, "updated": c.updated, "messages": messages,
        "branch": branch_of(store, c, messages),
    }


def branch_of(store, c, exported: list[dict]) -> dict:
    """Which branch an export holds: its leaf message's id, and for each message on it that has other versions
    (an edited prompt, a regenerated answer) its place among them: {"message": its number in the export's
    "messages", counted from 1, "version": k, "of": n}. Import ignores it (it keeps the one branch written)."""
    versions = store.versions(c.id)
    numbers = iter(i + 1 for i, m in enumerate(exported) if "token_ids" in m)  # the branch's own (not system changes)
    choices = []
    for m in c.messages:
        n = next(numbers, None)
        k, of = versions.get(m.id, (1, 1))
        if of > 1 and n is not None:
            choices.append({"message": n, "version": k, "of": of})
    return {"leaf": c.head, "versions": choices}


def branch_line(branch: dict) -> str:
    """The branch, as Markdown's header and the TUI's notice say it: "leaf `id`, version 2/3 of message 3"."""
    where = "; ".join(f"version {v['version']}/{v['of']} of message {v['message']}" for v in branch["versions"])
    return f"leaf `{branch['leaf']}`" + (f", {where}" if where else " (the only branch)")


def system_changes(data: dict) -> tuple[str | None, bool]:
    """An export's system prompt at its start, and whether its messages say where it changed: with system
    messages among them, each applies to the messages after it ("" for none) and a first one gives the start;
    without (older exports, a prompt never changed) "system" applies from the start."""
    msgs = data.get("messages") or []
    if not any(m.get("role") == "system" for m in msgs):
        return data.get("system") or None, False
    return (msgs[0]["content"] if msgs[0].get("role") == "system" else data.get("system")) or None, True


def import_json(store, data: dict) -> str:
    """An export added to the history as a new conversation (checked first: StoreError naming the first bad
    field); its id. The title is kept as given."""
    msgs = validate_export(data)
    now = time.time()
    with store.transaction():
        cid = store.new_id("conversations")
        insert_conversation(store.db, cid, title=data["title"] if isinstance(data.get("title"), str) else "Imported chat",
                            title_auto=False, model=data.get("model"), fingerprint=data.get("fingerprint"),
                            system=data.get("system"), params=data.get("params"),
                            created=float(data.get("created") or now), updated=float(data.get("updated") or now))
        parent = None
        start, changed = system_changes(data)
        system = start or ""  # in force, where the export says where it changed (else not recorded: None)
        for m in msgs:
            if changed and m["role"] == "system":  # a change of the system prompt: the messages after it ran under it
                system = m["content"]
                continue
            mid = store.new_id("messages")
            insert_message(store.db, mid, cid, parent, m["role"], m["content"], token_ids=m.get("token_ids"),
                           prompt_tokens=m.get("prompt_tokens"), generated_tokens=m.get("generated_tokens"),
                           timings=m.get("timings"), created=float(m.get("created") or now),
                           interrupted=bool(m.get("interrupted")), reasoning=m.get("reasoning") or "",
                           system=system if changed else None)
            parent = mid
        store.db.execute("UPDATE conversations SET head = ? WHERE id = ?", (parent, cid))
    return cid

def export_text(store, conv_id: str, fmt: str = "json") -> str:
    """The conversation as a file's text: JSON (for import and replay) or Markdown (for reading)."""
    if fmt == "md":
        return export_markdown(store, conv_id)
    return json.dumps(export_json(store, conv_id), ensure_ascii=False, indent=2) + "\n"

def answer_of(content: str) -> str:
    """A reasoning model's saved reply without its thinking: what follows its last </think>."""
    return content.rsplit("</think>", 1)[-1].lstrip()


def export_markdown(store, conv_id: str) -> str:
    """The conversation for reading: its title as a heading, then each message (the text exact)."""
    c = store.get(conv_id)
    lines = [f"# {c.title}", "", f"- model: `{c.model}`", f"- created: {iso(c.created)}",
             f"- updated: {iso(c.updated)}", f"- id: `{c.id}`"]
    branch, versions = branch_of(store, c, export_json(store, conv_id)["messages"]), store.versions(c.id)
    lines += [f"- branch: {branch_line(branch)}"] if branch["versions"] else []
    lines += [""]
    changes = dict(system_timeline(c)) or {0: c.system or ""}
    for i, m in enumerate(c.messages + [None]):
        if i in changes:  # the system prompt it began with, then each change where it happened (/system mid-chat)
            if i == 0:
                lines += ["## System", "", changes[i], ""] if changes[i] else []
            else:
                lines += [f"## System prompt changed ({iso(m.created if m else c.updated)})", "",
                          changes[i] or "(removed: no system prompt from here on)", ""]
        if m is None:
            break
        heading = {"user": "User", "assistant": "Assistant", "system": "System"}[m.role]
        k, of = versions.get(m.id, (1, 1))
        heading += f" (version {k}/{of})" if of > 1 else ""
        lines += [f"## {heading}" + (" (interrupted)" if m.interrupted else ""), ""]
        if m.reasoning:  # the thinking, marked as such, then the answer
            lines += ["> **Thinking**", ">"] + [f"> {line}".rstrip() for line in m.reasoning.splitlines()] + [""]
            lines += [answer_of(m.content), ""]
        else:
            lines += [m.content, ""]
    return "\n".join(lines)
