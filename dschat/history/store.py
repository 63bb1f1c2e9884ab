"""Conversation history: one SQLite file, `$XDG_DATA_HOME/dschat/history.db` (~/.local/share/dschat/).

WAL mode so that several dschat processes can write at once; a schema version (PRAGMA user_version) with
migrations; full-text search (FTS5, trigram: substrings in any script) over message text. Messages form a
tree (each has a parent), so a regenerated answer is a sibling, not an overwrite; a conversation's `head`
is the current leaf and the active branch is the path from the root to it.

A file that is not a database, is corrupt, or comes from a newer dschat is refused with StoreError and
left exactly as it was: nothing is written before the file has been checked.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
import sqlite3
import os
import time
import warnings
from array import array
from dataclasses import dataclass, field
from pathlib import Path

from dschat.files import UnreadableFile, read_regular, regular
from dschat.settings.paths import PRIVATE_DIR, PRIVATE_FILE, private_dir, private_file, tighten, xdg
from dschat.terminal.text import terminal_safe

SCHEMA = 1
EXPORT_VERSION = 1

MIGRATIONS = {
    # version -> statements that bring a database from version-1 to version
    1: [
        """CREATE TABLE conversations (
            id TEXT PRIMARY KEY,
            title TEXT NOT NULL,
            title_auto INTEGER NOT NULL DEFAULT 1,
            model TEXT NOT NULL DEFAULT '',
            fingerprint TEXT NOT NULL DEFAULT '',
            system TEXT,
            params TEXT NOT NULL DEFAULT '{}',
            created REAL NOT NULL,
            updated REAL NOT NULL,
            head TEXT)""",
        """CREATE TABLE messages (
            id TEXT PRIMARY KEY,
            conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            parent_id TEXT,
            role TEXT NOT NULL,
            content TEXT NOT NULL,
            token_ids BLOB,
            prompt_tokens INTEGER,
            generated_tokens INTEGER,
            timings TEXT NOT NULL DEFAULT '{}',
            created REAL NOT NULL,
            interrupted INTEGER NOT NULL DEFAULT 0)""",
        "CREATE INDEX messages_by_conversation ON messages(conversation_id)",
        "CREATE INDEX conversations_by_update ON conversations(updated)",
        "CREATE VIRTUAL TABLE messages_fts USING fts5(content, content='messages', content_rowid='rowid', "
        "tokenize='trigram')",
        """CREATE TRIGGER messages_ai AFTER INSERT ON messages BEGIN
            INSERT INTO messages_fts(rowid, content) VALUES (new.rowid, new.content); END""",
        """CREATE TRIGGER messages_ad AFTER DELETE ON messages BEGIN
            INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.rowid, old.content); END""",
        """CREATE TRIGGER messages_au AFTER UPDATE ON messages BEGIN
            INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.rowid, old.content);
            INSERT INTO messages_fts(rowid, content) VALUES (new.rowid, new.content); END""",
    ],
}


class StoreError(Exception):
    pass


class StoreBusy(StoreError):
    """Another process held the history longer than BUSY_WAIT_S."""


class StoreWarning(UserWarning):
    """Something about the history the user should know (a wait, a pending turn added)."""


# A writer waits BUSY_NOTICE_S for the history quietly, then says so and waits until BUSY_WAIT_S in all; a turn
# that still cannot be saved is kept as a pending file (PENDING_DIR beside the history) and added to the history
# the next time dschat opens it.
BUSY_NOTICE_S = 5.0
OPEN_WAIT_S = 30.0  # opening (a new history's set-up by two runs at once)
BUSY_WAIT_S = 300.0
PENDING_DIR = "pending"


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


@dataclass
class Conversation:
    id: str
    title: str
    model: str
    fingerprint: str
    system: str | None
    params: dict
    created: float
    updated: float
    head: str | None
    messages: list[Message] = field(default_factory=list)


def _pack(ids) -> bytes | None:
    return None if ids is None else array("i", [int(i) for i in ids]).tobytes()


def _unpack(blob) -> list[int] | None:
    if blob is None:
        return None
    a = array("i")
    a.frombytes(blob)
    return a.tolist()


def like(text: str) -> str:
    """`text` matched literally in a LIKE pattern (ESCAPE '\\')."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def auto_title(text: str) -> str:
    """The first line of the first message, shortened, without escape sequences or control characters."""
    line = next((ln.strip() for ln in terminal_safe(text, body=True).splitlines() if ln.strip()), "")
    return line if len(line) <= 60 else line[:59].rstrip() + "…"


def iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


class Store:
    """The history: saved conversations and their messages as a tree (siblings for regenerated answers and
    edited prompts; a conversation's head names its active branch), in one SQLite file in the user's data
    directory. Opening checks the file before anything is written, then migrates its schema; a ChatSession
    keeps one open for its run. Also search, export and import."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else self.default_path()
        self.db = self._open()

    @staticmethod
    def default_path() -> Path:
        """The history in the user's data directory (made, or tightened, private; one that cannot be changed,
        on a read-only file system say, is read as it is)."""
        try:
            return private_dir("DATA") / "history.db"
        except OSError as e:
            d = xdg("DATA")
            if d.is_dir():
                return d / "history.db"
            raise StoreError(f"{d}: cannot make the history's folder ({e.strerror or e})") from None

    # -- opening: check first, write after ---------------------------------------------------------------------
    @staticmethod
    def writable(path: Path) -> bool:
        """Whether the history at `path` (and its folder, for its -wal, -shm and pending files) can be written."""
        if path.exists() and not os.access(path, os.W_OK):
            return False
        return os.access(path.parent, os.W_OK | os.X_OK)

    def _check_files(self):
        """The history and its -wal and -shm files, where they exist, are regular files (through symlinks), checked
        before SQLite opens them: SQLite would wait forever on a FIFO, and delete a FIFO named like its -wal."""
        for f in (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm")):
            try:
                regular(f)
            except FileNotFoundError:
                continue
            except UnreadableFile as e:  # a FIFO, a directory, a device, a socket
                raise StoreError(f"{e} (dschat keeps its history there)") from None
            except OSError:
                continue  # a loop of links, no permission: opening says so

    def _open(self) -> sqlite3.Connection:
        self._check_files()
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        self.read_only = not fresh and not self.writable(self.path)
        if fresh:
            self.path.parent.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
            private_file(self.path)
        try:
            if self.read_only:  # reading works on a read-only history (writing says why not)
                db = self._open_read_only()
            else:
                # check_same_thread=False: the TUI saves a turn in a worker thread (a busy history must not stop
                # its screen) and reads on its UI thread, never both at once; SQLite serializes the calls
                db = sqlite3.connect(str(self.path), timeout=OPEN_WAIT_S, isolation_level=None,
                                     check_same_thread=False)
        except sqlite3.Error as e:
            raise StoreError(f"{self.path}: cannot open the history ({e})") from None
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if not fresh:
                tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                if version > SCHEMA:
                    raise StoreError(f"{self.path}: the history was written by a newer dschat (schema {version}, "
                                     f"this one knows {SCHEMA}); upgrade dschat to read it")
                if version == 0 and not tables:
                    fresh = True  # an empty database: another dschat is creating the history right now
                elif version == 0 or not {"conversations", "messages"} <= tables:
                    raise StoreError(f"{self.path}: not a dschat history database")
                check = "ok" if fresh else db.execute("PRAGMA quick_check").fetchone()[0]
                if check != "ok":
                    raise StoreError(f"{self.path}: the history database is corrupt ({check})")
        except StoreError:
            db.close()
            raise
        except sqlite3.DatabaseError as e:
            db.close()
            raise StoreError(f"{self.path}: the history is not a readable database ({e})") from None
        if self.read_only:
            self.db = db
            return db
        # Checked: from here on we may write.
        for f in (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm")):
            if f.exists():
                tighten(f, PRIVATE_FILE)
        db.execute("PRAGMA foreign_keys = ON")
        if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            db.execute("PRAGMA journal_mode = WAL")  # a new history made by two runs at once: waits OPEN_WAIT_S
        if version < SCHEMA:
            self._migrate(db)
        db.execute(f"PRAGMA busy_timeout = {int(BUSY_NOTICE_S * 1000)}")  # writes: see _Transaction
        self.db = db
        self.replay_pending()
        return db

    # -- turns kept while the history could not be written ---------------------------------------------------------
    def pending_dir(self) -> Path:
        return self.path.parent / PENDING_DIR

    def replay_pending(self):
        """Add the turns kept pending (oldest first) and remove their files; one that cannot be added yet stays
        (a warning says why)."""
        d = self.pending_dir()
        try:
            files = sorted(d.glob("*.json")) if d.is_dir() else []
        except OSError:
            return
        for f in files:
            try:
                self.save_exchange(json.loads(f.read_text(encoding="utf-8")), wait=False)
                f.unlink()
            except FileNotFoundError:
                continue  # another dschat added it meanwhile
            except StoreError:
                return  # busy or read-only now: kept for next time
            except (OSError, ValueError, KeyError, TypeError) as e:
                warnings.warn(f"a turn kept in {f} cannot be added to the history: {e}", StoreWarning, stacklevel=2)
                continue
            warnings.warn(f"a turn kept in {f} while the history could not be written is added to it now",
                          StoreWarning, stacklevel=2)

    def _open_read_only(self) -> sqlite3.Connection:
        """The history opened for reading only. Where its folder cannot be written and no -shm file is there,
        SQLite cannot share the WAL index: the file is read as it stands (immutable; nobody can write it)."""
        uri = self.path.resolve().as_uri()
        shm = Path(f"{self.path}-shm")
        mode = "ro" if shm.exists() and os.access(shm, os.W_OK) else "ro&immutable=1"
        return sqlite3.connect(f"{uri}?mode={mode}", uri=True, timeout=BUSY_NOTICE_S, isolation_level=None,
                               check_same_thread=False)

    def _migrate(self, db: sqlite3.Connection):
        db.execute("BEGIN IMMEDIATE")
        try:
            current = db.execute("PRAGMA user_version").fetchone()[0]  # another process may have done it
            for v in range(current + 1, SCHEMA + 1):
                for stmt in MIGRATIONS[v]:
                    db.execute(stmt)
            db.execute(f"PRAGMA user_version = {SCHEMA}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def close(self):
        self.db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc):
        self.close()

    def _tx(self, wait: bool = True):
        return _Transaction(self.db, self.path, wait)

    # -- ids ---------------------------------------------------------------------------------------------------------
    def _new_id(self, table: str) -> str:
        while True:
            i = secrets.token_hex(4)
            if not self.db.execute(f"SELECT 1 FROM {table} WHERE id = ?", (i,)).fetchone():
                return i

    def resolve_id(self, prefix: str) -> str:
        prefix = (prefix or "").strip().lower()
        rows = [r[0] for r in self.db.execute(
            "SELECT id FROM conversations WHERE id LIKE ? ESCAPE '\\' LIMIT 3", (like(prefix) + "%",))] if prefix else []
        if not rows:
            raise StoreError(f"no saved conversation with id {prefix!r} (see `dschat conversations`)")
        if len(rows) > 1 and prefix not in rows:
            raise StoreError(f"id {prefix!r} is ambiguous ({', '.join(rows[:2])}, ...): give more of it")
        return prefix if prefix in rows else rows[0]

    # -- writing -------------------------------------------------------------------------------------------------------
    def create(self, model: str, fingerprint: str = "", system: str | None = None, params: dict | None = None,
               title: str | None = None) -> str:
        now = time.time()
        with self._tx():
            cid = self._new_id("conversations")
            self.db.execute(
                "INSERT INTO conversations (id, title, title_auto, model, fingerprint, system, params, created, "
                "updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (cid, title or "New chat", 0 if title else 1, model or "", fingerprint or "", system,
                 json.dumps(params or {}), now, now))
        return cid

    def add_message(self, conv_id: str, role: str, content: str, *, parent_id: str | None = None,
                    token_ids=None, prompt_tokens=None, generated_tokens=None, timings=None,
                    interrupted: bool = False, _use_head: bool = True) -> str:
        with self._tx():
            return self._add(conv_id, role, content, parent_id=parent_id, token_ids=token_ids,
                             prompt_tokens=prompt_tokens, generated_tokens=generated_tokens, timings=timings,
                             interrupted=interrupted, _use_head=_use_head)

    def _add(self, conv_id: str, role: str, content: str, *, parent_id: str | None = None, token_ids=None,
             prompt_tokens=None, generated_tokens=None, timings=None, interrupted: bool = False,
             _use_head: bool = True, mid: str | None = None) -> str:
        """add_message inside a transaction; `mid` a message id chosen before (a pending turn's)."""
        if role not in ("system", "user", "assistant"):
            raise StoreError(f"unknown message role {role!r}")
        now = time.time()
        row = self.db.execute("SELECT head, title_auto FROM conversations WHERE id = ?", (conv_id,)).fetchone()
        if row is None:
            raise StoreError(f"no saved conversation with id {conv_id!r}")
        head, title_auto = row
        if parent_id is None and _use_head:
            parent_id = head
        mid = mid or self._new_id("messages")
        self.db.execute(
            "INSERT INTO messages (id, conversation_id, parent_id, role, content, token_ids, prompt_tokens, "
            "generated_tokens, timings, created, interrupted) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (mid, conv_id, parent_id, role, content, _pack(token_ids), prompt_tokens, generated_tokens,
             json.dumps(timings or {}), now, int(bool(interrupted))))
        self.db.execute("UPDATE conversations SET head = ?, updated = ? WHERE id = ?", (mid, now, conv_id))
        if title_auto and role == "user" and content.strip():
            first_user = self.db.execute(
                "SELECT COUNT(*) FROM messages WHERE conversation_id = ? AND role = 'user'",
                (conv_id,)).fetchone()[0] == 1
            if first_user:
                self.db.execute("UPDATE conversations SET title = ? WHERE id = ?", (auto_title(content), conv_id))
        return mid

    def save_exchange(self, x: dict, wait: bool = True):
        """One turn, in one transaction: x is a `session.exchange` (the ids in it chosen before, so that saving
        it twice, a pending turn replayed by two processes at once, saves it once). With `wait` False, a busy
        history is StoreBusy at once."""
        with self._tx(wait):
            cid, ids = x["conversation_id"], x["ids"]
            if self.db.execute("SELECT 1 FROM messages WHERE id = ?", (ids["reply"],)).fetchone():
                return  # saved already
            if not self.db.execute("SELECT 1 FROM conversations WHERE id = ?", (cid,)).fetchone():
                now = time.time()
                c = x["create"] or {}
                self.db.execute(
                    "INSERT INTO conversations (id, title, title_auto, model, fingerprint, system, params, created, "
                    "updated) VALUES (?, ?, 1, ?, ?, ?, ?, ?, ?)",
                    (cid, "New chat", c.get("model") or "", c.get("fingerprint") or "", c.get("system"),
                     json.dumps(c.get("params") or {}), now, now))

            def sibling_parent(of):
                row = self.db.execute("SELECT parent_id FROM messages WHERE id = ? AND conversation_id = ?",
                                      (of, cid)).fetchone()
                return (row[0], row[0] is not None) if row else (None, True)

            user_id = ids["user"]
            if x.get("answer_of"):
                parent, use_head = sibling_parent(x["answer_of"])
            else:
                if self.db.execute("SELECT 1 FROM messages WHERE id = ?", (user_id,)).fetchone() is None:
                    up, uh = sibling_parent(x["pending_edit"]) if x.get("pending_edit") else (None, True)
                    self._add(cid, "user", x["user"]["content"], parent_id=up, _use_head=uh, mid=user_id,
                              **{k: v for k, v in x["user"].items() if k != "content"})
                parent, use_head = user_id, True
            self._add(cid, "assistant", x["reply"]["content"], parent_id=parent, _use_head=use_head,
                      mid=ids["reply"], **{k: v for k, v in x["reply"].items() if k != "content"})

    def add_sibling(self, conv_id: str, of_message_id: str, role: str, content: str, **kwargs) -> str:
        """A new version of a message (regenerate): same parent, and it becomes the head."""
        row = self.db.execute("SELECT parent_id FROM messages WHERE id = ? AND conversation_id = ?",
                              (of_message_id, conv_id)).fetchone()
        if row is None:
            raise StoreError(f"no message {of_message_id!r} in conversation {conv_id!r}")
        return self.add_message(conv_id, role, content, parent_id=row[0], _use_head=row[0] is not None, **kwargs)

    def rename(self, conv_id: str, title: str):
        if len(title) > MAX_NAME_CHARS:
            raise StoreError(f"a title of {len(title):,} characters is too long (at most {MAX_NAME_CHARS:,})")
        with self._tx():
            n = self.db.execute("UPDATE conversations SET title = ?, title_auto = 0 WHERE id = ?",
                                (title, conv_id)).rowcount
        if not n:
            raise StoreError(f"no saved conversation with id {conv_id!r}")

    def set_system(self, conv_id: str, system: str | None):
        with self._tx():
            self.db.execute("UPDATE conversations SET system = ?, updated = ? WHERE id = ?",
                            (system, time.time(), conv_id))

    def delete(self, conv_id: str):
        with self._tx():
            self.db.execute("DELETE FROM messages WHERE conversation_id = ?", (conv_id,))
            n = self.db.execute("DELETE FROM conversations WHERE id = ?", (conv_id,)).rowcount
        if not n:
            raise StoreError(f"no saved conversation with id {conv_id!r}")

    # -- reading ---------------------------------------------------------------------------------------------------------
    def get(self, conv_id: str) -> Conversation:
        row = self.db.execute("SELECT id, title, model, fingerprint, system, params, created, updated, head "
                              "FROM conversations WHERE id = ?", (conv_id,)).fetchone()
        if row is None:
            raise StoreError(f"no saved conversation with id {conv_id!r}")
        conv = Conversation(row[0], row[1], row[2], row[3], row[4], json.loads(row[5] or "{}"), row[6], row[7], row[8])
        conv.messages = self.branch(conv_id, conv.head)
        return conv

    def branch(self, conv_id: str, head: str | None) -> list[Message]:
        """The messages from the root to `head`."""
        by_id = {m.id: m for m in self._messages(conv_id)}
        out, seen = [], set()
        while head is not None and head in by_id and head not in seen:
            seen.add(head)
            out.append(by_id[head])
            head = by_id[head].parent_id
        return out[::-1]

    def siblings(self, message_id: str) -> list[Message]:
        row = self.db.execute("SELECT conversation_id, parent_id FROM messages WHERE id = ?", (message_id,)).fetchone()
        if row is None:
            return []
        return [m for m in self._messages(row[0]) if m.parent_id == row[1]]

    def _messages(self, conv_id: str) -> list[Message]:
        rows = self.db.execute(
            "SELECT id, conversation_id, parent_id, role, content, token_ids, prompt_tokens, generated_tokens, "
            "timings, created, interrupted FROM messages WHERE conversation_id = ? ORDER BY rowid", (conv_id,))
        return [Message(r[0], r[1], r[2], r[3], r[4], _unpack(r[5]), r[6], r[7], json.loads(r[8] or "{}"), r[9],
                        bool(r[10])) for r in rows]

    def latest(self) -> Conversation | None:
        row = self.db.execute("SELECT id FROM conversations ORDER BY updated DESC LIMIT 1").fetchone()
        return self.get(row[0]) if row else None

    def list(self, search: str | None = None, limit: int | None = None) -> list[dict]:
        """Newest first: id, title, model, updated (and updated_iso), created, messages (on the active branch)."""
        if search:
            ids = set(self._search(search))
            rows = [r for r in self._all_rows() if r[0] in ids]
        else:
            rows = self._all_rows()
        if limit is not None:
            rows = rows[:max(0, limit)]
        out = []
        for cid, title, model, created, updated, head in rows:
            n = self._branch_length(cid, head)
            out.append({"id": cid, "title": title, "model": model, "updated": updated, "updated_iso": iso(updated),
                        "created": created, "messages": n})
        return out

    def _branch_length(self, conv_id: str, head: str | None) -> int:
        """len(self.branch(conv_id, head)), counted in SQL (UNION stops at a parent loop, as branch does)."""
        if head is None:
            return 0
        return self.db.execute(
            "WITH RECURSIVE up(id, parent_id) AS ("
            " SELECT id, parent_id FROM messages WHERE id = ?1 AND conversation_id = ?2"
            " UNION SELECT m.id, m.parent_id FROM messages m JOIN up ON m.id = up.parent_id"
            " WHERE m.conversation_id = ?2) SELECT count(*) FROM up", (head, conv_id)).fetchone()[0]

    def _all_rows(self):
        return self.db.execute("SELECT id, title, model, created, updated, head FROM conversations "
                               "ORDER BY updated DESC").fetchall()

    def _search(self, text: str) -> list[str]:
        pattern = f"%{like(text)}%"
        ids = [r[0] for r in self.db.execute("SELECT id FROM conversations WHERE title LIKE ? ESCAPE '\\'",
                                             (pattern,))]
        if len(text) >= 3:  # the trigram index needs three characters
            phrase = '"' + text.replace('"', '""') + '"'
            ids += [r[0] for r in self.db.execute(
                "SELECT DISTINCT m.conversation_id FROM messages_fts f JOIN messages m ON m.rowid = f.rowid "
                "WHERE messages_fts MATCH ?", (phrase,))]
        else:
            ids += [r[0] for r in self.db.execute(
                "SELECT DISTINCT conversation_id FROM messages WHERE content LIKE ? ESCAPE '\\'", (pattern,))]
        return ids

    # -- export / import -------------------------------------------------------------------------------------------------
    def export_json(self, conv_id: str) -> dict:
        c = self.get(conv_id)
        return {
            "version": EXPORT_VERSION, "id": c.id, "title": c.title, "model": c.model, "fingerprint": c.fingerprint,
            "system": c.system, "params": c.params, "created": c.created, "updated": c.updated,
            "messages": [{"role": m.role, "content": m.content, "token_ids": m.token_ids,
                          "prompt_tokens": m.prompt_tokens, "generated_tokens": m.generated_tokens,
                          "timings": m.timings, "interrupted": m.interrupted, "created": m.created}
                         for m in c.messages],
        }

    def import_json(self, data: dict) -> str:
        msgs = validate_export(data)
        now = time.time()
        with self._tx():
            cid = self._new_id("conversations")
            self.db.execute(
                "INSERT INTO conversations (id, title, title_auto, model, fingerprint, system, params, created, "
                "updated) VALUES (?, ?, 0, ?, ?, ?, ?, ?, ?)",
                (cid, data["title"] if isinstance(data.get("title"), str) else "Imported chat", data.get("model") or "", data.get("fingerprint") or "",
                 data.get("system"), json.dumps(data.get("params") or {}), float(data.get("created") or now),
                 float(data.get("updated") or now)))
            parent = None
            for m in msgs:
                mid = self._new_id("messages")
                self.db.execute(
                    "INSERT INTO messages (id, conversation_id, parent_id, role, content, token_ids, prompt_tokens, "
                    "generated_tokens, timings, created, interrupted) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (mid, cid, parent, m["role"], m["content"], _pack(m.get("token_ids")), m.get("prompt_tokens"),
                     m.get("generated_tokens"), json.dumps(m.get("timings") or {}),
                     float(m.get("created") or now), int(bool(m.get("interrupted")))))
                parent = mid
            self.db.execute("UPDATE conversations SET head = ? WHERE id = ?", (parent, cid))
        return cid

    def export_text(self, conv_id: str, fmt: str = "json") -> str:
        """The conversation as a file's text: JSON (for import and replay) or Markdown (for reading)."""
        if fmt == "md":
            return self.export_markdown(conv_id)
        return json.dumps(self.export_json(conv_id), ensure_ascii=False, indent=2) + "\n"

    def export_markdown(self, conv_id: str) -> str:
        c = self.get(conv_id)
        lines = [f"# {c.title}", "", f"- model: `{c.model}`", f"- created: {iso(c.created)}",
                 f"- updated: {iso(c.updated)}", f"- id: `{c.id}`", ""]
        if c.system:
            lines += ["## System", "", c.system, ""]
        for m in c.messages:
            heading = {"user": "User", "assistant": "Assistant", "system": "System"}[m.role]
            lines += [f"## {heading}" + (" (interrupted)" if m.interrupted else ""), "", m.content, ""]
        return "\n".join(lines)


def keep_pending(exchange: dict, history: Path | None = None) -> Path:
    """Write a turn that could not be saved into the pending folder beside the history (private); its path."""
    d = (history or Store.default_path()).parent / PENDING_DIR
    d.mkdir(mode=PRIVATE_DIR, exist_ok=True)
    path = d / f"{time.time_ns()}-{exchange['ids']['reply']}.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(exchange, f)
    return path


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, so that concurrent writers queue (busy timeout) instead of failing."""

    def __init__(self, db: sqlite3.Connection, path: Path, wait: bool = True):
        self.db, self.path, self.wait = db, path, wait

    def __enter__(self):
        start, told = time.monotonic(), False
        while True:
            try:
                if not self.wait:
                    self.db.execute("PRAGMA busy_timeout = 0")
                self.db.execute("BEGIN IMMEDIATE")  # waits BUSY_NOTICE_S for another writer (busy_timeout)
                return self
            except sqlite3.OperationalError as e:
                if not self.wait:
                    self.db.execute(f"PRAGMA busy_timeout = {int(BUSY_NOTICE_S * 1000)}")
                busy = "locked" in str(e) or "busy" in str(e)
                if not busy:
                    raise StoreError(f"{self.path}: the history cannot be written ({e})") from None
                if not self.wait or time.monotonic() - start >= BUSY_WAIT_S:
                    raise StoreBusy(f"{self.path}: the history is busy: another process has held it for "
                                    f"{BUSY_WAIT_S:g} s") from None
                if not told:
                    told = True
                    warnings.warn(f"the history ({self.path}) is busy: another process is writing it; "
                                  f"waiting up to {BUSY_WAIT_S:g} s", StoreWarning, stacklevel=2)

    def __exit__(self, kind, value, tb):
        if not self.wait:
            self.db.execute(f"PRAGMA busy_timeout = {int(BUSY_NOTICE_S * 1000)}")
        if kind is None:
            self.db.execute("COMMIT")
        else:
            self.db.execute("ROLLBACK")
            if isinstance(value, sqlite3.DatabaseError):
                raise StoreError(f"{self.path}: could not write the history ({value})") from None
        return False


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
    """System messages first, then user and assistant turns taking turns, a user message first."""
    expected = "user"
    for i, m in enumerate(msgs):
        role = m["role"]
        if role == "system" and all(p["role"] == "system" for p in msgs[:i]):
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
        if m.get("timings") is not None and not isinstance(m["timings"], dict):
            raise StoreError(f'message {i + 1}: "timings" must be an object, not {_shown(m["timings"])}')
    _check_order(msgs)
    chars = sum(len(m["content"]) for m in msgs)
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
