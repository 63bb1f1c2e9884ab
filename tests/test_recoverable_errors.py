"""Problems that are not the user's turn failing: line mode's /save to a bad path is reported and the chat goes
on; a cache directory that cannot be written is a warning, and the answer still exits 0 and is saved."""

from __future__ import annotations

import pexpect
from helpers import PROMPT, ask, call, spawn

from dschat.history.store import Store


def test_save_to_a_bad_path_is_reported_and_line_mode_goes_on(chat_models, tmp_path):
    p = spawn("--plain", "--model", str(chat_models["v3"]), "-t", "0", "-n", "4")
    p.expect_exact(PROMPT)
    ask(p, "hello")
    out = ask(p, "/save /nonexistent/x.json")
    assert "not saved: /nonexistent/x.json" in out
    assert f"saved to {tmp_path}" in ask(p, f"/save {tmp_path / 'x.json'}")  # still running
    p.sendline("/exit")
    p.expect(pexpect.EOF)
    p.close()
    assert p.exitstatus == 0
    assert (tmp_path / "x.json").exists()


def test_a_cache_directory_that_is_a_file_is_a_warning(chat_models, tmp_path):
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("not a directory")
    r = call(["--model", str(chat_models["v3"]), "-t", "0", "-n", "4"], stdin="hello",
            env={"XDG_CACHE_HOME": str(blocker)})
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert r.stdout.strip() and "Traceback" not in err
    assert [line for line in err.splitlines() if "latent cache was not saved" in line][0].startswith("dschat: warning:")
    conv = Store().latest()
    assert [m.role for m in conv.messages] == ["user", "assistant"]
    assert blocker.read_text() == "not a directory"
