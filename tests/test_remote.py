"""`dschat --server URL` and a server found through its discovery file (issue 22 item 2): pipe mode, line mode and
`dschat fim` on a running `dschat serve` do what they do in-process: the same answer, the same token ids saved,
the same --stats line; Ctrl+C stops the server's generation; a stale file is ignored; a model other than the
server's is an error line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pexpect
import pytest
import torch
from helpers import (ACCEPTED, PROMPT, ServerThread, assert_clean_error, call, clean, dschat_cmd, free_port, greedy,
                     http, make_app, ready, replies, run, send, spawn, until)

from dschat.conversation.template import chat_prompt
from dschat.engine import Engine
from dschat.history.store import Store
from dschat.runtime import DEMO_DIR
from dschat.serve import discovery

SOURCE = "import os\n\n\ndef list_files(path):\n    names = []\n    for name in os.listdir(path):\n<FILL>\n    return names\n"


@pytest.fixture(scope="module")
def demo_server():
    # loaded as `dschat --model demo` loads it (speculative "auto": measured, then plain on this CPU), so that
    # the in-process run and the server's report the same --stats
    engine = Engine.from_pretrained(DEMO_DIR, dtype=torch.float32)
    with ServerThread(engine, names=("demo",)) as s:
        yield s


def saved_exchange():
    conv = Store().latest()
    user, reply = conv.messages[-2:]
    return conv, user.token_ids, reply.token_ids


def wait_until(check, timeout=30.0, what="the condition"):
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < timeout, f"waited {timeout} s for {what}"
        time.sleep(0.02)


def test_pipe_mode_on_the_server_is_the_in_process_run(demo_server):
    ask = ["-t", "0", "-n", "16", "--stats", "def read_config(path):"]
    local = call(["--model", "demo", "--no-server", *ask])
    assert local.returncode == 0, local.stderr
    _, local_prompt, local_reply = saved_exchange()
    remote = call(["--server", demo_server.url, *ask])
    assert remote.returncode == 0, remote.stderr
    conv, remote_prompt, remote_reply = saved_exchange()
    assert remote.stdout == local.stdout and remote.stdout.strip()
    assert remote_prompt == local_prompt and remote_reply == local_reply and remote_reply  # the exact ids saved
    assert conv.fingerprint == demo_server.state.engine.fingerprint and "demo_model" in conv.model
    # the same --stats line: every key, and the same counts
    lstats = json.loads(local.stderr.decode().strip().splitlines()[-1])
    rstats = json.loads(remote.stderr.decode().strip().splitlines()[-1])
    assert list(rstats) == list(lstats)
    for key in ("prompt_tokens", "generated_tokens", "forwards", "stop_reason", "drafter", "weight_bytes"):
        assert rstats[key] == lstats[key], key
    assert rstats["prefill_s"] > 0 and rstats["decode_s"] > 0
    # a continued conversation on the server: its prompt extends the saved ids
    again = call(["--server", demo_server.url, "-c", "-t", "0", "-n", "4", "and then?"])
    assert again.returncode == 0, again.stderr
    _, prompt2, _ = saved_exchange()
    assert prompt2[: len(remote_prompt) + len(remote_reply)] == remote_prompt + remote_reply


def test_a_client_of_a_server_never_imports_torch(demo_server):
    """What makes it start in a fraction of a second: the model is the server's, and so is PyTorch."""
    code = ("import sys\nfrom dschat.cli.main import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    code = e.code\nprint('torch' in sys.modules, code, file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", code, "--server", demo_server.url, "-n", "2", "--no-save", "hi"],
                       capture_output=True, text=True, timeout=120)
    assert r.stderr.strip().splitlines()[-1] == "False 0", r.stderr


def test_fim_on_the_server_is_dschat_fims(demo_server, tmp_path):
    f = tmp_path / "files.py"
    f.write_text(SOURCE)
    local = call(["fim", str(f), "--model", "demo", "--no-server", "-n", "24", "--json", "--stats"], stdin=None)
    remote = call(["fim", str(f), "--server", demo_server.url, "-n", "24", "--json", "--stats"], stdin=None)
    assert local.returncode == 0 and remote.returncode == 0, (local.stderr, remote.stderr)
    assert json.loads(remote.stdout) == json.loads(local.stdout)
    assert json.loads(remote.stdout)["insertion"]
    assert list(json.loads(remote.stderr.decode().splitlines()[-1])) == \
        list(json.loads(local.stderr.decode().splitlines()[-1]))


def test_bad_requests_and_servers(demo_server):
    # the native endpoint checks what the engine checks, before queueing: OpenAI-shaped errors
    for body, status, code in [({"ids": [10**7]}, 400, "invalid_request"),
                               ({"ids": [1] * 4000, "params": {"max_tokens": 200}}, 400, "context_length_exceeded"),
                               ({"ids": []}, 422, "invalid_value"), ({"ids": [1], "params": {"top_p": 0}}, 422,
                                                                     "invalid_value"),
                               ({"ids": [1], "params": {"max_tokens": 10**6}}, 422, "invalid_value")]:
        got, _, res = http(demo_server.port, "POST", "/dschat/v1/generate", body)
        assert (got, res["error"]["code"]) == (status, code), res
    assert "exceeds the context window of 4096 tokens" in http(
        demo_server.port, "POST", "/dschat/v1/generate", {"ids": [1] * 4000, "params": {"max_tokens": 200}})[2][
        "error"]["message"]  # the engine's ContextLengthError, which the client raises again
    # a model other than the server's
    r = call(["--server", demo_server.url, "--model", str(DEMO_DIR.parent), "hi"])
    assert_clean_error(r, "but the server at", "--no-server", code=2)
    # nothing listening there
    r = call(["--server", f"http://127.0.0.1:{free_port()}", "hi"])
    assert_clean_error(r, "cannot reach the server", code=1)
    assert Store().latest() is None  # nothing saved by any of them
    assert demo_server.state.scheduler.status()["running"] == 0


def test_ctrl_c_stops_the_servers_generation(chat_engines):
    """SIGINT to a pipe-mode client mid-reply: the client exits 130 with the partial reply saved, and the
    server's generation stops at once (its queue place free, its cache pages released)."""
    engine = chat_engines["v3"]
    with ServerThread(engine, names=("tiny-v3",), queue=1) as server:
        sched = server.state.scheduler
        p = subprocess.Popen(dschat_cmd() + ["--server", server.url, "-t", "1.0", "-n", "4000", "--seed", "1",
                                             "tell me a long story"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            first = p.stdout.read(1)  # the answer streams
            assert first, p.stderr.read()
            assert sched.status()["running"] == 1
            p.send_signal(signal.SIGINT)
            t0 = time.monotonic()
            wait_until(lambda: sched.status()["running"] == 0, 10, "the server to stop generating")
            stopped_in = time.monotonic() - t0
            code = p.wait(30)
        finally:
            p.kill()
        err = p.stderr.read().decode()
        assert code == 130 and "Traceback" not in err and err.strip().endswith("interrupted"), err
        assert stopped_in < 2.0 and sched.status()["cancelled"] == 1
        assert engine.stats.generated_tokens < 4000
        _, _, reply = saved_exchange()
        assert reply and Store().latest().messages[-1].interrupted
        status, _, res = http(server.port, "POST", "/completion", {"prompt": "x", "n_predict": 2})
        assert status == 200 and res["tokens_predicted"] == 2  # its place is free at once


def test_line_mode_on_the_server(demo_server):
    p = spawn("--plain", "--server", demo_server.url, "-t", "0", "-n", "10", "--no-save")
    p.expect_exact(PROMPT)
    assert "served at " + demo_server.url in clean(p.before)
    p.sendline("What is MLA?")
    p.expect_exact(ACCEPTED)
    p.expect_exact(PROMPT)
    out = clean(p.before)
    eng = demo_server.state.engine
    _, want = greedy(eng, chat_prompt(eng.tokenizer, [{"role": "user", "content": "What is MLA?"}])[1], 10)
    assert want.strip() and want.strip().split()[0] in out
    p.sendline("/exit")
    p.expect(pexpect.EOF)
    p.close()
    assert p.exitstatus == 0


async def test_the_tui_on_the_server(chat_models, chat_engines):
    """A TUI turn on the server is the engine's answer; Esc stops the server's generation."""
    eng = chat_engines["v3"]
    _, want = greedy(eng, chat_prompt(eng.tokenizer, [{"role": "user", "content": "What is MLA?"}])[1], 12)
    with ServerThread(eng, names=("tiny-v3",)) as server:
        app = make_app(chat_models["v3"], "--server", server.url, "-n", "12")
        async with app.run_test(size=(100, 30)) as pilot:
            await ready(pilot, app)
            assert server.url in app.sub_title
            await send(pilot, app, "What is MLA?")
            assert replies(app)[-1].text.strip() == want.strip()
            app.session.sampling = app.session.sampling.__class__(temperature=1.0, top_p=1.0, top_k=0, seed=1,
                                                                  max_tokens=4000)
            done = app.turns_done
            prompt = app.query_one("PromptArea")
            prompt.text = "a long story"
            prompt.focus()
            await pilot.press("enter")
            await until(pilot, lambda: server.state.scheduler.status()["running"] == 1 and len(
                replies(app)[-1].text) > 20)
            await pilot.press("escape")
            await until(pilot, lambda: app.turns_done > done, timeout=10)
            await until(pilot, lambda: server.state.scheduler.status()["running"] == 0, timeout=5)
        assert server.state.scheduler.status()["cancelled"] == 1
    conv = Store().latest()
    assert conv.messages[-1].interrupted and conv.messages[1].content == want.strip()


# -- dschat serve as a process, found through its discovery file ---------------------------------------------------
def test_a_local_server_is_found_used_and_forgotten(chat_models):
    port = free_port()
    serve = subprocess.Popen(dschat_cmd() + ["serve", "--model", "demo", "--port", str(port), "--api-key", "s3cret"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        line = serve.stderr.readline()
        assert f"http://127.0.0.1:{port}" in line, line
        files = list(discovery.runtime_dir().glob("server-*.json"))
        assert [f.name for f in files] == [f"server-{port}.json"]
        assert oct(files[0].stat().st_mode & 0o777) == "0o600"
        found = discovery.servers()[0]
        assert found.pid == serve.pid and found.url == f"http://127.0.0.1:{port}" and found.token
        assert http(port, "GET", "/dschat/v1/info")[0] == 401  # the server has a key: the file's token is one too
        assert http(port, "GET", "/dschat/v1/info", headers={"Authorization": f"Bearer {found.token}"})[0] == 200
        r = run(["--no-save", "-t", "0", "-n", "8", "def add(a, b):"])
        err = r.stderr.decode()
        assert r.returncode == 0, err
        assert err.count("\n") == 1 and f"using the server at http://127.0.0.1:{port}" in err  # one line, no demo note
        local = call(["--no-save", "--no-server", "--model", "demo", "-t", "0", "-n", "8", "def add(a, b):"])
        assert r.stdout == local.stdout and r.stdout.strip()
        # a model other than the server's: an error line, not a silent switch
        r = call(["--no-save", "--model", str(chat_models["v3"]), "hi"])
        assert_clean_error(r, "but the server at", "runs demo", code=2)
    finally:
        serve.terminate()
        serve.wait(30)
    assert "Traceback" not in serve.stderr.read()
    assert list(discovery.runtime_dir().glob("server-*.json")) == []  # removed as it stopped


def test_a_stale_file_is_ignored(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    path = discovery.write(f"http://127.0.0.1:{free_port()}", 1, "demo", str(DEMO_DIR), "t0ken")
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "pid": dead.pid}))
    assert discovery.servers() == []
    r = call(["--no-save", "-t", "0", "-n", "2", "hi"])
    assert r.returncode == 0 and "server" not in r.stderr.decode(), r.stderr
    # a live pid that is not the server at that URL (nothing listens there): ignored too
    path.write_text(json.dumps({**data, "pid": os.getpid()}))
    assert len(discovery.servers()) == 1
    r = call(["--no-save", "-t", "0", "-n", "2", "hi"])
    assert r.returncode == 0 and "server" not in r.stderr.decode(), r.stderr
