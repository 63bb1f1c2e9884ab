"""`dschat fim`: the FIM prompt, the splice, output modes, budgets and every bad input."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess

import pytest
from helpers import assert_clean_error, call, dschat_cmd, engine_fill

from dschat.fim.core import cut_repeat, fim_prompt, trim

SOURCE = '''import os


def list_files(root):
    """Every file under root."""
    out = []
    for dirpath, _, names in os.walk(root):
        <FILL>
    return out


if __name__ == "__main__":
    print(list_files("."))
'''


@pytest.fixture
def src(tmp_path):
    p = tmp_path / "walk.py"
    p.write_text(SOURCE)
    p.chmod(0o640)
    return p


def test_prompt_is_the_tokenizers_encoding_of_the_fim_string(chat_engines):
    tok = chat_engines["v3"].tokenizer
    ids = fim_prompt(tok, "def f(x):\n    ", "\n    return y\n")
    text = "<｜fim▁begin｜>def f(x):\n    <｜fim▁hole｜>\n    return y\n<｜fim▁end｜>"
    assert ids == [tok.bos_token_id] + tok.tk.encode(text, add_special_tokens=False).ids
    assert ids[1] == tok.fim[0] and tok.fim[1] in ids and ids[-1] == tok.fim[2]


def test_special_token_strings_in_the_file_are_text(chat_engines):
    tok = chat_engines["v3"].tokenizer
    prefix, suffix = "s = '<｜fim▁hole｜><｜end▁of▁sentence｜>'\n", "\nt = '<｜fim▁end｜>'\n"
    ids = fim_prompt(tok, prefix, suffix)
    assert ids == [tok.bos_token_id, tok.fim[0], *tok.encode_plain(prefix), tok.fim[1], *tok.encode_plain(suffix),
                   tok.fim[2]]
    assert [ids.count(i) for i in tok.fim] == [1, 1, 1] and tok.eos_token_id not in ids
    assert tok.decode(ids[2:-1]) == prefix + "<｜fim▁hole｜>" + suffix


def test_fill_equals_the_engines_greedy_tokens(chat_models, chat_engines, src):
    r = call(["fim", str(src), "--model", str(chat_models["v3"]), "-n", "24"], stdin=None)
    assert r.returncode == 0, r.stderr
    offset = SOURCE.index("<FILL>")
    text = SOURCE.replace("<FILL>", "")
    want = engine_fill(chat_engines["v3"], text, offset)
    assert r.stdout.decode() == text[:offset] + want + text[offset:]


def test_in_place_writes_what_stdout_shows(chat_models, src, tmp_path):
    shown = call(["fim", str(src), "--model", str(chat_models["v3"]), "-n", "16"], stdin=None).stdout
    r = call(["fim", "-i", str(src), "--model", str(chat_models["v3"]), "-n", "16"], stdin=None)
    assert r.returncode == 0 and r.stdout == b""
    assert src.read_bytes() == shown and (src.stat().st_mode & 0o777) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["walk.py"]  # no temp file left behind


def test_json_and_diff(chat_models, src):
    r = call(["fim", str(src), "--model", str(chat_models["v3"]), "-n", "16", "--json"], stdin=None)
    got = json.loads(r.stdout)
    assert set(got) == {"insertion", "line", "column", "stop_reason"}
    assert (got["line"], got["column"]) == (8, 9) and got["stop_reason"] in ("stop", "length", "suffix")
    d = call(["fim", str(src), "--model", str(chat_models["v3"]), "-n", "16", "--diff"], stdin=None).stdout.decode()
    assert d.startswith("--- a/") and "\n+++ b/" in d and "-        <FILL>" in d and b"\x1b" not in d.encode()
    filled = SOURCE.replace("<FILL>", got["insertion"])
    added = [ln[1:] for ln in d.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    assert all(line in filled.splitlines() for line in added)


def test_all_and_at_and_stdin(chat_models, chat_engines, tmp_path):
    p = tmp_path / "two.py"
    p.write_text("x = <FILL>\ny = <FILL>\n")
    r = call(["fim", str(p), "--model", str(chat_models["v3"]), "-n", "6", "--all", "--json"], stdin=None)
    fills = json.loads(r.stdout)
    assert [f["line"] for f in fills] == [1, 2] and len(fills) == 2
    q = tmp_path / "plain.py"
    q.write_text("def f():\n    return 1\n")
    r = call(["fim", str(q), "--model", str(chat_models["v3"]), "-n", "6", "--at", "2:5", "--json"], stdin=None)
    assert (json.loads(r.stdout)["line"], json.loads(r.stdout)["column"]) == (2, 5)
    r = call(["fim", "-", "--model", str(chat_models["v3"]), "-n", "6", "--filename", "x.py"],
            stdin="a = <FILL>\n")
    assert r.returncode == 0 and r.stdout.decode().startswith("a = ")


def test_budget_trims_at_line_boundaries_with_more_prefix():
    prefix = "".join(f"line {i}\n" for i in range(200)) + "    x = "
    suffix = " + 1\n" + "".join(f"after {i}\n" for i in range(200))
    count = len  # one "token" per character keeps the arithmetic visible
    p, s = trim(prefix, suffix, count, 400)
    assert prefix.endswith(p) and suffix.startswith(s)
    assert p.startswith("line ") and s.endswith("\n" + s.split("\n")[-1])  # whole lines only
    assert p.endswith("    x = ") and s.startswith(" + 1\n")  # the cursor's line stays whole
    assert len(p) > len(s) and len(p) + len(s) <= 400
    # a short suffix leaves its share to the prefix
    p2, s2 = trim(prefix, " + 1\n", count, 400)
    assert s2 == " + 1\n" and len(p2) > len(p)


def test_cut_when_the_completion_repeats_the_suffix():
    suffix = "\n    return out\n"
    assert cut_repeat("out.append(x)\n    return out\n", suffix, False) == ("out.append(x)\n", True)
    assert cut_repeat("out.append(x)", suffix, False) == ("out.append(x)", False)
    assert cut_repeat("    return out\n", suffix, True) == ("", True)


# -- bad input leaves the file byte-identical ------------------------------------------------------------------------
@pytest.mark.parametrize("content, args, needle", [
    ("def f():\n    pass\n", [], "no <FILL> marker"),
    ("a = <FILL>\nb = <FILL>\n", [], "2 <FILL> markers"),
    (b"\x7fELF\x02\x01\x00\x00binary", [], "binary"),
    (b"caf\xe9 = 1\n", [], "not UTF-8"),
    ("x = <FILL>\n", ["--at", "1:1"], "not both"),
    ("x = 1\n", ["--at", "9"], "has 2 lines"),
    ("x = <FILL>\n", ["--context", "-5"], "--context -5: must be a positive number of tokens"),
    ("x = <FILL>\n", ["-n", "0"], "--max-tokens 0: must be at least 1"),
])
def test_bad_files(chat_models, tmp_path, content, args, needle):
    p = tmp_path / "bad.py"
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    before = p.read_bytes()
    r = call(["fim", "-i", str(p), "--model", str(chat_models["v3"]), *args], stdin=None)
    assert_clean_error(r, needle)
    assert p.read_bytes() == before


def test_missing_file(chat_models, tmp_path):
    r = call(["fim", str(tmp_path / "nope.py"), "--model", str(chat_models["v3"])], stdin=None)
    assert_clean_error(r, "no such file")


def test_model_without_fim_tokens(chat_models, src):
    before = src.read_bytes()
    r = call(["fim", "-i", str(src), "--model", str(chat_models["v2"])], stdin=None)
    assert_clean_error(r, "no FIM tokens")
    assert src.read_bytes() == before


def test_ctrl_c_during_in_place_leaves_the_file(chat_models, tmp_path):
    src = tmp_path / "three.py"
    src.write_text("x = <FILL>\ny = <FILL>\nz = <FILL>\n")
    before = src.read_bytes()
    p = subprocess.Popen(dschat_cmd() + ["fim", "-i", "--all", "--stats", str(src), "--model", str(chat_models["v3"]),
                                         "-t", "1.0", "--seed", "5", "-n", "12", "--speculative", "none"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stderr.readline().startswith(b"{")  # the first hole is done: generating the next ones
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=30) == 130
    assert src.read_bytes() == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["three.py"]
    shutil.rmtree(tmp_path, ignore_errors=True)
