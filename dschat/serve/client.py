"""`dschat --server URL` (and a server found through its discovery file): the engine of a running `dschat serve`.

RemoteEngine has the Engine's chat face (what ChatSession, reply.py and the FIM fill use): tokenizer,
context_length, eos_token_ids, generation_config, path, fingerprint, generate(ids, params) returning a Generation
that iterates token ids, has its `stats` (GenerationStats) and `close()`. generate() posts the prompt's ids to
the server's /dschat/v1/generate (native.py) and streams the ids back; close() disconnects, and the server stops
that generation at once. The tokenizer and the chat template are read here, from the model directory the server
reports (the server runs on this machine, or the model is at the same path here): the ids sent are the ones the
in-process run would feed the engine, and the ids saved in the history the ones the engine generated.

`find(opts, notice)` decides: --no-server, none; --server URL, that one; else the newest live server in the
runtime directory (discovery.py), said in one line to `notice`. A model named (--model, $DSCHAT_MODEL, the config
file), a --quant or a --dtype other than the server's is an error, not a silent switch.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time
from contextlib import suppress
from pathlib import Path
from urllib.parse import urlsplit

from dschat.engine import ContextLengthError, Generation, GenerationStats, Tokenizer
from dschat.errors import UsageError, error_text
from dschat.serve import discovery

VERSION = 1
CONNECT_TIMEOUT = 10.0  # seconds to reach the server and hear its answer's head; tokens may take any time
PROBE_TIMEOUT = 3.0  # for a server found in the runtime directory


class ServerError(Exception):
    """The server could not be reached, or answered with an error (one line, naming it)."""


class RemoteGeneration(Generation):
    def __init__(self, tokens, stats, conn):
        super().__init__(tokens, stats)
        self._conn = conn

    def close(self):
        super().close()
        self._conn.close()  # also when no token was asked for yet: the server sees the client go


class Server:
    """One server's address and credentials, and its requests."""

    def __init__(self, url: str, token: str | None = None):
        parts = urlsplit(url if "://" in url else "http://" + url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"--server {url!r}: give an http:// URL, such as http://127.0.0.1:8012")
        self.url = f"{parts.scheme}://{parts.netloc}"
        self.https, self.host = parts.scheme == "https", parts.hostname
        self.port = parts.port or (443 if self.https else 80)
        self.token = token

    def connect(self, timeout: float) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=timeout)

    def headers(self) -> dict:
        h = {"Content-Type": "application/json"}
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        return h

    def request(self, method: str, path: str, body: dict | None = None, timeout: float = CONNECT_TIMEOUT):
        """(connection, response) with the response's head read; a failure to reach it is a ServerError."""
        conn = self.connect(timeout)
        try:
            conn.request(method, path, body=None if body is None else json.dumps(body).encode(),
                         headers=self.headers())
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise ServerError(f"cannot reach the server at {self.url} ({error_text(e)}); is `dschat serve` "
                              "running? (--no-server loads the model in this process)") from None
        return conn, resp

    def info(self, timeout: float = CONNECT_TIMEOUT) -> dict:
        conn, resp = self.request("GET", "/dschat/v1/info", timeout=timeout)
        try:
            data = resp.read()
        finally:
            conn.close()
        if resp.status != 200:
            raise self.failure(resp.status, data)
        try:
            info = json.loads(data)
            version = info["version"]
        except (ValueError, KeyError, TypeError):
            raise ServerError(f"{self.url} does not answer as `dschat serve` does (no /dschat/v1/info)") from None
        if version != VERSION:
            raise ServerError(f"the server at {self.url} speaks dschat's protocol version {version}, this dschat "
                              f"version {VERSION}: run the same dschat on both sides")
        return info

    def failure(self, status: int, data: bytes) -> Exception:
        """An error answer as the exception the in-process engine raises for it, else a ServerError."""
        try:
            err = json.loads(data)["error"]
            message, code = (err.get("message"), err.get("code")) if isinstance(err, dict) else (str(err), None)
        except (ValueError, KeyError, TypeError):
            message, code = f"HTTP {status}", None
        if code == "context_length_exceeded":
            return ContextLengthError(message)
        if status == 401:
            return ServerError(f"the server at {self.url} wants an API key: set $DSCHAT_API_KEY")
        if status == 404 and code == "not_found":
            return ServerError(f"{self.url} does not answer as `dschat serve` does ({message})")
        return ServerError(f"the server at {self.url}: {message}")


def _stats_from(stats: GenerationStats, d: dict):
    for key, value in d.items():
        if hasattr(stats, key):
            setattr(stats, key, dict(value) if key == "load" else value)


def _hang_up_on(stop, ended, conn):
    """Shut the connection's socket once `stop` is set (unless the generation `ended` first)."""
    while not ended.is_set():
        if stop.wait(0.05):
            with suppress(OSError):
                if conn.sock is not None and not ended.is_set():
                    conn.sock.shutdown(socket.SHUT_RDWR)
            return


class RemoteEngine:
    """A running server's engine, as ChatSession and the FIM fill use an Engine (see the module's docstring)."""

    def __init__(self, server: Server, info: dict):
        self.server, self.info = server, info
        self.url = server.url
        self.path = Path(info["path"])
        if not (self.path / "tokenizer.json").is_file():
            raise ServerError(f"the server at {self.url} runs {self.path}, which is not on this machine: dschat "
                              "reads the model's tokenizer and template from its directory (run dschat where the "
                              "server runs, or --no-server)")
        self.tokenizer = Tokenizer.from_dir(self.path)
        self.name = info["model"]
        self.context_length = int(info["context_length"])
        self.eos_token_ids = tuple(info["eos_token_ids"])
        self.generation_config = dict(info["generation_config"])
        self.fingerprint = info["fingerprint"]
        self.device = f"{info['device']}, served at {self.url}"
        self.dtype, self.quant, self.speculative = info["dtype"], info["quant"], info["speculative"]
        self.load_stats: dict = {}
        self.stats: GenerationStats | None = None

    def generate(self, ids: list[int], params=None, reuse_cache: bool = True, stop=None) -> Generation:
        """The server's Generation of `ids` (see the module's docstring): the same checks as the engine's
        (a prompt that does not fit is a ContextLengthError here), then its token ids as they come. `stop` (a
        threading.Event) ends it as the engine's does: once set, the connection is closed (the server stops
        with it, its prefill too) and the tokens end, without an error."""
        from dschat.engine import SamplingParams

        params = params or SamplingParams()
        body = {"ids": [int(i) for i in ids], "reuse_cache": reuse_cache,
                "params": {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
                           "seed": params.seed, "max_tokens": params.max_tokens,
                           "stop_token_ids": list(params.stop_token_ids), "ignore_eos": params.ignore_eos}}
        conn, resp = self.server.request("POST", "/dschat/v1/generate", body)
        if resp.status != 200:
            data = resp.read()
            conn.close()
            raise self.server.failure(resp.status, data)
        if conn.sock is not None:
            conn.sock.settimeout(None)  # waiting in the queue, a long prefill: as long as it takes
        stats = GenerationStats(prompt_tokens=len(body["ids"]))
        self.stats = stats
        return RemoteGeneration(self._tokens(conn, resp, stats, stop), stats, conn)

    def _tokens(self, conn, resp, stats: GenerationStats, stop=None):
        t_first, ended = None, threading.Event()
        if stop is not None:  # Esc while the server prefills: the read waiting for the first token is cut short
            threading.Thread(target=_hang_up_on, args=(stop, ended, conn), daemon=True).start()
        try:
            while True:
                try:
                    line = resp.readline()
                except (OSError, http.client.HTTPException) as e:
                    if stop is not None and stop.is_set():
                        return
                    raise ServerError(f"the server at {self.url} went away mid-reply ({error_text(e)})") from None
                if not line and stop is not None and stop.is_set():
                    return
                if not line:
                    raise ServerError(f"the server at {self.url} went away mid-reply")
                d = json.loads(line)
                if "ids" in d:
                    if d.get("stats"):
                        _stats_from(stats, d["stats"])
                    for token in d["ids"]:
                        now = time.perf_counter()
                        t_first = t_first or now
                        stats.generated_tokens += 1
                        stats.decode_s = now - t_first  # kept current here; the server's figures at the end
                        yield token
                    if stop is not None and stop.is_set():
                        return
                elif d.get("done"):
                    _stats_from(stats, d["stats"])
                    return
                elif "error" in d:
                    raise self.server.failure(500, line)
        finally:
            ended.set()
            conn.close()

    def load_prefix(self, ids, directory=None, secret_file=None) -> int:
        return 0  # the server's cache already holds what its earlier requests computed

    def save_prefix(self, ids, directory=None, cap_gb: float = 4.0, secret_file=None) -> int:
        return 0  # the server keeps its cache (and `dschat -c` asks the same server)


# -- which server -----------------------------------------------------------------------------------------------
def _named_model(opts) -> tuple[str, str] | None:
    """(the model the run names, where it was named) or None when none is named (the bundled demo by default)."""
    if opts.model:
        return opts.model, "--model"
    if os.environ.get("DSCHAT_MODEL"):
        return os.environ["DSCHAT_MODEL"], "DSCHAT_MODEL"
    if opts.config.model:
        return opts.config.model, "model (config file)"
    return None


def _same_model(name: str, info: dict) -> bool:
    from dschat.runtime import DEMO_DIR

    if name in info.get("names", []) or name == info["model"]:
        return True
    path = DEMO_DIR if name == "demo" else Path(name).expanduser()
    try:
        return path.is_dir() and path.resolve() == Path(info["path"]).resolve()
    except OSError:
        return False


def check_matches(opts, info: dict, url: str):
    """The server runs what this run asks for, or a UsageError says how they differ."""
    from dschat.runtime import quant_name

    hint = "(--no-server loads it in this process)"
    named = _named_model(opts)
    if named and not _same_model(named[0], info):
        raise UsageError(f"{named[1]} {named[0]}, but the server at {url} runs {info['model']} ({info['path']}) "
                         f"{hint}")
    quant = quant_name(opts)
    if quant and quant != (info["quant"] or None):
        raise UsageError(f"--quant {quant}, but the server at {url} runs {info['model']} as "
                         f"{info['quant'] or info['dtype']} {hint}")
    dtype = opts.dtype or opts.config.dtype
    if dtype and dtype != "auto" and dtype != info["dtype"]:
        raise UsageError(f"--dtype {dtype}, but the server at {url} runs {info['model']} in {info['dtype']} {hint}")


def find(opts, notice) -> RemoteEngine | None:
    """The server this run uses, or None: load the model in this process (see the module's docstring)."""
    if getattr(opts, "no_server", False):
        return None
    if getattr(opts, "server", None):
        server = Server(opts.server, os.environ.get("DSCHAT_API_KEY"))
        known = next((f for f in discovery.servers() if f.url == server.url), None)
        if known is not None and not server.token:
            server.token = known.token
        info = server.info()
        check_matches(opts, info, server.url)
        return RemoteEngine(server, info)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun's ranks each load their part
        return None
    for found in discovery.servers():
        server = Server(found.url, found.token)
        try:
            info = server.info(timeout=PROBE_TIMEOUT)
        except (ServerError, UsageError):
            continue  # not (or no longer) the server that wrote the file: a stale file
        if info.get("pid") != found.pid:
            continue
        check_matches(opts, info, server.url)
        engine = RemoteEngine(server, info)
        notice(f"dschat: using the server at {server.url} ({info['model']}, pid {found.pid}; --no-server loads "
               "the model in this process)")
        return engine
    return None


def open_engine(opts, progress=None, notice=None):
    """The engine a chat or `dschat fim` runs on: the server `find` chooses (said in one line to `notice`, by
    default on stderr), else the model loaded here (runtime.load_engine, `progress` its bar)."""
    from dschat.runtime import load_engine
    from dschat.signals import start_up_done
    from dschat.terminal.text import say

    remote = find(opts, notice or say)
    if remote is not None:
        start_up_done()  # a Ctrl+C while connecting stops here, as one while loading does
        return remote
    return load_engine(opts, progress)
