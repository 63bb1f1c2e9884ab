"""`dschat import` of files that are too big, nested too deeply, badly timed or out of role order: one line
naming the problem, nothing stored."""

from __future__ import annotations

import json

import pytest
from helpers import assert_clean_error, call

from dschat.engine import Tokenizer
from dschat.conversation.prompt_fit import _LINE_START
from dschat.history.store import Store, StoreError
from dschat.history.transfer import MAX_IMPORT_BYTES, MAX_IMPORT_CHARS, read_json_file


def chat(*roles, **extra):
    return {"messages": [{"role": r, "content": f"{r} text"} for r in roles], **extra}


@pytest.mark.parametrize("data, message", [
    (chat("user", "assistant", created="yesterday"), '"created" must be a time in seconds since 1970 (or null), not "yesterday"'),
    (chat("user", created=-5), '"created" must be a time'),
    (chat("user", updated=1e40), '"updated" must be a time'),
    ({"messages": [{"role": "user", "content": "x", "created": True}]}, 'message 1: "created" must be a time'),
    (chat("assistant", "user"), 'message 1: "role" is assistant where user comes'),
    (chat("user", "user"), 'message 2: "role" is user where assistant comes'),
    # (a system message anywhere else is the system prompt changed there: `/system` mid-chat)
    (chat("system", "assistant", "user"), 'message 2: "role" is assistant where user comes'),
    ({"messages": [{"role": "user", "content": "x" * (MAX_IMPORT_CHARS + 1)}]}, "characters, more than any model"),
    # issue 27 item 21: wrong-typed numbers were SQLite's errors ("Python int too large to convert to SQLite
    # INTEGER", "Error binding parameter 7"), and a title of any size was stored
    ({"messages": [{"role": "user", "content": "x", "prompt_tokens": 2**70}]},
     'message 1: "prompt_tokens" must be a whole number from 0 to'),
    ({"messages": [{"role": "user", "content": "x", "generated_tokens": [1]}]},
     'message 1: "generated_tokens" must be a whole number'),
    ({"messages": [{"role": "user", "content": "x", "prompt_tokens": {"a": 1}}]}, 'message 1: "prompt_tokens"'),
    ({"messages": [{"role": "user", "content": "x", "interrupted": "yes"}]},
     'message 1: "interrupted" must be true or false, not "yes"'),
    ({"messages": [{"role": "user", "content": "x", "timings": [1, 2]}]}, 'message 1: "timings" must be an object'),
    (chat("user", title="t" * 50_000_000), '"title" is 50,000,000 characters long; at most 1,000'),
    (chat("user", model="m" * 5000), '"model" is 5,000 characters long'),
])
def test_bad_exports_are_refused(tmp_path, data, message):
    with Store(tmp_path / "h.db") as store:
        with pytest.raises(StoreError) as e:
            store.import_json(data)
        assert message in str(e.value)
        assert store.list() == []


def test_good_orders_still_import(tmp_path):
    with Store(tmp_path / "h.db") as store:
        for data in (chat("system", "user", "assistant", "user"), chat("user", "assistant", created=1.7e9), chat()):
            store.import_json(data)
        assert len(store.list()) == 3


def test_a_huge_file_is_refused_before_it_is_read(tmp_path):
    p = tmp_path / "huge.json"
    with open(p, "wb") as f:
        f.truncate(MAX_IMPORT_BYTES + 1)  # sparse: nothing to read, only its size tells
    with pytest.raises(StoreError, match=f"{p}: 67,108,865 bytes is more than a conversation file may hold"):
        read_json_file(str(p))


@pytest.mark.parametrize("content, needle", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    (json.dumps(chat("user", created="yesterday")), '"created" must be a time'),
    (json.dumps(chat("assistant")), '"role" is assistant where user comes'),
], ids=["nested", "created", "order"])
def test_import_through_dschat(tmp_path, content, needle):
    p = tmp_path / "chat.json"
    p.write_text(content)
    assert_clean_error(call(["import", str(p)], stdin=None), needle)
    assert json.loads(call(["conversations", "--json"], stdin=None).stdout) == []


def test_a_huge_imported_conversation_is_refused_from_its_tail(small_context, tmp_path):
    """Continuing an import of millions of characters fails on the prompt's last characters alone, not after
    tokenizing all of it (the error names that check); nothing is added to the conversation."""
    line = "the quick brown fox jumps over the lazy dog, again and again\n"
    huge = chat("user", "assistant")
    for m in huge["messages"]:
        m["content"] = line * (MAX_IMPORT_CHARS // 2 // len(line))  # as much as an import may hold
    continue_too_long_import(tmp_path / "huge.json", huge, small_context, 2)


def test_the_tail_is_tokenized_as_the_whole_text_has_it(small_context):
    """Where the tail check cuts (after a line break a non-space follows), the tokens of the two sides are
    the tokens of the whole: digits, CJK, punctuation, indentation and blank lines around the cut."""
    tok = Tokenizer.from_dir(small_context)
    text = "def f(x):\n    return x  \n\n12345\n中文字符\n  \n!!?\n\tindent\nword\r\nend 7\n"
    cuts = [m.end() for m in _LINE_START.finditer(text)]
    assert len(cuts) == 5
    for cut in cuts:
        assert tok.encode(text[:cut]) + tok.encode(text[cut:]) == tok.encode(text), repr(text[cut:cut + 8])


def test_a_file_with_a_byte_order_mark_imports(tmp_path):
    """Issue 27 item 21: a UTF-8 BOM (as Windows editors write) was refused."""
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(chat("user", "assistant", title="With a BOM")).encode())
    r = call(["import", str(path)], stdin=None)
    assert r.returncode == 0, r.stderr
    listed = json.loads(call(["conversations", "--json"], stdin=None).stdout)
    assert [c["title"] for c in listed] == ["With a BOM"]


def test_conversations_shows_a_long_title_shortened(tmp_path):
    """A title stored before titles had a limit (or renamed long) is shown cut, not whole."""
    from dschat.history.store import Store as S

    with S() as store:
        cid = store.import_json(chat("user", "assistant"))
        store.db.execute("UPDATE conversations SET title = ? WHERE id = ?", ("T" * 100_000, cid))
    out = call(["conversations"], stdin=None).stdout.decode()
    assert "T" * 79 + "…" in out and "T" * 81 not in out


def test_a_huge_import_without_line_breaks_is_refused_from_its_tail(small_context, tmp_path):
    """Issue 27 item 25: a V3-style template writes no line break between messages, so the tail check found
    no place to cut and tokenized all of a many-message import before failing. It cuts before a role token
    now."""
    n = 20_000
    data = {"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i}"}
                         for i in range(n)]}
    continue_too_long_import(tmp_path / "many.json", data, small_context, n)


def test_a_cut_before_a_role_token_keeps_the_tokens_of_the_whole(small_context):
    """Each place cut_points allows: the marked encoding of the two sides is that of the whole, control tokens
    typed into a message (marked, plain text) included."""

    from dschat.conversation.prompt_fit import cut_points
    from dschat.conversation.template import START, control_tokens, encode_marked, render_marked

    tok = Tokenizer.from_dir(small_context)
    messages = [{"role": "user", "content": "hi<｜Assistant｜>x"}, {"role": "assistant", "content": "ok 12"},
                {"role": "user", "content": "中文\n  more"}]
    text = render_marked(tok, messages)
    cuts = [m.end() for m in cut_points(control_tokens(tok), START).finditer(text)]
    assert len(cuts) >= 4
    whole = encode_marked(tok, text)
    for cut in cuts:
        assert encode_marked(tok, text[:cut]) + encode_marked(tok, text[cut:]) == whole, repr(text[cut:cut + 12])
    assert not any(text[c - 1:c] == START for c in cuts)


def continue_too_long_import(path, data, model, messages: int):
    """Import `data`, continue it on a model whose window it overflows: one line that the tail alone does not
    fit, and the conversation keeps exactly its `messages`."""
    path.write_text(json.dumps(data))
    imported = call(["import", str(path)], stdin=None)
    assert imported.returncode == 0, imported.stderr
    cid = imported.stdout.decode().strip()
    r = call(["--model", str(model), "--conversation", cid, "-t", "0", "next question"], stdin=None)
    assert_clean_error(r, "the prompt does not fit the context window: its last ", "characters alone are")
    with Store() as store:
        assert len(store.get(cid).messages) == messages
