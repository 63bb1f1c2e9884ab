"""`dschat serve` over real loopback HTTP: a real uvicorn server, the `openai` client, and raw requests shaped as
llama.vim, llama.vscode and Continue send them. Greedy output through every endpoint is the in-process engine's;
FIM through the three FIM endpoints is `dschat fim`'s."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import openai
import pytest
import torch
from helpers import ServerThread, assert_clean_error, call, greedy, http, run, sse_events, stream_lines, free_port

from dschat.engine import Engine
from dschat.fim.core import FIM_TOKENS, cut_repeat, fim_prompt
from dschat.runtime import DEMO_DIR
from dschat.conversation.template import chat_prompt, completion_prompt

SOURCE = "import os\n\n\ndef list_files(path):\n    names = []\n    for name in os.listdir(path):\n<FILL>\n    return names\n"


def load(path):
    return Engine.from_pretrained(path, dtype=torch.float32, speculative="none")


@pytest.fixture(scope="module")
def demo_engine():
    return load(DEMO_DIR)


# One engine serves and computes what to expect (loading one takes seconds): the test asks for the expected tokens
# while the server is idle, and one server at a time runs requests.
@pytest.fixture(scope="module")
def demo_server(demo_engine):
    with ServerThread(demo_engine, names=("demo",), max_body=256 * 1024) as s:
        yield s


@pytest.fixture(scope="module")
def v3_server(chat_engines):
    with ServerThread(chat_engines["v3"], names=("tiny-v3",)) as s:
        yield s


def client(server, key="none"):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def pages_all_released(engine) -> bool:
    """Every page of the latent cache is free or held by the prefix tree, none pinned by a sequence."""
    cache, nodes, stack = engine.cache, [], [engine.cache.root]
    while stack:
        n = stack.pop()
        stack.extend(n.children.values())
        if n is not cache.root:
            nodes.append(n)
    return all(n.refs == 0 for n in nodes) and len(cache.free) + len(nodes) == cache.num_pages


# -- the OpenAI shape, through the openai package ----------------------------------------------------------------------
@pytest.mark.parametrize("which", ["demo", "v3"])
def test_chat_completions_are_the_engines_greedy_tokens(which, demo_server, v3_server, demo_engine, chat_engines):
    server, engine = (demo_server, demo_engine) if which == "demo" else (v3_server, chat_engines["v3"])
    messages = [{"role": "user", "content": "def read_config(path):"}]
    out, text = greedy(engine, chat_prompt(engine.tokenizer, messages)[1], 12)
    assert text.strip()
    c = client(server)
    r = c.chat.completions.create(model=server.state.name, messages=messages, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == text.lstrip()
    assert r.usage.completion_tokens == len(out)
    assert r.choices[0].finish_reason == ("stop" if out[-1] in engine.eos_token_ids else "length")
    chunks = list(c.chat.completions.create(model=server.state.name, messages=messages, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text.lstrip()
    usage = chunks[-1].usage
    assert usage.prompt_tokens == r.usage.prompt_tokens and usage.prompt_tokens_details.cached_tokens > 0  # shared


@pytest.mark.parametrize("which", ["demo", "v3"])
def test_completions_are_the_engines_greedy_tokens(which, demo_server, v3_server, demo_engine, chat_engines):
    server, engine = (demo_server, demo_engine) if which == "demo" else (v3_server, chat_engines["v3"])
    prompt = "import os\n\n\ndef "
    out, text = greedy(engine, completion_prompt(engine.tokenizer, prompt)[1], 10)
    assert text.strip()
    c = client(server)
    r = c.completions.create(model=server.state.name, prompt=prompt, max_tokens=10, temperature=0)
    assert r.choices[0].text == text and r.usage.completion_tokens == len(out)
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=server.state.name, prompt=prompt, max_tokens=10, temperature=0, stream=True) if ch.choices)
    assert streamed == text
    # /completion (llama.cpp) and /api/generate raw (ollama) give the same tokens
    status, _, res = http(server.port, "POST", "/completion", {"prompt": prompt, "n_predict": 10, "temperature": 0})
    assert status == 200 and res["content"] == text and res["tokens_predicted"] == len(out)
    status, _, res = http(server.port, "POST", "/api/generate", {"model": server.state.name, "prompt": prompt,
                                                                 "raw": True, "stream": False,
                                                                 "options": {"temperature": 0, "num_predict": 10}})
    assert status == 200 and res["response"] == text and res["eval_count"] == len(out)


def test_stop_strings_cut_before_them(demo_server, demo_engine):
    prompt = "class Node:\n"
    _, text = greedy(demo_engine, completion_prompt(demo_engine.tokenizer, prompt)[1], 24)
    stop = text[10:13]
    assert stop, text
    r = client(demo_server).completions.create(model="demo", prompt=prompt, max_tokens=24, temperature=0, stop=[stop])
    assert r.choices[0].text == text[: text.find(stop)] and r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("opened,reply,want", [
    (False, "<think>\nlet me see</think>\n\nThe answer.", ("let me see", "The answer.")),
    (True, "\nwhy not</think>answer", ("why not", "answer")),
    (False, "plain answer </think>", ("", "plain answer </think>")),
    (False, "<thinking> is a tag", ("", "<thinking> is a tag")),
    (True, "still thinking </thi", ("still thinking </thi", "")),
])
def test_reasoning_is_split_from_the_answer_however_the_reply_is_cut(opened, reply, want):
    from dschat.conversation.reasoning import Reasoning

    for i in range(len(reply) + 1):
        for j in range(i, len(reply) + 1):
            split, parts = Reasoning(opened), [reply[:i], reply[i:j], reply[j:]]
            got = [split.feed(p) for p in parts] + [split.flush()]
            assert ("".join(r for r, _ in got), "".join(a for _, a in got)) == want, (i, j)


def test_r1_style_reasoning_comes_in_reasoning_content(chat_models, chat_engines, tmp_path):
    """A template that opens <think> (as R1's does): the reply until </think> is reasoning_content."""
    import os
    import shutil

    r1 = tmp_path / "r1"
    shutil.copytree(chat_models["v3"], r1, copy_function=os.symlink)
    config = json.loads((r1 / "tokenizer_config.json").read_text())
    config["chat_template"] = config["chat_template"].replace("{{'<｜Assistant｜>'}}{% endif %}",
                                                              "{{'<｜Assistant｜><think>\\n'}}{% endif %}")
    (r1 / "tokenizer_config.json").unlink()
    (r1 / "tokenizer_config.json").write_text(json.dumps(config))
    engine = load(r1)
    messages = [{"role": "user", "content": "why?"}]
    text, ids = chat_prompt(engine.tokenizer, messages)
    assert text.endswith("<think>\n")
    _, want = greedy(engine, ids, 6)
    want = want.lstrip()
    assert want
    with ServerThread(engine, names=("r1",)) as server:
        c = client(server)
        r = c.chat.completions.create(model="r1", messages=messages, max_tokens=6, temperature=0)
        assert r.choices[0].message.content == "" and r.choices[0].message.reasoning_content == want
        chunks = list(c.chat.completions.create(model="r1", messages=messages, max_tokens=6, temperature=0,
                                                stream=True))
        deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
        assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == want
        assert not "".join(d.content or "" for d in deltas)


# -- fill-in-the-middle: the three FIM endpoints give what `dschat fim` gives ------------------------------------------
def test_fim_endpoints_give_what_dschat_fim_gives(demo_server, tmp_path):
    f = tmp_path / "files.py"
    f.write_text(SOURCE)
    r = call(["fim", str(f), "--model", "demo", "-n", "24", "--json"], stdin=None)
    assert r.returncode == 0, r.stderr
    want = json.loads(r.stdout)["insertion"]
    hole = SOURCE.index("<FILL>")
    before, after = SOURCE[:hole], SOURCE[hole + len("<FILL>"):]
    cut = before.rfind("\n") + 1
    # llama.vim (autoload/llama.vim, llama#fim): lines before the cursor line, the cursor line's start as
    # `prompt`, the rest as the suffix; llama.vscode sends the same fields plus n_indent, n_cmpl, id_slot
    vim = {"input_prefix": before[:cut], "input_suffix": after, "input_extra": [], "prompt": before[cut:],
           "n_predict": 24, "n_indent": 4, "top_k": 40, "top_p": 0.99, "stream": False,
           "samplers": ["top_k", "top_p", "infill"], "cache_prompt": True, "t_max_prompt_ms": 500,
           "t_max_predict_ms": 60000,
           "response_fields": ["content", "timings/prompt_n", "timings/prompt_ms", "timings/prompt_per_token_ms",
                               "timings/prompt_per_second", "timings/predicted_n", "timings/predicted_ms",
                               "timings/predicted_per_token_ms", "timings/predicted_per_second", "truncated",
                               "tokens_cached"]}
    status, _, res = http(demo_server.port, "POST", "/infill", vim)
    assert status == 200 and res["content"] == want, res
    assert set(res) == set(vim["response_fields"])
    vscode = {"id_slot": 0, "input_prefix": before[:cut], "input_suffix": after, "input_extra": [],
              "prompt": before[cut:], "n_predict": 24, "n_cmpl": 1, "top_k": 40, "top_p": 0.99, "stream": False,
              "samplers": ["top_k", "top_p", "infill"], "cache_prompt": True, "n_indent": 4,
              "t_max_prompt_ms": 500, "t_max_predict_ms": 60000}
    status, _, res = http(demo_server.port, "POST", "/infill", vscode)
    assert status == 200 and res["content"] == want and res["tokens_cached"] > 0  # the same prompt again
    # Continue's ollama provider (core/llm/llms/Ollama.ts, _streamFim): prompt + suffix, options, NDJSON stream
    cont = {"model": "demo", "prompt": before, "suffix": after,
            "options": {"temperature": 0, "num_predict": 24, "num_ctx": 4096}, "keep_alive": 1800, "stream": True}
    conn, resp = stream_lines(demo_server.port, "/api/generate", cont)
    lines = [json.loads(line) for line in resp.read().decode().splitlines() if line.strip()]
    conn.close()
    assert "".join(x["response"] for x in lines) == want
    assert lines[-1]["done"] and lines[-1]["done_reason"] in ("stop", "length")
    assert all(not x["done"] and x["model"] == "demo" for x in lines[:-1])
    # the OpenAI completions endpoint with a suffix
    r = client(demo_server).completions.create(model="demo", prompt=before, suffix=after, max_tokens=24, temperature=0)
    assert r.choices[0].text == want


def test_keystrokes_on_one_line_prefill_only_what_changed(demo_server, demo_engine):
    """llama.vim sends the cursor line's start as `prompt`: it follows <｜fim▁end｜> (llama.cpp's layout), so the
    next keystroke on the line prefills only its last tokens; the insertion is the engine's greedy continuation."""
    tok = demo_engine.tokenizer
    before, after = SOURCE.split("<FILL>")
    lines = before.split("\n")
    prefix, line = "\n".join(lines[:-2]) + "\n", lines[-2] + "\n"  # the cursor inside the for line
    ask = {"input_prefix": prefix, "input_suffix": line[9:] + after, "input_extra": [], "n_predict": 8,
           "top_k": 40, "top_p": 0.99, "samplers": ["top_k", "top_p", "infill"], "cache_prompt": True}
    http(demo_server.port, "POST", "/infill", {**ask, "prompt": line[:8]})
    status, _, res = http(demo_server.port, "POST", "/infill", {**ask, "prompt": line[:9]})
    assert status == 200 and res["timings"]["prompt_n"] <= 3 < res["tokens_cached"], res
    ids = fim_prompt(tok, prefix, line[9:] + after) + tok.encode_plain(line[:9])
    out, text = greedy(demo_engine, ids, 8, stops=tok.fim)
    assert res["content"] == cut_repeat(text, line[9:] + after, False)[0]
    assert res["tokens_evaluated"] == len(ids) and res["tokens_predicted"] == len(out)


def test_fim_prompt_is_text_and_extra_context_is_shared(demo_server, demo_engine):
    tok = demo_engine.tokenizer
    chunks = [{"text": "def helper(x):\n    return x * 2\n" * 20, "time": 1.5, "filename": "util.py"}]
    # llama.vim's ring update: n_predict 0, only the extra context; nothing is generated
    warm = {"input_prefix": "", "input_suffix": "", "input_extra": chunks, "prompt": "", "n_predict": 0,
            "temperature": 0.0, "stream": False, "samplers": [], "cache_prompt": True, "t_max_prompt_ms": 1,
            "t_max_predict_ms": 1, "response_fields": [""]}
    status, _, res = http(demo_server.port, "POST", "/infill", warm)
    assert status == 200 and res == {}
    ask = {**warm, "input_prefix": "import os\n", "prompt": "x = ", "input_suffix": "\n", "n_predict": 4,
           "response_fields": None}
    status, _, res = http(demo_server.port, "POST", "/infill", ask)
    assert status == 200
    extra_tokens = len(tok.encode_plain(chunks[0]["text"]))
    assert res["tokens_cached"] >= extra_tokens and res["timings"]["prompt_n"] < 16, res
    status, _, res = http(demo_server.port, "POST", "/infill", {**ask, "cache_prompt": False})
    assert res["tokens_cached"] == 0 and res["timings"]["prompt_n"] == res["tokens_evaluated"]
    # the file's text is text: FIM token strings in it do not become FIM tokens
    text = "s = '" + "".join(FIM_TOKENS) + "'\n"
    status, _, res = http(demo_server.port, "POST", "/infill", {"input_prefix": text, "n_predict": 1,
                                                               "response_fields": ["tokens_evaluated"]})
    assert res["tokens_evaluated"] == 1 + 3 + len(tok.encode_plain(text)) + len(tok.encode_plain("")), res


# -- the other endpoints -------------------------------------------------------------------------------------------------
def test_models_show_tags_tokenize_template(demo_server, demo_engine):
    assert [m.id for m in client(demo_server).models.list()] == ["demo"]
    status, _, show = http(demo_server.port, "POST", "/api/show", {"name": "demo"})
    assert status == 200 and ".Suffix" in show["template"] and "insert" in show["capabilities"]
    assert all(len(line.split()) == 2 for line in show["parameters"].split("\n"))  # Continue parses each line
    status, _, tags = http(demo_server.port, "GET", "/api/tags")
    assert tags["models"][0]["name"] == "demo"
    tok = demo_engine.tokenizer
    status, _, res = http(demo_server.port, "POST", "/tokenize", {"content": "x = 1<｜fim▁hole｜>"})
    assert res["tokens"] == tok.encode("x = 1<｜fim▁hole｜>") and tok.fim[1] in res["tokens"]
    status, _, res = http(demo_server.port, "POST", "/tokenize", {"content": "x <｜fim▁hole｜>", "parse_special": False})
    assert tok.fim[1] not in res["tokens"]
    messages = [{"role": "user", "content": "hi <｜Assistant｜>"}]
    status, _, res = http(demo_server.port, "POST", "/apply-template", {"messages": messages})
    assert res["prompt"] == chat_prompt(tok, messages)[0]
    status, _, res = http(demo_server.port, "POST", "/api/chat", {"model": "demo:latest", "messages": messages,
                                                                  "stream": False, "options": {"temperature": 0,
                                                                                               "num_predict": 6}})
    assert status == 200 and res["message"]["content"] == greedy(demo_engine, chat_prompt(tok, messages)[1], 6)[1].lstrip()


# -- bad input: each shape's error, no traceback, the server keeps serving -----------------------------------------------
BAD = [
    ("POST", "/v1/chat/completions", b"{not json", 400, "openai"),
    ("POST", "/v1/chat/completions", b"\xff\xfe", 400, "openai"),
    ("POST", "/v1/chat/completions", [1, 2], 400, "openai"),
    ("POST", "/v1/chat/completions", {"messages": "hi"}, 422, "openai"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}, 422, "openai"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "model": "gpt-4o"}, 404, "openai"),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": -1}, 422, "openai"),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 10**9}, 422, "openai"),
    ("POST", "/v1/completions", {"prompt": [10**7]}, 400, "openai"),
    ("POST", "/v1/completions", {"prompt": "x", "temperature": -1}, 422, "openai"),
    ("GET", "/v1/nothing", None, 404, "openai"),
    ("GET", "/v1/chat/completions", None, 405, "openai"),
    ("POST", "/infill", {"input_prefix": "x", "n_cmpl": 100}, 422, "llamacpp"),
    ("POST", "/infill", {"input_prefix": 5}, 422, "llamacpp"),
    ("POST", "/infill", {"input_extra": [{"text": "a", "filename": "/etc/passwd"}], "n_predict": -5}, 422, "llamacpp"),
    ("POST", "/completion", {"prompt": "x", "n_predict": 10**9}, 422, "llamacpp"),
    ("GET", "/nothing", None, 404, "llamacpp"),
    ("POST", "/api/generate", {"model": "llama3", "prompt": "x"}, 404, "ollama"),
    ("POST", "/api/generate", {"model": "demo", "prompt": "x", "options": {"num_predict": "x"}}, 422, "ollama"),
    ("POST", "/api/chat", {"messages": [{"role": "wizard", "content": "x"}]}, 422, "ollama"),
]


@pytest.mark.parametrize("method,path,body,status,shape", BAD)
def test_bad_input_gets_the_shapes_error(demo_server, method, path, body, status, shape):
    got, _, res = http(demo_server.port, method, path, body)
    assert got == status, res
    assert isinstance(res, dict) and "Traceback" not in json.dumps(res)
    if shape == "openai":
        assert set(res["error"]) == {"message", "type", "param", "code"} and res["error"]["message"]
    elif shape == "llamacpp":
        assert res["error"]["code"] == status and res["error"]["message"]
    else:
        assert isinstance(res["error"], str) and res["error"]
    assert http(demo_server.port, "GET", "/health")[0] == 200


def test_a_body_over_the_limit_is_refused(demo_server):
    # declared: refused before it is read (a 100 MB Content-Length, only a few bytes sent)
    with socket.create_connection(("127.0.0.1", demo_server.port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100000000\r\n\r\n{\"prompt\": \"")
        answer = b""
        while chunk := s.recv(65536):  # the server answers and closes the connection
            answer += chunk
    head, _, body = answer.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 413") and json.loads(body)["error"]["code"] == "request_too_large"
    # sent: over the limit while it is read (no Content-Length: chunked)
    conn = __import__("http.client").client.HTTPConnection("127.0.0.1", demo_server.port, timeout=10)
    body = json.dumps({"input_prefix": "x" * 300_000}).encode()
    conn.request("POST", "/infill", body=iter([body[i:i + 65536] for i in range(0, len(body), 65536)]),
                 headers={"Content-Type": "application/json"}, encode_chunked=True)
    r = conn.getresponse()
    assert r.status == 413 and json.loads(r.read())["error"]["code"] == 413
    conn.close()
    assert http(demo_server.port, "GET", "/health")[0] == 200


def test_api_key(demo_engine):
    with ServerThread(demo_engine, names=("demo",), api_key="s3cret") as server:
        with pytest.raises(openai.AuthenticationError) as e:
            client(server, "wrong").models.list()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        assert http(server.port, "POST", "/infill", {"input_prefix": "x"})[0] == 401
        status, _, res = http(server.port, "POST", "/api/generate", {"prompt": "x"},
                              headers={"Authorization": "Bearer s3cret-not"})
        assert status == 401 and isinstance(res["error"], str)
        assert http(server.port, "GET", "/health")[0] == 200  # a liveness probe needs no key
        assert [m.id for m in client(server, "s3cret").models.list()] == ["demo"]
        status, _, res = http(server.port, "POST", "/infill", {"input_prefix": "x", "n_predict": 2},
                              headers={"Authorization": "Bearer s3cret"})
        assert status == 200 and "content" in res


def test_listening_beyond_loopback_needs_a_key():
    assert_clean_error(call(["serve", "--host", "0.0.0.0", "--model", "demo"]), "without an API key", code=2)
    assert_clean_error(call(["serve", "--port", "70000"]), "--port", code=2)


# -- the queue: bounded, FIFO, and a client that goes away frees its place at once ---------------------------------------
def test_full_queue_is_503_and_a_disconnect_stops_the_generation(demo_engine):
    with ServerThread(demo_engine, names=("demo",), queue=1) as server:
        long = {"prompt": "import", "n_predict": 4000, "ignore_eos": True, "stream": True, "temperature": 0}
        conn, resp = stream_lines(server.port, "/completion", long)
        assert resp.readline().startswith(b"data: ")  # running
        waiting = {}
        t = threading.Thread(target=lambda: waiting.update(r=http(server.port, "POST", "/completion",
                                                                  {"prompt": "x", "n_predict": 3, "temperature": 0})))
        t.start()
        t0 = time.monotonic()
        while server.state.scheduler.status()["waiting"] < 1:
            assert time.monotonic() - t0 < 10
            time.sleep(0.01)
        status, headers, res = http(server.port, "POST", "/v1/completions", {"prompt": "y"})
        assert status == 503 and int(headers["Retry-After"]) >= 1 and res["error"]["code"] == "queue_full"
        conn.close()  # the streaming client goes away: its generation stops, the waiting request runs
        t0 = time.monotonic()
        t.join(30)
        assert waiting["r"][0] == 200 and time.monotonic() - t0 < 10
        assert demo_engine.stats.generated_tokens == 3
        st = server.state.scheduler.status()
        assert st["waiting"] == st["running"] == 0 and st["cancelled"] >= 1
        assert pages_all_released(demo_engine)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


RSS_TOLERANCE = 16 * 2**20  # what 200 requests may add to the warm process (0.4 MiB measured on 2 cores)


def test_load_with_disconnects(demo_engine):
    """200 requests from 8 concurrent clients through four endpoints (OpenAI streamed and not, llama.cpp's
    /completion, dschat's own /dschat/v1/generate as `dschat --server` uses it), every fifth one dropped
    mid-stream: every completed one is the engine's greedy answer; after, no queue place is held, every cache
    page is free or in the prefix tree, and the process's memory (server and clients: one process) is flat."""
    from dschat.engine import SamplingParams
    from dschat.serve.client import RemoteEngine, Server

    prompts = ["def add(a, b):\n", "class Node:\n", "import sys\n", "for i in range(10):\n"]
    tok = demo_engine.tokenizer
    ids = {p: completion_prompt(tok, p)[1] for p in prompts}
    expect = {p: greedy(demo_engine, ids[p], 4) for p in prompts}  # (token ids, text)
    results, errors = [], []
    clients, per_client = 8, 25
    with ServerThread(demo_engine, names=("demo",), queue=16) as server:
        c = client(server)
        remote = RemoteEngine(Server(server.url), Server(server.url).info())

        def one(k, j):
            p = prompts[(k + j) % len(prompts)]
            kind = (k + j) % 4
            if j % 5 == 4:  # a client that goes away after the first piece
                if kind % 2:
                    gen = remote.generate(ids[p], SamplingParams(max_tokens=200, ignore_eos=True))
                    next(gen)
                    gen.close()
                else:
                    conn, resp = stream_lines(server.port, "/completion",
                                              {"prompt": p, "n_predict": 200, "ignore_eos": True, "stream": True})
                    resp.readline()
                    conn.close()
            elif kind == 0:
                got = c.completions.create(model="demo", prompt=p, max_tokens=4, temperature=0)
                results.append((p, "text", got.choices[0].text))
            elif kind == 1:
                got = "".join(ch.choices[0].text for ch in c.completions.create(
                    model="demo", prompt=p, max_tokens=4, temperature=0, stream=True) if ch.choices)
                results.append((p, "text", got))
            elif kind == 2:
                status, _, res = http(server.port, "POST", "/completion", {"prompt": p, "n_predict": 4,
                                                                           "temperature": 0})
                results.append((p, "text", res["content"] if status == 200 else res))
            else:
                gen = remote.generate(ids[p], SamplingParams(max_tokens=4))
                results.append((p, "ids", list(gen)))

        def worker(k, n):
            for j in range(n):
                try:
                    one(k, j)
                except Exception as e:  # noqa: BLE001 - reported below
                    errors.append(repr(e))

        def round_of(n):
            threads = [threading.Thread(target=worker, args=(k, n)) for k in range(clients)]
            for th in threads:
                th.start()
            for th in threads:
                th.join(120)

        round_of(5)  # warm: the server's threads, buffers and the prefix tree exist
        results.clear()
        before = rss_bytes()
        round_of(per_client)
        after = rss_bytes()
        assert not errors, errors[:3]
        assert len(results) == clients * per_client * 4 // 5
        wrong = [(p, kind, got) for p, kind, got in results if got != expect[p][0 if kind == "ids" else 1]]
        assert not wrong, wrong[:3]
        t0 = time.monotonic()
        while server.state.scheduler.status()["running"] or server.state.scheduler.status()["waiting"]:
            assert time.monotonic() - t0 < 10
            time.sleep(0.02)
        assert server.state.scheduler.status()["cancelled"] >= clients * per_client // 5
        assert pages_all_released(demo_engine)
        assert after - before < RSS_TOLERANCE, f"the process grew {(after - before) / 2**20:.1f} MiB"


# -- the command -------------------------------------------------------------------------------------------------------
def test_dschat_serve_runs_as_a_command(chat_models):
    """`dschat serve` as a process: it says where it listens, answers, and stops on SIGTERM."""
    import subprocess

    from helpers import dschat_cmd

    port = free_port()
    p = subprocess.Popen(dschat_cmd() + ["serve", "--model", str(chat_models["v3"]), "--port", str(port)],
                         stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        line = p.stderr.readline()
        assert f"http://127.0.0.1:{port}" in line, line
        t0 = time.monotonic()
        while True:
            try:
                if http(port, "GET", "/health")[0] == 200:
                    break
            except OSError:
                assert time.monotonic() - t0 < 60
                time.sleep(0.1)
        name = chat_models["v3"].name
        r = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0).chat.completions.create(
            model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0)
        assert r.usage.completion_tokens >= 1 and r.model == name
    finally:
        p.terminate()
        p.wait(30)
    assert "Traceback" not in p.stderr.read()
