"""Saved conversations through the real `dschat` command: save, continue (-c) with the latent cache persisted
across processes, conversations/export/import/rename/rm, replay --compare (Ctrl+C keeping a partial answer: tests/test_signals.py)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest
from helpers import assert_clean_error, call, dschat_cmd

from dschat.engine import Tokenizer
from dschat.history.store import Store


def ask(model, text, *extra):
    r = call(["--model", str(model), "-t", "0", "-n", "8", "--stats", *extra], stdin=text)
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stderr.decode().strip().splitlines()[-1])
    return r.stdout.decode(), stats


def test_save_continue_and_list(chat_models):
    model = chat_models["v3"]
    first, s1 = ask(model, "What is a latent cache?")
    second, s2 = ask(model, "And why is it small?", "-c")
    # the second process found the first turn's latent rows on disk: no re-prefill of the history
    assert s2["cached_tokens"] >= s1["prompt_tokens"] + s1["generated_tokens"] - 1
    r = call(["conversations", "--json"], stdin=None)
    rows = json.loads(r.stdout)
    assert len(rows) == 1 and rows[0]["messages"] == 4 and rows[0]["title"] == "What is a latent cache?"
    conv = Store().get(rows[0]["id"])
    assert [m.role for m in conv.messages] == ["user", "assistant"] * 2
    assert conv.messages[1].content == first.strip() and conv.messages[3].content == second.strip()
    # the ids saved for turn two extend turn one's exactly (prompt + every generated token)
    t1 = conv.messages[0].token_ids + conv.messages[1].token_ids
    assert conv.messages[2].token_ids[: len(t1)] == t1
    assert conv.fingerprint and conv.model == str(model)


def test_old_spellings_sessions_and_session_still_work(chat_models):
    """`dschat sessions` and `--session ID` are the old names of `conversations` and `--conversation`: unlisted,
    but scripts that use them keep working."""
    ask(chat_models["v3"], "Old names.")
    assert call(["sessions", "--json"], stdin=None).stdout == call(["conversations", "--json"], stdin=None).stdout
    cid = Store().latest().id
    base = ["--model", str(chat_models["v3"]), "--show-prompt"]
    old, new = call(base + ["--session", cid], stdin="Next."), call(base + ["--conversation", cid], stdin="Next.")
    assert old.returncode == new.returncode == 0 and old.stdout == new.stdout
    assert "Old names." in json.loads(old.stdout)["text"]
    listed = call(["--help"], stdin=None).stdout.decode()
    assert "conversations" in listed and "sessions" not in listed and "--session " not in listed


def test_corrupt_kv_file_is_ignored_with_a_warning(chat_models):
    model = chat_models["v2"]
    ask(model, "Tell me about pages.")
    kv_dir = os.path.join(os.environ["XDG_CACHE_HOME"], "dschat", "kv")
    files = [os.path.join(kv_dir, f) for f in os.listdir(kv_dir)]
    assert len(files) == 1
    with open(files[0], "r+b") as f:
        f.seek(100)
        f.write(b"\x00garbage\x00" * 20)
    r = call(["--model", str(model), "-t", "0", "-n", "8", "-c", "--no-save", "--stats"], stdin="More please.")
    assert r.returncode == 0
    err = r.stderr.decode().strip().splitlines()
    assert any(line.startswith("dschat: warning: ignoring cached prefix") for line in err)
    fresh = call(["--model", str(model), "-t", "0", "-n", "8", "--conversation", Store().latest().id, "--no-save"],
                stdin="More please.")
    assert r.stdout == fresh.stdout  # the same answer, recomputed


def test_export_import_rename_rm(chat_models, tmp_path):
    ask(chat_models["v3"], "Export me.")
    cid = json.loads(call(["conversations", "--json"], stdin=None).stdout)[0]["id"]
    out = tmp_path / "chat.json"
    assert call(["export", cid[:5], "-o", str(out)], stdin=None).returncode == 0
    data = json.loads(out.read_text())
    assert data["messages"][0] == {**data["messages"][0], "role": "user", "content": "Export me."}
    md = call(["export", cid, "--format", "md"], stdin=None).stdout.decode()
    assert md.startswith("# Export me.") and "## Assistant" in md
    new_id = call(["import", str(out)], stdin=None).stdout.decode().strip()
    assert new_id != cid and Store().export_json(new_id)["messages"] == data["messages"]
    assert call(["rename", new_id, "Imported", "copy"], stdin=None).returncode == 0
    rows = json.loads(call(["conversations", "--json", "--search", "Imported"], stdin=None).stdout)
    assert [r["id"] for r in rows] == [new_id]
    assert call(["rm", new_id], stdin=None).returncode == 0
    assert [r["id"] for r in json.loads(call(["conversations", "--json"], stdin=None).stdout)] == [cid]
    bad = call(["rm", "ffffffff"], stdin=None)
    assert bad.returncode == 1 and b"no saved conversation" in bad.stderr


def test_replay_compare_same_and_different(chat_models, tmp_path):
    model = chat_models["v3"]
    ask(model, "First question.")
    ask(model, "Second question.", "-c")
    cid = Store().latest().id
    r = call(["replay", cid, "--compare"], stdin=None)
    assert r.returncode == 0, r.stderr
    text = r.stdout.decode()
    assert text.count("same (token for token)") == 2 and "2 of 2 turns unchanged" in text
    # a saved answer whose ids differ must be reported, with where it differs
    data = Store().export_json(cid)
    data["messages"][3]["token_ids"][0] += 1
    data["messages"][3]["content"] = Tokenizer.from_dir(model).decode(data["messages"][3]["token_ids"],
                                                                      skip_special_tokens=True)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    r = call(["replay", str(path), "--compare"], stdin=None)
    assert r.returncode == 1
    text = r.stdout.decode()
    assert "── turn 1: same" in text and "── turn 2: DIFFERS at token 0" in text and "1 of 2 turns unchanged" in text


def test_replay_compare_samples_a_sampled_conversation_again_exactly(chat_models):
    """Chats sample: each turn saves its sampler settings and the seed the engine drew, and --compare samples
    the turn again with them (it compared greedily before, and reported DIFFERS)."""
    model = chat_models["v3"]
    for i, flags in enumerate([[], ["-c"]]):
        r = call(["--model", str(model), "-t", "1.0", "--top-p", "0.9", "-n", "12", *flags], stdin=f"Question {i}.")
        assert r.returncode == 0, r.stderr
    conv = Store().latest()
    saved = [m.timings["sampling"] for m in conv.messages if m.role == "assistant"]
    assert all(s["temperature"] == 1.0 and s["top_p"] == 0.9 and isinstance(s["seed"], int) for s in saved)
    r = call(["replay", conv.id, "--compare"], stdin=None)
    text = r.stdout.decode()
    assert r.returncode == 0, text
    assert text.count("same (token for token) (compared with: sampled again as saved: temperature 1.0") == 2
    greedy = call(["replay", conv.id, "--compare", "-t", "0"], stdin=None)  # a flag chooses: greedy
    assert "(compared with: greedy)" in greedy.stdout.decode()


def test_replay_compare_takes_the_text_over_ids_that_disagree(chat_models, tmp_path):
    """An answer edited by hand (its text, not its ids) differs from what the model says now: the text is
    the truth, and the ids are ignored with a warning."""
    model = chat_models["v3"]
    ask(model, "First question.")
    data = Store().export_json(Store().latest().id)
    data["messages"][1]["content"] = "Something else entirely."
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    r = call(["replay", str(path), "--compare"], stdin=None)
    assert r.returncode == 1, r.stdout
    assert "── turn 1: DIFFERS at character 0" in r.stdout.decode()
    assert "dschat: warning: turn 1: the saved assistant message's token ids do not match its text" in r.stderr.decode()


def test_replay_prints_the_transcript_with_another_model(chat_models):
    ask(chat_models["v3"], "Hello there.")
    cid = Store().latest().id
    r = call(["replay", cid, "--model", str(chat_models["v2"]), "-t", "0", "-n", "5"], stdin=None)
    assert r.returncode == 0, r.stderr
    assert "── user (1) ──\nHello there.\n── assistant ──\n" in r.stdout.decode()


def test_corrupt_history_is_an_error_and_left_alone(chat_models):
    path = Store.default_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not sqlite" * 100)
    before = path.read_bytes()
    r = call(["--model", str(chat_models["v2"]), "-n", "3"], stdin="hi")
    assert r.returncode == 1 and b"dschat: error:" in r.stderr and b"Traceback" not in r.stderr
    assert path.read_bytes() == before
    assert call(["conversations"], stdin=None).returncode == 1


@pytest.mark.parametrize("cmd", [["conversations", "--help"], ["replay", "--help"], ["export", "--help"]])
def test_subcommand_help(cmd):
    r = call(cmd, stdin=None)
    assert r.returncode == 0 and r.stdout.decode().startswith("usage: dschat " + cmd[0])


def test_two_processes_saving_at_once(chat_models):
    procs = [subprocess.Popen(dschat_cmd() + ["--model", str(chat_models["v2"]), "-t", "0", "-n", "4"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]
    for i, p in enumerate(procs):
        p.stdin.write(f"question {i}".encode())
        p.stdin.close()
    t0 = time.monotonic()
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    assert time.monotonic() - t0 < 120
    assert sorted(r["title"] for r in Store().list()) == ["question 0", "question 1"]


@pytest.mark.parametrize("system", [[], ["-s", "Be brief."]], ids=["same-system", "new-system"])
def test_show_prompt_of_a_continued_conversation_is_what_the_next_turn_feeds(chat_models, system):
    model = chat_models["v3"]
    ask(model, "First question.")
    r = call(["--model", str(model), "--show-prompt", "-c", *system, "Second question."], stdin=None)
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert "First question." in shown["text"] and len(Store().latest().messages) == 2  # nothing changed
    ask(model, "Second question.", "-c", *system)
    assert shown["ids"] == Store().latest().messages[2].token_ids


def test_history_and_cache_are_private_to_the_user(chat_models):
    def mode(p):
        return stat.S_IMODE(p.stat().st_mode)

    data = Path(os.environ["XDG_DATA_HOME"]) / "dschat"
    data.mkdir(parents=True)
    Store(data / "history.db").close()
    os.chmod(data, 0o755)  # as an older dschat left them: world-readable
    os.chmod(data / "history.db", 0o644)
    ask(chat_models["v3"], "My password is hunter2.")
    cache = Path(os.environ["XDG_CACHE_HOME"]) / "dschat"
    assert mode(data) == mode(cache) == mode(cache / "kv") == 0o700
    assert mode(data / "history.db") == 0o600
    assert [mode(f) for f in (cache / "kv").iterdir()] == [0o600]


@pytest.mark.parametrize("data, needle", [
    ({"model": "x", "messages": [{"role": "user"}]}, 'message 1: needs "role"'),  # was KeyError 'content'
    ({"model": "x", "messages": ["hello"]}, 'message 1: needs "role"'),  # was "'str' object has no attribute 'get'"
    ({"model": "x", "messages": {"a": 1}}, '"messages" must be a list'),
])
def test_replay_checks_its_file_as_import_does(tmp_path, data, needle):
    """Issue 27 item 20."""
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    assert_clean_error(call(["replay", str(path)], stdin=None), needle, str(path))


def test_replay_checks_the_saved_settings(chat_models, tmp_path):
    path = tmp_path / "hot.json"
    path.write_text(json.dumps({"model": str(chat_models["v3"]), "params": {"temperature": "hot"},
                                "messages": [{"role": "user", "content": "Hi."}]}))
    assert_clean_error(call(["replay", str(path)], stdin=None), '"temperature" must be a number', "'hot'")


def test_replay_never_downloads_the_model_a_file_names(tmp_path):
    """A file naming a hub model that is not cached is one line saying how to fetch it (before, replay set
    off a download of whatever the file named). HF_HUB_OFFLINE is taken away so that only dschat's own rule
    can stop the download (the test's hub cache is empty)."""
    path = tmp_path / "hub.json"
    path.write_text(json.dumps({"model": "someone/some-model", "messages": [{"role": "user", "content": "Hi."}]}))
    r = call(["replay", str(path)], stdin=None,
             env={"HF_HUB_OFFLINE": None, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert_clean_error(r, "names the model 'someone/some-model', which is not here", "--model")
    assert b"Downloading" not in r.stderr
