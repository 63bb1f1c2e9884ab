"""What several test files use: running the real `dschat` command (pipe mode, line mode in a pseudo-terminal,
the TUI under Pilot, torchrun ranks), checking its error line, the tiny checkpoints' recipes, the engine's own
FIM fill, and the transformers reference model."""

from __future__ import annotations

import contextlib
import http.client as http_client
import io
import json
import os
import re
import runpy
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pexpect
from dschat.dev import reference
from dschat.dev import tiny_checkpoints as tc
from dschat.dev.serving import ServerThread  # noqa: F401 - the tests' server
import torch

from dschat.cli.main import chat_parser, main
from dschat.settings.config import Settings
from dschat.engine import SamplingParams, Tokenizer
from dschat.fim.core import FIM_TOKENS, cut_repeat, fim_prompt
from dschat.runtime import Options
from dschat.conversation.template import chat_prompt
from dschat.tui.app import ChatApp
from dschat.tui.message_view import MessageView
from dschat.tui.prompt_area import PromptArea

CHECKPOINTS = {
    "v2_lite": lambda: tc.v2_lite_config(),
    "v2": lambda: tc.v2_config(),
    "v3": lambda: tc.v3_config(),
    "v3_legacy_rope": lambda: tc.v3_config(rope_parameters=False),
    "v3_fp8": lambda: tc.v3_fp8_config(),
}


def dschat_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "dschat"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "dschat"]


def run(args, stdin: bytes | str | None = b"", env=None, timeout=120):
    """The real `dschat` with these arguments; `env` adds variables to the tests' environment (None removes one)."""
    if isinstance(stdin, str):
        stdin = stdin.encode()
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    return subprocess.run(dschat_cmd() + list(args), input=stdin, capture_output=True, timeout=timeout, env=env)


def call(args, stdin: bytes | str | None = b"", env=None) -> subprocess.CompletedProcess:
    """The real `dschat` with these arguments through its entry point in this process, with stdin, stdout and
    stderr as pipes (no terminal); the same result as `run`. For what a command prints, saves and exits with,
    where the process boundary is not the point: a new process spends seconds importing torch. `env` sets
    variables while it runs (None removes one). Signals, terminals, processes at the same time and
    variables read at import time need `run`."""
    if isinstance(stdin, str):
        stdin = stdin.encode()
    with _environment(env or {}), _pipes(stdin or b"") as (out, err):
        try:
            main(list(args))
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        return subprocess.CompletedProcess(["dschat", *args], code, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def _environment(env: dict):
    saved = dict(os.environ)
    os.environ.update({k: v for k, v in env.items() if v is not None})
    for k in [k for k, v in env.items() if v is None]:
        os.environ.pop(k, None)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def _pipes(stdin: bytes):
    """stdin, stdout and stderr as pipes would be; warnings filtered as in a new interpreter; the signal
    handlers dschat installs undone after."""
    out, err = io.BytesIO(), io.BytesIO()
    stdin_text, stdout_text, stderr_text = (io.TextIOWrapper(b, encoding="utf-8", write_through=True)
                                            for b in (io.BytesIO(stdin), out, err))
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    saved_stdin, sys.stdin = sys.stdin, stdin_text
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(stdout_text), \
                contextlib.redirect_stderr(stderr_text):
            warnings.resetwarnings()  # each warning shown once, these left out
            for quiet in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", quiet)
            yield out, err
    finally:
        sys.stdin = saved_stdin
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def assert_clean_error(r, *needles, code=None):
    err = r.stderr.decode()
    assert r.returncode != 0 and (code is None or r.returncode == code), (r.returncode, err)
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dschat: error: "), err
    for n in needles:
        assert n in lines[0], err


def load_reference(path: Path):
    return reference.load(path, torch.float32)


ANSI = re.compile(r"\x1b\[[0-9;?]*[a-zA-Z]")


def clean(text: str) -> str:
    return ANSI.sub("", text).replace("\r", "")


def spawn(*args):
    cmd = dschat_cmd()
    return pexpect.spawn(cmd[0], cmd[1:] + list(args), encoding="utf-8", timeout=90, dimensions=(40, 160),
                         env={**os.environ, "PROMPT_TOOLKIT_NO_CPR": "1", "NO_COLOR": "1"})


# prompt-toolkit switches bracketed paste off when a line is accepted and on again for the next prompt:
# what is printed in between is dschat's answer to that line.
ACCEPTED, PROMPT = "\x1b[?2004l", "\x1b[?2004h"


def ask(p, text):
    p.sendline(text)
    p.expect_exact(ACCEPTED)
    p.expect_exact(PROMPT)
    return clean(p.before)


def long_reply(model) -> pexpect.spawn:
    """Line mode, once its reply to a request for a long answer has started."""
    p = spawn("--plain", "--model", str(model), "-t", "1.0", "-n", "100000", "--seed", "2")
    p.expect_exact(PROMPT)
    p.sendline("tell me everything")
    p.expect_exact(ACCEPTED)
    p.expect(r"\S", timeout=60)  # the reply has started
    return p


def make_app(model, *extra):
    args = chat_parser().parse_args(["--model", str(model), "-t", "0", *extra])
    return ChatApp(Options.from_args(args, Settings.load()))


async def until(pilot, cond, timeout=60.0):
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("timed out waiting")
        await pilot.pause(0.05)


async def ready(pilot, app):
    await until(pilot, lambda: app.engine is not None and app.chat is not None)


async def send(pilot, app, text):
    done = app.turns_done
    prompt = app.query_one(PromptArea)
    prompt.text = text
    prompt.focus()
    await pilot.press("enter")
    await until(pilot, lambda: app.turns_done > done)
    await pilot.pause(0.1)


async def answer(pilot, app, text):
    """Type an answer into the AskScreen that is open and press Enter."""
    from textual.widgets import Input

    from dschat.tui.ask_screen import AskScreen

    await until(pilot, lambda: isinstance(app.screen, AskScreen) and app.screen.query(Input))
    app.screen.query_one(Input).value = text
    await pilot.press("enter")
    await pilot.pause(0.1)


def replies(app):
    return [v for v in app.query(MessageView) if v.role == "assistant"]


def parrot(src, dst, answer: str, tokenizer: str = "deepseek-v3"):
    """A copy of the tiny chat model `src` that answers `answer` to any message, greedily: its layers add
    nothing to the residual (o_proj and down_proj are zero), so the next token is a function of the last one,
    which the embeddings and lm_head make a chain from the prompt's last token through the answer's to EOS."""
    cfg = json.loads((src / "config.json").read_text())
    with tempfile.TemporaryDirectory() as d:  # the tokenizer the copy will have (e.g. R1's: its template differs)
        tc.install_tokenizer(Path(d), tokenizer)
        tok = Tokenizer.from_dir(d)
    chain = [chat_prompt(tok, [{"role": "user", "content": "?"}])[1][-1]] + tok.encode(answer) + [cfg["eos_token_id"]]
    assert len(set(chain[:-1])) == len(chain) - 1 <= cfg["hidden_size"]  # each token says what comes next
    w = tc.random_weights(cfg, seed=1)
    for name in w:
        if name.endswith(("o_proj.weight", "down_proj.weight", "lm_head.weight", "embed_tokens.weight")):
            w[name].zero_()
    w["model.norm.weight"] = torch.ones(cfg["hidden_size"])
    for k, (token, following) in enumerate(zip(chain, chain[1:])):
        w["model.embed_tokens.weight"][token, k] = 1.0
        w["lm_head.weight"][following, k] = 1.0
    return tc.write_checkpoint(dst, cfg, weights=w, tokenizer=tokenizer)


def model_copy(src: Path, dst: Path, **tokenizer_config) -> Path:
    """The model `src` at `dst` (its files linked), its tokenizer_config.json changed by `tokenizer_config`."""
    dst.mkdir(parents=True)
    for f in Path(src).iterdir():
        (dst / f.name).symlink_to(f)
    if tokenizer_config:
        conf = json.loads((dst / "tokenizer_config.json").read_text())
        (dst / "tokenizer_config.json").unlink()
        (dst / "tokenizer_config.json").write_text(json.dumps({**conf, **tokenizer_config}))
    return dst


def engine_fill(engine, text, offset, n=24):
    """What the splice should insert: the engine's greedy FIM tokens, cut only by the stop rules."""
    tok = engine.tokenizer
    ids = fim_prompt(tok, text[:offset], text[offset:])
    stops = tuple(tok.token_id(t) for t in FIM_TOKENS)
    out = list(engine.generate(ids, SamplingParams(max_tokens=n, stop_token_ids=stops)))
    if out and (out[-1] in stops or out[-1] in engine.eos_token_ids):
        out = out[:-1]
    text_out = tok.decode(out, skip_special_tokens=True)
    return cut_repeat(text_out, text[offset:], offset == 0 or text[offset - 1] == "\n")[0]


WORKER = Path(__file__).with_name("tp_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(cases: list[dict], ids: list[int], ranks: int = 2, ok: bool = True):
    """One torchrun of tests/tp_worker.py over each case ({"path", "out", "fp8", "quant"}) in turn; what
    rank 0 wrote for each case, in order (the finished process instead when not `ok`)."""
    cases = [{k: str(v) for k, v in case.items()} for case in cases]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}",
           f"--master-port={free_port()}", str(WORKER), ",".join(map(str, ids)), json.dumps(cases)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    if not ok:
        return r
    assert r.returncode == 0, r.stderr[-3000:]
    return [torch.load(case["out"]) for case in cases]


# -- dschat serve ----------------------------------------------------------------------------------------------------
def http(port: int, method: str, path: str, body=None, headers=None, timeout=60):
    """One request with the standard library's client, as curl sends it: (status, headers, parsed JSON or text)."""
    conn = http_client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    raw = r.read()
    conn.close()
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = raw.decode("utf-8", "replace")
    return r.status, r.headers, parsed


def stream_lines(port: int, path: str, body: dict, headers=None, timeout=60):
    """(connection, response) of a streaming request; read it with response.readline()."""
    conn = http_client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json",
                                                                          **(headers or {})})
    return conn, conn.getresponse()


def sse_events(response) -> list[dict | str]:
    """The `data:` payloads of a whole SSE response (JSON parsed, [DONE] as the string)."""
    out = []
    for line in response.read().decode().splitlines():
        if line.startswith("data: "):
            payload = line[6:]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def greedy(engine, ids, n, stops=()):
    """The engine's greedy tokens for a prompt, and their text without the stop token."""
    out = list(engine.generate(ids, SamplingParams(max_tokens=n, stop_token_ids=tuple(stops))))
    body = out[:-1] if out and (out[-1] in engine.eos_token_ids or out[-1] in stops) else out
    return out, engine.tokenizer.decode(body, skip_special_tokens=True)


# -- benchmark scripts -----------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"


def lean_over_pages(eng, ids, params, want):
    """The engine's lean one-token step (eng.static.lean) decodes `want` (the plain path's greedy tokens for ids,
    params: a prompt and decode that fill two pages) whether the sequence's pages follow one another in the pool
    (its keys a view) or not (the pool hands out every other page, downwards: no two neighbours; read at their
    slots), its step running once a decoded token after the first."""
    lean = eng.static.lean
    calls = []
    lean.step = lambda *a: (calls.append(a[3]), type(lean).step(lean, *a))[1]
    try:
        for scatter in (False, True):
            eng.cache.clear()
            if scatter:
                eng.cache.free = eng.cache.free[-1::-2] + eng.cache.free[-2::-2]
            calls.clear()
            assert list(eng.generate(ids, params, reuse_cache=False)) == want
            assert len(calls) == params.max_tokens - 1 and (eng.static.contiguous == 2) != scatter
    finally:
        del lean.step


def smoke(name: str, args: list[str], cwd: Path, monkeypatch) -> subprocess.CompletedProcess:
    """benchmarks/NAME run as `python benchmarks/NAME ARGS` from `cwd` runs it, but in this process (a new one
    spends most of a smoke run's seconds importing torch and transformers): `__main__`, its argv, its folder
    first on sys.path, the working directory; its exit code, stdout and stderr (an exception it raises fails
    the test with its traceback). A script that puts the repository root on sys.path fails here."""
    path = BENCH / name
    monkeypatch.chdir(cwd)
    # TRITON_INTERPRET stays as the tests set it: a kernel module imported without it would keep compiled
    # kernels for this process (on the CPU the engine runs none; bench_kernels' smoke sets it itself). Only
    # bench_busy, which imports nothing of dschat here, starts its decode processes without it, as a user's.
    if name == "bench_busy.py":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(sys, "argv", [str(path), *args])
    saved_path, modules, threads = list(sys.path), set(sys.modules), torch.get_num_threads()
    saved_env, rng = dict(os.environ), torch.get_rng_state()  # what a script sets, put back after it
    sys.path.insert(0, str(BENCH))  # what Python puts first for a script
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(str(path), run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            err.write(f"{e.code}\n")
    finally:
        root_added = [p for p in sys.path if Path(p or ".").resolve() == REPO]
        sys.path[:] = saved_path
        for mod in set(sys.modules) - modules:  # the scripts' own modules (bench_reuse imports bench_decode)
            if Path(getattr(sys.modules[mod], "__file__", None) or "/").parent == BENCH:
                del sys.modules[mod]
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)
        os.environ.clear()
        os.environ.update(saved_env)
    assert not root_added, f"{name} put the repository root on sys.path"
    return subprocess.CompletedProcess([str(path), *args], code, out.getvalue(), err.getvalue())
