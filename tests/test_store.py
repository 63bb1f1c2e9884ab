"""The SQLite history: save, continue, search, branches, export/import, concurrency, refusing bad files."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import shutil
import sqlite3
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, example
from hypothesis import strategies as st

from dschat.history import schema
from dschat.history.schema import SCHEMA
from dschat.history.store import Store, StoreError


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "history.db")
    yield s
    s.close()


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_default_location_follows_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    s = Store()
    assert s.path == tmp_path / "data" / "dschat" / "history.db" and s.path.exists()
    assert s.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert s.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA
    s.close()


def test_save_and_reload(store):
    cid = store.create("deepseek-ai/DeepSeek-V2-Lite-Chat", fingerprint="abc", system="Be brief.",
                       params={"temperature": 0.3})
    store.add_message(cid, "user", "What is MLA?\nsecond line", token_ids=[1, 2, 3], prompt_tokens=3)
    store.add_message(cid, "assistant", "Latent attention.", token_ids=[4, 5], generated_tokens=2,
                      timings={"ttft_s": 0.5})
    c = store.get(cid)
    assert (c.model, c.fingerprint, c.system, c.params) == ("deepseek-ai/DeepSeek-V2-Lite-Chat", "abc", "Be brief.",
                                                           {"temperature": 0.3})
    assert c.title == "What is MLA?"
    assert [(m.role, m.content, m.token_ids) for m in c.messages] == [
        ("user", "What is MLA?\nsecond line", [1, 2, 3]), ("assistant", "Latent attention.", [4, 5])]
    assert c.messages[1].timings == {"ttft_s": 0.5} and c.messages[1].parent_id == c.messages[0].id
    store.rename(cid, "MLA")
    store.add_message(cid, "user", "another question")
    assert store.get(cid).title == "MLA"


def test_latest_list_and_counts(store):
    a = store.create("m")
    store.add_message(a, "user", "first conversation")
    b = store.create("m")
    store.add_message(b, "user", "second conversation")
    store.add_message(b, "assistant", "reply")
    rows = store.list()
    assert [r["id"] for r in rows] == [b, a] and [r["messages"] for r in rows] == [2, 1]
    assert store.latest().id == b
    assert set(rows[0]) >= {"id", "title", "model", "updated", "messages"}
    store.add_message(a, "assistant", "now I am newest")
    assert store.latest().id == a and store.list(limit=1)[0]["id"] == a


def test_full_text_search(store):
    a = store.create("m")
    store.add_message(a, "user", "How do I use os.path.join?")
    b = store.create("m")
    store.add_message(b, "user", "Explique-moi le café et le 量子计算")
    assert [r["id"] for r in store.list(search="os.path")] == [a]
    assert [r["id"] for r in store.list(search="量子计算")] == [b]
    assert [r["id"] for r in store.list(search="café")] == [b]
    assert [r["id"] for r in store.list(search="量子")] == [b]  # shorter than a trigram
    assert store.list(search="nothing like this") == []


def test_regenerate_keeps_a_sibling(store):
    cid = store.create("m")
    store.add_message(cid, "user", "q")
    first = store.add_message(cid, "assistant", "answer one")
    second = store.add_sibling(cid, first, "assistant", "answer two")
    c = store.get(cid)
    assert [m.content for m in c.messages] == ["q", "answer two"]
    assert {m.content for m in store.siblings(second)} == {"answer one", "answer two"}


def test_delete_and_ids(store):
    cid = store.create("m")
    assert len(cid) == 8 and store.resolve_id(cid[:4]) == cid
    store.delete(cid)
    with pytest.raises(StoreError, match="no saved conversation"):
        store.get(cid)
    with pytest.raises(StoreError, match="no saved conversation"):
        store.resolve_id(cid)


def test_ambiguous_prefix(store):
    ids = [store.create("m") for _ in range(40)]
    firsts = {}
    for i in ids:
        firsts.setdefault(i[0], []).append(i)
    shared = next(v for v in firsts.values() if len(v) > 1)
    with pytest.raises(StoreError, match="ambiguous"):
        store.resolve_id(shared[0][0])


def test_export_import_round_trip(store):
    cid = store.create("model-x", fingerprint="fp", system="sys", params={"top_p": 0.9})
    store.add_message(cid, "user", "hello", token_ids=[1, 2], prompt_tokens=2)
    store.add_message(cid, "assistant", "hi!", token_ids=[3, 1], generated_tokens=2, interrupted=True,
                      timings={"decode_tokens_per_s": 12.5})
    data = store.export_json(cid)
    assert data["version"] == 1 and data["messages"][1]["interrupted"] is True
    new = store.import_json(json.loads(json.dumps(data)))
    again = store.export_json(new)
    for key in ("title", "model", "fingerprint", "system", "params", "messages", "created", "updated"):
        assert again[key] == data[key], key
    md = store.export_markdown(cid)
    assert "## User" in md and "hello" in md and "## Assistant (interrupted)" in md and "sys" in md


@pytest.mark.parametrize("bad, message", [
    ([], "JSON object"),
    ({"messages": "x"}, "must be a list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
    ({"messages": [{"role": "user", "content": "x", "token_ids": [-1]}]}, "token_ids"),
    ({"version": 99, "messages": []}, "version 99"),
])
def test_import_rejects_bad_files(store, bad, message):
    with pytest.raises(StoreError, match=message):
        store.import_json(bad)


text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(user=text, reply=text, system=text, title=text)
@example(user="\x1b", reply="", system="", title="")  # a title that cleans to nothing
def test_any_unicode_survives_save_export_import(store, user, reply, system, title):
    cid = store.create("m", system=system, title=title or None)
    store.add_message(cid, "user", user)
    store.add_message(cid, "assistant", reply)
    data = json.loads(json.dumps(store.export_json(cid), ensure_ascii=False))
    back = store.get(store.import_json(data))
    assert [m.content for m in back.messages] == [user, reply]
    assert back.system == system and back.title == store.get(cid).title


# -- refusing files it cannot read, without touching them ------------------------------------------------------------
def test_random_bytes_are_refused_untouched(tmp_path):
    p = tmp_path / "history.db"
    p.write_bytes(bytes(range(256)) * 40)
    before = digest(p)
    with pytest.raises(StoreError, match="not a readable database"):
        Store(p)
    assert digest(p) == before and sorted(x.name for x in tmp_path.iterdir()) == ["history.db"]


def test_truncated_database_is_refused_untouched(tmp_path):
    p = tmp_path / "history.db"
    s = Store(p)
    cid = s.create("m")
    for i in range(300):
        s.add_message(cid, "user", f"message {i} " * 20)
    s.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    s.close()
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    before = digest(p)
    with pytest.raises(StoreError):
        Store(p)
    assert digest(p) == before


def test_newer_schema_is_refused_untouched(tmp_path):
    p = tmp_path / "history.db"
    Store(p).close()
    db = sqlite3.connect(p)
    db.execute(f"PRAGMA user_version = {SCHEMA + 1}")
    db.close()
    before = digest(p)
    with pytest.raises(StoreError, match="newer dschat"):
        Store(p)
    assert digest(p) == before


def test_other_sqlite_file_is_refused(tmp_path):
    p = tmp_path / "history.db"
    db = sqlite3.connect(p)
    db.execute("CREATE TABLE notes (x)")
    db.commit()
    db.close()
    before = digest(p)
    with pytest.raises(StoreError, match="not a dschat history"):
        Store(p)
    assert digest(p) == before


def test_an_empty_database_another_run_is_creating_becomes_the_history(tmp_path):
    """Two runs starting at once: one has made the file (WAL mode set, no tables yet) when the other opens it.
    That is a history being created, not a foreign database (it was refused under load)."""
    p = tmp_path / "history.db"
    db = sqlite3.connect(p)
    db.execute("PRAGMA journal_mode = WAL")
    db.close()
    assert p.stat().st_size > 0
    with Store(p) as s:
        s.create("m")
        assert len(s.list()) == 1


# -- two processes at once ----------------------------------------------------------------------------------------------
def _writer(path, tag, n):
    s = Store(path)
    cid = s.create("m", title=tag)
    for i in range(n):
        s.add_message(cid, "user", f"{tag} question {i}")
        s.add_message(cid, "assistant", f"{tag} answer {i}")
    s.close()


def test_two_processes_writing_at_once(tmp_path):
    p = tmp_path / "history.db"
    Store(p).close()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(p), tag, 50)) for tag in ("alpha", "beta")]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    s = Store(p)
    rows = {r["title"]: r["messages"] for r in s.list()}
    assert rows == {"alpha": 100, "beta": 100}
    s.close()


# -- the schema: named migrations ----------------------------------------------------------------------------------------
OLD_HISTORY = Path(__file__).parent / "data" / "history-schema1.db"  # written by dschat before migrations had names


def test_a_history_from_before_named_migrations_opens_reads_and_writes(tmp_path):
    """tests/data/history-schema1.db was made by the store as it was (one list of statements, user_version 1):
    two conversations, the first with a regenerated answer."""
    p = tmp_path / "history.db"
    shutil.copyfile(OLD_HISTORY, p)
    with Store(p) as s:
        rows = s.list()
        assert [(r["title"], r["messages"]) for r in rows] == [
            ("Renamed chat", 1), ("What is multi-head latent attention?", 2)]
        first = s.get(rows[1]["id"])
        assert [m.content for m in first.messages] == ["What is multi-head latent attention?",
                                                       "A low-rank latent cache."]
        assert first.messages[0].token_ids == [1, 2, 3] and first.messages[1].interrupted
        assert len(s.siblings(first.messages[1].id)) == 2
        assert [r["id"] for r in s.list(search="compresses the KV")] == [first.id]  # its full-text index
        s.add_message(first.id, "user", "and the cache?")
        assert s.list()[0]["id"] == first.id and s.list()[0]["messages"] == 3
        assert s.db.execute("PRAGMA user_version").fetchone()[0] == schema.known() == SCHEMA


def test_migrations_apply_in_order_once_and_a_newer_history_is_refused(tmp_path, monkeypatch):
    applied = []

    def m_later_notes(db):
        applied.append(schema.version(db))
        db.execute("CREATE TABLE notes (conversation_id TEXT, text TEXT)")

    p = tmp_path / "history.db"
    shutil.copyfile(OLD_HISTORY, p)
    shipped = list(schema.MIGRATIONS)
    monkeypatch.setattr(schema, "MIGRATIONS", [*shipped, m_later_notes])
    for _ in range(2):
        with Store(p) as s:
            assert s.db.execute("PRAGMA user_version").fetchone()[0] == len(shipped) + 1
            s.db.execute("INSERT INTO notes VALUES ('x', 'kept')")
    assert applied == [1]  # once (the whole upgrade of this schema-1 history is one transaction)
    with Store(p) as s:  # the shipped m002 ran on it too: the thinking's own field
        assert "reasoning" in {r[1] for r in s.db.execute("PRAGMA table_info(messages)")}
    assert [m.__name__ for m in schema.MIGRATIONS][:2] == ["m001_conversations_messages_and_search",
                                                            "m002_reasoning_apart"]
    monkeypatch.setattr(schema, "MIGRATIONS", shipped)
    before = digest(p)
    with pytest.raises(StoreError, match="newer dschat"):
        Store(p)
    assert digest(p) == before


def test_listing_counts_each_branch_in_one_query(store):
    """Store.list ran a query per conversation (and before that read every message of each); now one query
    counts the active branches (a regenerated answer is not counted twice)."""
    for i in range(30):
        cid = store.create("m")
        store.add_message(cid, "user", f"question {i}")
        answer = store.add_message(cid, "assistant", "answer")
        if i % 2:
            store.add_sibling(cid, answer, "assistant", "another answer")
    statements = []
    store.db.set_trace_callback(statements.append)
    rows = store.list()
    store.db.set_trace_callback(None)
    assert len(rows) == 30 and {r["messages"] for r in rows} == {2}
    assert len(statements) == 1, statements
    statements.clear()
    store.db.set_trace_callback(statements.append)
    assert [r["messages"] for r in store.list(search="question 7", limit=1)] == [2]
    store.db.set_trace_callback(None)
    assert not any("FROM messages WHERE conversation_id" in s for s in statements)


def test_a_title_from_the_first_message_is_stored_exact(store):
    """Titles are made safe where they are shown (dschat conversations, the TUI's list: test_terminal_text), not
    in the history: the first line is kept as written."""
    cid = store.create("m")
    store.add_message(cid, "user", "\n  \x1b]0;pwned\x07 hello \u202e\nsecond line")
    assert store.get(cid).title == "\x1b]0;pwned\x07 hello \u202e"


def test_a_history_created_by_another_process_between_two_reads(tmp_path, monkeypatch):
    """Two dschats starting at once on a new history: one reads the schema version (0: the other has not
    committed yet), the other commits the whole schema, then the first reads the tables. Read from one
    snapshot they agree (no tables yet: a history being created); read apart, the first took a complete
    schema at version 0 for someone else's database and refused to save (seen in CI under load)."""
    p = tmp_path / "history.db"
    other = sqlite3.connect(str(p), isolation_level=None)
    other.execute("PRAGMA journal_mode = WAL")  # as the other dschat leaves it before creating the schema
    real = schema.version
    calls = []

    def version_then_the_other_commits(db):
        v = real(db)
        if not calls:
            calls.append(v)
            schema.migrate(other)  # the other dschat's schema, committed right after this read
        return v

    monkeypatch.setattr(schema, "version", version_then_the_other_commits)
    s = Store(p)
    monkeypatch.setattr(schema, "version", real)
    assert calls == [0] and schema.version(other) == SCHEMA
    s.close()
    other.close()
    assert Store(p).list() == []

