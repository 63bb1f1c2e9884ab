"""The history's schema: named migrations, applied in order, each once.

`PRAGMA user_version` counts the migrations a database has had (a history written before migrations had
names is at 1: the first one). Opening a history applies the ones it lacks, in one transaction that another
dschat opening it at the same moment waits for; a database with more than this dschat knows was written by
a newer one and is refused (store.py). A change to the schema is a new function at the end of MIGRATIONS,
never an edit of one that has shipped."""

from __future__ import annotations

import sqlite3
from typing import Callable

MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = []


def migration(fn: Callable[[sqlite3.Connection], None]):
    MIGRATIONS.append(fn)
    return fn


@migration
def m001_conversations_messages_and_search(db: sqlite3.Connection):
    """Conversations, their messages as a tree (parent_id; a conversation's head is the active leaf), and the
    full-text index over message text (FTS5, trigram: substrings in any script), kept by triggers."""
    db.execute("""CREATE TABLE conversations (
        id TEXT PRIMARY KEY,
        title TEXT NOT NULL,
        title_auto INTEGER NOT NULL DEFAULT 1,
        model TEXT NOT NULL DEFAULT '',
        fingerprint TEXT NOT NULL DEFAULT '',
        system TEXT,
        params TEXT NOT NULL DEFAULT '{}',
        created REAL NOT NULL,
        updated REAL NOT NULL,
        head TEXT)""")
    db.execute("""CREATE TABLE messages (
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
        interrupted INTEGER NOT NULL DEFAULT 0)""")
    db.execute("CREATE INDEX messages_by_conversation ON messages(conversation_id)")
    db.execute("CREATE INDEX conversations_by_update ON conversations(updated)")
    db.execute("CREATE VIRTUAL TABLE messages_fts USING fts5(content, content='messages', content_rowid='rowid', "
               "tokenize='trigram')")
    db.execute("""CREATE TRIGGER messages_ai AFTER INSERT ON messages BEGIN
        INSERT INTO messages_fts(rowid, content) VALUES (new.rowid, new.content); END""")
    db.execute("""CREATE TRIGGER messages_ad AFTER DELETE ON messages BEGIN
        INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.rowid, old.content); END""")
    db.execute("""CREATE TRIGGER messages_au AFTER UPDATE ON messages BEGIN
        INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.rowid, old.content);
        INSERT INTO messages_fts(rowid, content) VALUES (new.rowid, new.content); END""")



@migration
def m002_reasoning_apart(db: sqlite3.Connection):
    """A reasoning model's thinking in its own field (the reply's content keeps the whole reply as generated,
    which the model's template reads on the next turn)."""
    db.execute("ALTER TABLE messages ADD COLUMN reasoning TEXT NOT NULL DEFAULT ''")


@migration
def m003_system_prompt_per_message(db: sqlite3.Connection):
    """The system prompt each message was written under ('' for none; NULL where not recorded, rows written
    before: the conversation's), so that export and replay place a `/system` set mid-chat where it happened
    (the conversation's `system` is the one the next turn uses)."""
    db.execute("ALTER TABLE messages ADD COLUMN system TEXT")


def known() -> int:
    """How many migrations this dschat knows: the user_version of a history it has brought up to date."""
    return len(MIGRATIONS)


def version(db: sqlite3.Connection) -> int:
    return db.execute("PRAGMA user_version").fetchone()[0]


def migrate(db: sqlite3.Connection):
    """Apply the migrations `db` lacks, in order, in one transaction (another process may have applied them
    meanwhile: the count is read again under the write lock)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        for step in MIGRATIONS[version(db):]:
            step(db)
        db.execute(f"PRAGMA user_version = {known()}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


SCHEMA = known()  # the schema version of a history this dschat writes
