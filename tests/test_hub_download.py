"""A hub id that is not in the local cache: `--show-prompt` fetches the tokenizer's files only, and a download
first says what it will fetch. The hub is a local HTTP server speaking the hub's protocol (the real one is
not reachable from the tests), serving a tiny checkpoint; huggingface_hub talks to it as to the hub."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import pytest
from helpers import assert_clean_error, run

REPO = "tiny-org/tiny-chat"
SHA = "0123456789abcdef0123456789abcdef01234567"


class _Hub(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)

    def _answer(self, body: bool):
        root, path = self.server.root, urlparse(self.path).path
        files = {p.name: p.read_bytes() for p in root.iterdir()}
        if path.startswith(f"/api/models/{REPO}/revision/"):
            data, headers = json.dumps({"id": REPO, "sha": SHA, "siblings": [{"rfilename": f} for f in files]}), {}
        elif path.startswith(f"/api/models/{REPO}/tree/"):
            data, headers = json.dumps([{"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                                        for f, b in files.items()]), {}
        elif path.startswith(f"/{REPO}/resolve/{SHA}/") and path.rsplit("/", 1)[1] in files:
            name = path.rsplit("/", 1)[1]
            self.server.fetched.append(name) if body else None
            data = files[name]
            headers = {"X-Repo-Commit": SHA, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}
        elif path.startswith("/api/models/"):  # as the hub answers for a repository it does not have
            self.send_response(401)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        else:
            self.send_error(404)
            return
        data = data.encode() if isinstance(data, str) else data
        self.send_response(200)
        for k, v in {**headers, "Content-Length": str(len(data))}.items():
            self.send_header(k, v)
        self.end_headers()
        if body:
            self.wfile.write(data)


@pytest.fixture
def hub(chat_models, tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    server.root, server.fetched = chat_models["v3"], []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}", "HF_HUB_OFFLINE": "0",
           "HF_HUB_CACHE": str(tmp_path / "hf-cache"), "HF_HUB_DISABLE_XET": "1"}
    yield server, env
    server.shutdown()


def notes(r) -> list[str]:
    """What dschat said on stderr (huggingface_hub's progress bars aside)."""
    return [line for line in r.stderr.decode().splitlines() if line.startswith("Downloading ")]


def test_show_prompt_fetches_only_the_tokenizer_and_a_download_says_what_it_fetches(hub, chat_models):
    """One hub, three runs in turn: --show-prompt fetches the tokenizer's files only (and says so), again fetches
    and says nothing, and a chat then downloads the rest, saying what it fetches."""
    server, env = hub
    r = run(["--model", REPO, "--show-prompt"], stdin="hello", env=env)
    assert r.returncode == 0, r.stderr
    assert sorted(server.fetched) == ["tokenizer.json", "tokenizer_config.json"]
    assert json.loads(r.stdout)["ids"]
    size = sum((chat_models["v3"] / f).stat().st_size for f in ("tokenizer.json", "tokenizer_config.json"))
    assert notes(r) == [f"Downloading {REPO} (its tokenizer) from the Hugging Face hub: 2 files, {size / 1e6:.1f} MB"]
    # and again: it is cached now, nothing more is fetched or said
    r = run(["--model", REPO, "--show-prompt"], stdin="hello", env=env)
    assert r.returncode == 0 and len(server.fetched) == 2 and r.stderr == b"", "a cached tokenizer was fetched again"
    # a chat: the tokenizer is cached, the rest is downloaded
    r = run(["--model", REPO, "-t", "0", "-n", "3", "--no-save", "hi"], stdin=None, env=env)
    assert r.returncode == 0, r.stderr
    cached = ("tokenizer.json", "tokenizer_config.json")
    rest = [p for p in chat_models["v3"].iterdir() if p.name not in cached]
    assert notes(r) == [f"Downloading {REPO} (its config, tokenizer and weights) from the Hugging Face hub: "
                        f"{len(rest)} files, {sum(p.stat().st_size for p in rest) / 1e6:.1f} MB"]
    assert sorted(server.fetched) == sorted([*cached, *(p.name for p in rest)])


def test_a_hub_that_cannot_be_reached_is_not_called_a_missing_model(tmp_path):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(tmp_path / "c")}
    r = run(["--model", REPO, "-n", "1", "hi"], stdin=None, env=env)
    assert_clean_error(r, REPO, "the hub could not be reached", "Connection refused")


def test_a_model_the_hub_does_not_have_is_named(hub, tmp_path):
    server, env = hub
    r = run(["--model", "tiny-org/no-such-model", "-n", "1", "hi"], stdin=None, env=env)
    assert_clean_error(r, "tiny-org/no-such-model", "no such model on the Hugging Face hub")
    assert "could not be reached" not in r.stderr.decode()
    assert server.fetched == []


def test_offline_and_not_cached_says_so(tmp_path):
    r = run(["--model", REPO, "-n", "1", "hi"], stdin=None, env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)})
    assert_clean_error(r, REPO, "not in the local Hugging Face cache", "HF_HUB_OFFLINE")
