"""`dschat fim` and the user's file: `-i` never loses edits, follows symlinks, refuses read-only files before
any work; a BOM and CRLF line endings are kept and the hole never lands inside them."""

from __future__ import annotations

import os
import subprocess

import pytest
from helpers import assert_clean_error, call, dschat_cmd, engine_fill

from dschat.files import Snapshot, WriteError, atomic_write_bytes


def fim(model, *args):
    return call(["fim", *map(str, args), "--model", str(model), "-n", "12"], stdin=None)


def test_in_place_refuses_a_file_edited_while_generating(chat_models, tmp_path):
    p = tmp_path / "three.py"
    p.write_text("x = <FILL>\ny = <FILL>\nz = <FILL>\n")
    proc = subprocess.Popen(dschat_cmd() + ["fim", "-i", "--all", "--stats", str(p), "--model", str(chat_models["v3"]),
                                            "-t", "1.0", "--seed", "5", "-n", "12", "--speculative", "none"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stderr.readline()  # the first hole's statistics: two more holes are still to generate
    assert first.startswith(b"{"), first
    p.write_text("x = 1  # the user's edit\ny = <FILL>\nz = <FILL>\n")
    err = first + proc.stderr.read()
    assert proc.wait(timeout=120) == 1
    lines = err.decode().splitlines()
    assert lines[-1] == f"dschat: error: {os.path.realpath(p)}: changed on disk while dschat worked; not overwritten", err
    assert p.read_text() == "x = 1  # the user's edit\ny = <FILL>\nz = <FILL>\n"
    assert [x.name for x in tmp_path.iterdir()] == ["three.py"]


def test_in_place_writes_through_a_symlink(chat_models, tmp_path):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "a.py"
    target.write_text("def f():\n    return <FILL>\n")
    link = tmp_path / "link.py"
    link.symlink_to(target)
    shown = fim(chat_models["v3"], link).stdout
    r = fim(chat_models["v3"], "-i", link)
    assert r.returncode == 0, r.stderr
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_bytes() == shown and b"<FILL>" not in shown
    assert sorted(x.name for x in (tmp_path / "real").iterdir()) == ["a.py"]


def test_in_place_refuses_a_read_only_file_before_loading_anything(tmp_path):
    p = tmp_path / "ro.py"
    p.write_text("x = <FILL>\n")
    p.chmod(0o444)
    # the model does not exist: the refusal comes first, before the model is looked at
    r = call(["fim", "-i", str(p), "--model", str(tmp_path / "no-model")], stdin=None)
    assert_clean_error(r, f"{os.path.realpath(p)}: read-only")
    assert p.read_text() == "x = <FILL>\n" and (p.stat().st_mode & 0o777) == 0o444
    link = tmp_path / "link.py"
    link.symlink_to(p)
    r = call(["fim", "-i", str(link), "--model", str(tmp_path / "no-model")], stdin=None)
    assert_clean_error(r, f"{os.path.realpath(p)}: read-only")  # the target is named, not the link


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another owner")
def test_in_place_as_root_keeps_the_owner(chat_models, tmp_path):
    p = tmp_path / "theirs.py"
    p.write_text("x = <FILL>\n")
    os.chown(p, 4321, 4322)
    r = fim(chat_models["v3"], "-i", p)
    assert r.returncode == 0, r.stderr
    assert (p.stat().st_uid, p.stat().st_gid) == (4321, 4322) and "<FILL>" not in p.read_text()


def test_write_errors_name_the_target_not_the_temp_file(tmp_path):
    target = tmp_path / "missing-dir" / "out.json"  # no directory for the temporary file
    with pytest.raises(WriteError) as e:
        atomic_write_bytes(target, b"{}")
    assert str(e.value).startswith(f"{target}: cannot write") and ".tmp" not in str(e.value)
    p = tmp_path / "f.txt"
    p.write_bytes(b"old")
    snap = Snapshot.of(p)
    p.write_bytes(b"new, same size? no")
    with pytest.raises(WriteError, match="changed on disk"):
        atomic_write_bytes(p, b"mine", unchanged=snap)
    assert p.read_bytes() == b"new, same size? no" and os.listdir(tmp_path) == ["f.txt"]


# -- a byte-order mark and CRLF line endings ----------------------------------------------------------------------
PLAIN = "def f():\n    x = 1\n    return x\n"
END_OF_LINE_2 = PLAIN.index("\n", PLAIN.index("\n") + 1)


@pytest.mark.parametrize("bom, crlf, at, offset", [
    (True, False, "1:1", 0),  # after the BOM, not before it
    (False, True, "2", END_OF_LINE_2),  # before "\r\n", not between them
    (True, True, "2", END_OF_LINE_2),
])
def test_bom_and_crlf_are_kept_and_the_hole_is_outside_them(chat_models, chat_engines, tmp_path, bom, crlf, at,
                                                             offset):
    def as_file(text):
        return ("\ufeff" if bom else "") + (text.replace("\n", "\r\n") if crlf else text)

    p = tmp_path / "win.py"
    p.write_bytes(as_file(PLAIN).encode())
    r = fim(chat_models["v3"], "-i", "--at", at, p)
    assert r.returncode == 0, r.stderr
    want = engine_fill(chat_engines["v3"], PLAIN, offset, n=12)
    assert want.strip()  # something is inserted, so where it goes shows
    assert p.read_bytes() == as_file(PLAIN[:offset] + want + PLAIN[offset:]).encode()


def test_a_mixed_file_keeps_the_hole_before_a_crlf(chat_models, chat_engines, tmp_path):
    text = "a = 1\r\nb = 2\nc = 3\n"
    p = tmp_path / "mixed.py"
    p.write_bytes(text.encode())
    r = fim(chat_models["v3"], "--at", "1", p)
    want = engine_fill(chat_engines["v3"], text, 5, n=12)
    assert want.strip()
    assert r.returncode == 0 and r.stdout.decode() == text[:5] + want + text[5:]


def test_the_demo_models_notice_shows_once(tmp_path):
    p = tmp_path / "d.py"
    p.write_text("import os\nprint(os.path.<FILL>)\n")
    r = call(["fim", str(p), "-n", "4"], stdin=None)
    assert r.returncode == 0, r.stderr
    assert r.stderr.decode().count("using the bundled demo model") == 1, r.stderr


@pytest.mark.parametrize("text", [
    "a = 1\n\x0c\ndef f():\n    return <FILL>\n",  # a form feed (Python's own sources have them)
    "x = 'a\rb'\ny = <FILL>\nz = 3",  # a lone CR inside a line; no line break at the end
])
def test_diff_applies_with_patch(chat_models, tmp_path, text):
    """Issue 27 item 11: the diff split lines at form feeds and lone CRs (str.splitlines), which patch rejects."""
    work = tmp_path / "work"
    work.mkdir()
    p = work / "a.py"
    p.write_bytes(text.encode())
    whole = fim(chat_models["v3"], p).stdout
    diff = fim(chat_models["v3"], p, "--diff").stdout
    assert diff.startswith(b"--- a/"), diff
    r = subprocess.run(["patch", "--quiet", "--batch", "--fuzz=0", "--no-backup-if-mismatch", str(p)], input=diff, capture_output=True)
    assert r.returncode == 0, (r.stdout, r.stderr, diff)
    assert p.read_bytes() == whole


def test_in_place_keeps_hard_links(chat_models, tmp_path):
    """Issue 27 item 12: -i renamed a new file over the name given, so another hard link kept the old text.
    A file with other links is written in place; a file with one name is still replaced atomically."""
    p, other = tmp_path / "a.py", tmp_path / "b.py"
    p.write_text("def f():\n    return <FILL>\n")
    os.link(p, other)
    inode = p.stat().st_ino
    shown = fim(chat_models["v3"], p).stdout
    r = fim(chat_models["v3"], "-i", p)
    assert r.returncode == 0, r.stderr
    assert p.read_bytes() == shown == other.read_bytes()
    assert p.stat().st_ino == inode == other.stat().st_ino and p.stat().st_nlink == 2
    single = tmp_path / "c.py"
    single.write_text("def f():\n    return <FILL>\n")
    before = single.stat().st_ino
    assert fim(chat_models["v3"], "-i", single).returncode == 0
    assert single.read_bytes() == shown and single.stat().st_ino != before  # renamed over: atomic
