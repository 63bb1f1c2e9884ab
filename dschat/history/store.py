"""Conversation history: one SQLite file, `$XDG_DATA_HOME/dschat/history.db` (~/.local/share/dschat/).

WAL mode so that several dschat processes can write at once; the schema comes from named migrations
(schema.py); full-text search (FTS5, trigram: substrings in any script) over message text. Messages form a
tree (each has a parent), so a regenerated answer is a sibling, not an overwrite; a conversation's `head`
is the current leaf and the active branch is the path from the root to it. Here: opening (checks, then
migrations), the turns kept pending, writing, reading and search; export and import are transfer.py's.

A file that is not a database, is corrupt, or comes from a newer dschat is refused with StoreError and
left exactly as it was: nothing is written before the file has been checked.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import time
import warnings
from pathlib import Path

from dschat.files import UnreadableFile, regular
from dschat.history import schema, transfer
from dschat.history.records import (Conversation, Message, StoreBusy, StoreError, StoreWarning, insert_conversation,
                                    insert_message, iso, unpack_ids)
from dschat.history.transfer import MAX_NAME_CHARS
from dschat.settings.paths import PRIVATE_DIR, PRIVATE_FILE, private_dir, private_file, tighten, xdg
from dschat.terminal.text import terminal_safe

__all__ = ["Store", "StoreError", "StoreBusy", "StoreWarning", "Conversation", "Message", "keep_pending"]

# A writer waits BUSY_NOTICE_S for the history quietly, then says so and waits until BUSY_WAIT_S in all; a turn
# that still cannot be saved is kept as a pending file (PENDING_DIR beside the history) and added to the history
# the next time dschat opens it.
BUSY_NOTICE_S = 5.0
OPEN_WAIT_S = 30.0  # opening (a new history's set-up by two runs at once)
BUSY_WAIT_S = 300.0
PENDING_DIR = "pending"


def like(text: str) -> str:
    """`text` matched literally in a LIKE pattern (ESCAPE '\\')."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


TITLE_CHARS = 60  # an automatic title: the first line of the first message, up to this many characters shown


def auto_title(text: str) -> str:
    """The first line of the first message that shows any text, shortened to TITLE_CHARS characters as a
    terminal shows them (escape sequences and control characters count for nothing). What is stored is the
    message's own text, a prefix of that line: escape sequences and all; where a title is shown it is made
    safe (terminal_safe)."""
    for line in text.splitlines():
        if terminal_safe(line, body=True).strip():
            break
    else:
        return ""
    line = line.strip()[:64 * TITLE_CHARS]  # enough for any shortening; a longer line is cut anyway

    def shown(n: int) -> int:
        return len(terminal_safe(line[:n], body=True).strip())

    if shown(len(line)) <= TITLE_CHARS and len(line) < 64 * TITLE_CHARS:
        return line
    lo, hi = 1, len(line)  # the shortest prefix that shows TITLE_CHARS - 1 characters (it ends on one)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if shown(mid) >= TITLE_CHARS - 1 else (mid + 1, hi)
    return line[:lo].rstrip() + "…"


class Store:
    """The history: saved conversations and their messages as a tree (siblings for regenerated answers and
    edited prompts; a conversation's head names its active branch), in one SQLite file in the user's data
    directory. Opening checks the file before anything is written, then migrates its schema (schema.py); a
    ChatSession keeps one open for its run. Also search; export and import are transfer.py's."""

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
            # the version and the tables from one snapshot: another dschat creating the history may commit its
            # schema between two separate reads (version 0, then every table: "not a dschat history")
            db.execute("BEGIN")
            try:
                version = schema.version(db)
                tables = set() if fresh else {
                    r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            finally:
                db.execute("ROLLBACK")  # it only read
            if not fresh:
                if version > schema.known():
                    raise StoreError(f"{self.path}: the history was written by a newer dschat (schema {version}, "
                                     f"this one knows {schema.known()}); upgrade dschat to read it")
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
        if version < schema.known():
            schema.migrate(db)
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

    def close(self):
        self.db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc):
        self.close()

    def transaction(self, wait: bool = True):
        """A write: BEGIN IMMEDIATE ... COMMIT (ROLLBACK on an error), waiting for other writers (see
        _Transaction); with `wait` False, a busy history is StoreBusy at once."""
        return _Transaction(self.db, self.path, wait)

    # -- ids ---------------------------------------------------------------------------------------------------------
    def new_id(self, table: str) -> str:
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
        with self.transaction():
            cid = self.new_id("conversations")
            insert_conversation(self.db, cid, title=title or "New chat", title_auto=not title, model=model,
                                fingerprint=fingerprint, system=system, params=params, created=now, updated=now)
        return cid

    def add_message(self, conv_id: str, role: str, content: str, *, parent_id: str | None = None,
                    token_ids=None, prompt_tokens=None, generated_tokens=None, timings=None,
                    interrupted: bool = False, reasoning: str = "", system: str | None = None,
                    _use_head: bool = True) -> str:
        with self.transaction():
            return self._add(conv_id, role, content, parent_id=parent_id, token_ids=token_ids,
                             prompt_tokens=prompt_tokens, generated_tokens=generated_tokens, timings=timings,
                             interrupted=interrupted, reasoning=reasoning, system=system, _use_head=_use_head)

    def _add(self, conv_id: str, role: str, content: str, *, parent_id: str | None = None, token_ids=None,
             prompt_tokens=None, generated_tokens=None, timings=None, interrupted: bool = False,
             reasoning: str = "", system: str | None = None, _use_head: bool = True, mid: str | None = None) -> str:
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
        mid = mid or self.new_id("messages")
        insert_message(self.db, mid, conv_id, parent_id, role, content, token_ids=token_ids,
                       prompt_tokens=prompt_tokens, generated_tokens=generated_tokens, timings=timings, created=now,
                       interrupted=interrupted, reasoning=reasoning, system=system)
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
        with self.transaction(wait):
            cid, ids = x["conversation_id"], x["ids"]
            if self.db.execute("SELECT 1 FROM messages WHERE id = ?", (ids["reply"],)).fetchone():
                return  # saved already
            if not self.db.execute("SELECT 1 FROM conversations WHERE id = ?", (cid,)).fetchone():
                now = time.time()
                c = x["create"] or {}
                insert_conversation(self.db, cid, title="New chat", title_auto=True, model=c.get("model"),
                                    fingerprint=c.get("fingerprint"), system=c.get("system"), params=c.get("params"),
                                    created=now, updated=now)

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
        with self.transaction():
            n = self.db.execute("UPDATE conversations SET title = ?, title_auto = 0 WHERE id = ?",
                                (title, conv_id)).rowcount
        if not n:
            raise StoreError(f"no saved conversation with id {conv_id!r}")

    def set_system(self, conv_id: str, system: str | None):
        with self.transaction():
            self.db.execute("UPDATE conversations SET system = ?, updated = ? WHERE id = ?",
                            (system, time.time(), conv_id))

    def delete(self, conv_id: str):
        with self.transaction():
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

    def versions(self, conv_id: str) -> dict[str, tuple[int, int]]:
        """Each message's place among its siblings (the versions of it: edited prompts, regenerated answers) as
        (k, n), k counted from 1 in the order they were written."""
        groups: dict[str | None, list[str]] = {}
        for m in self._messages(conv_id):
            groups.setdefault(m.parent_id, []).append(m.id)
        return {mid: (k + 1, len(g)) for g in groups.values() for k, mid in enumerate(g)}

    def switch(self, conv_id: str, message_id: str) -> str:
        """Make the branch through `message_id` the active one: the head becomes the leaf below it reached by
        taking the newest reply at each step (so a sibling shows its own later turns). The new head."""
        msgs = self._messages(conv_id)
        if message_id not in {m.id for m in msgs}:
            raise StoreError(f"no message {message_id!r} in conversation {conv_id!r}")
        children: dict[str, list[str]] = {}
        for m in msgs:
            if m.parent_id is not None:
                children.setdefault(m.parent_id, []).append(m.id)
        head, seen = message_id, {message_id}
        while children.get(head) and children[head][-1] not in seen:
            head = children[head][-1]
            seen.add(head)
        with self.transaction():
            self.db.execute("UPDATE conversations SET head = ? WHERE id = ?", (head, conv_id))
        return head

    def _messages(self, conv_id: str) -> list[Message]:
        rows = self.db.execute(
            "SELECT id, conversation_id, parent_id, role, content, token_ids, prompt_tokens, generated_tokens, "
            "timings, created, interrupted, reasoning, system FROM messages WHERE conversation_id = ? ORDER BY rowid",
            (conv_id,))
        return [Message(r[0], r[1], r[2], r[3], r[4], unpack_ids(r[5]), r[6], r[7], json.loads(r[8] or "{}"), r[9],
                        bool(r[10]), r[11] or "", r[12]) for r in rows]

    def latest(self) -> Conversation | None:
        row = self.db.execute("SELECT id FROM conversations ORDER BY updated DESC LIMIT 1").fetchone()
        return self.get(row[0]) if row else None

    def list(self, search: str | None = None, limit: int | None = None) -> list[dict]:
        """Newest first: id, title, model, updated (and updated_iso), created, messages (on the active branch).
        One query: each listed conversation's branch is counted in SQL (walking up from its head; UNION stops
        at a parent loop, as `branch` does), no message is read."""
        where, args = "", []
        if search:
            where, args = "WHERE id IN (SELECT value FROM json_each(?))", [json.dumps(self._search(search))]
        if limit is not None:
            args.append(max(0, limit))
        rows = self.db.execute(
            f"WITH RECURSIVE listed AS (SELECT id, title, model, created, updated, head FROM conversations {where} "
            f"ORDER BY updated DESC{' LIMIT ?' if limit is not None else ''}), "
            "up(conversation_id, id, parent_id) AS ("
            " SELECT m.conversation_id, m.id, m.parent_id FROM listed c"
            " JOIN messages m ON m.id = c.head AND m.conversation_id = c.id"
            " UNION SELECT m.conversation_id, m.id, m.parent_id FROM up"
            " JOIN messages m ON m.id = up.parent_id AND m.conversation_id = up.conversation_id) "
            "SELECT c.id, c.title, c.model, c.created, c.updated,"
            " (SELECT count(*) FROM up WHERE up.conversation_id = c.id) FROM listed c ORDER BY c.updated DESC",
            args).fetchall()
        return [{"id": cid, "title": title, "model": model, "updated": updated, "updated_iso": iso(updated),
                 "created": created, "messages": n} for cid, title, model, created, updated, n in rows]

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

    # -- export / import (transfer.py) ----------------------------------------------------------------------------------
    def export_json(self, conv_id: str) -> dict:
        return transfer.export_json(self, conv_id)

    def import_json(self, data: dict) -> str:
        return transfer.import_json(self, data)

    def export_text(self, conv_id: str, fmt: str = "json") -> str:
        return transfer.export_text(self, conv_id, fmt)

    def export_markdown(self, conv_id: str) -> str:
        return transfer.export_markdown(self, conv_id)


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
