"""`dschat` end to end: pipe mode, --raw, --show-prompt and --stats in a subprocess, and every bad input (a bad
model through the entry point in this process)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch

from helpers import assert_clean_error, call, dschat_cmd, run
from dschat.engine import Engine, SamplingParams
from dschat.history.store import Store


def greedy_text(engine, ids, n):
    out = list(engine.generate(ids, SamplingParams(max_tokens=n)))
    return engine.tokenizer.decode(out, skip_special_tokens=True)


# -- the happy paths --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["v3", "v2"])
def test_pipe_mode_streams_the_engines_greedy_answer(chat_models, chat_engines, kind):
    from dschat.conversation.template import chat_prompt

    """For v2, with --stats and --no-save (a process start costs seconds): the answer is the same, the stats line
    alone on stderr, nothing saved."""
    stats = ["--stats", "--no-save"] if kind == "v2" else []
    r = run(["--model", str(chat_models[kind]), "-t", "0", "-n", "12", *stats], stdin="What is MLA?\n")
    assert r.returncode == 0, r.stderr
    _, ids = chat_prompt(chat_engines[kind].tokenizer, [{"role": "user", "content": "What is MLA?"}])
    want = greedy_text(chat_engines[kind], ids, 12).strip()
    assert r.stdout.decode() == want + "\n"
    assert b"\x1b" not in r.stdout
    if not stats:
        assert r.stderr == b""
        return
    lines = r.stderr.decode().splitlines()
    assert len(lines) == 1, "more than the stats line on stderr"
    stats = json.loads(lines[0])
    assert 1 <= stats["generated_tokens"] <= 12 and stats["prompt_tokens"] > 1
    for key in ("prompt_tokens", "cached_tokens", "ttft_s", "decode_tokens_per_s", "draft_tokens", "accepted_tokens"):
        assert key in stats
    assert Store().latest() is None, "--no-save saved the conversation"


def test_raw_mode_is_text_completion(chat_models, chat_engines):
    from dschat.conversation.template import completion_prompt

    r = run(["--model", str(chat_models["v3"]), "--raw", "-t", "0", "-n", "10", "def fib(n):"], stdin=None)
    assert r.returncode == 0, r.stderr
    _, ids = completion_prompt(chat_engines["v3"].tokenizer, "def fib(n):")
    assert ids[0] == chat_engines["v3"].tokenizer.bos_token_id and ids.count(ids[0]) == 1
    assert r.stdout.decode() == greedy_text(chat_engines["v3"], ids, 10) + "\n"


def test_raw_mode_keeps_the_completions_leading_whitespace(chat_models, chat_engines):
    """The prompt plus the output is the text the model continued, byte for byte: for code, the leading
    whitespace of a completion is indentation."""
    from dschat.conversation.template import completion_prompt

    source = "def f(x):\n    return"
    r = run(["--model", str(chat_models["v3"]), "--raw", "-t", "0", "-n", "6"], stdin=source)
    assert r.returncode == 0, r.stderr
    _, ids = completion_prompt(chat_engines["v3"].tokenizer, source)
    want = greedy_text(chat_engines["v3"], ids, 6)
    assert want[0].isspace()  # this model's first token here starts with a space
    assert r.stdout.decode() == want + "\n"
    assert Store().latest().messages[1].content == want  # and the history keeps it exactly


def test_show_prompt_is_the_exact_prompt_stdin_first(chat_models, chat_engines):
    from dschat.conversation.template import chat_prompt

    r = run(["--model", str(chat_models["v3"]), "--show-prompt", "-s", "Be brief.", "review this"],
            stdin="diff --git a/x b/x\n")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    text, ids = chat_prompt(chat_engines["v3"].tokenizer, [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "diff --git a/x b/x\n\nreview this"}])
    assert got == {"text": text, "ids": ids}
    assert got["text"].index("diff --git") < got["text"].index("review this")


def test_help_reads_well():
    r = run(["--help"], stdin=None)
    assert r.returncode == 0
    text = r.stdout.decode()
    for needle in ("echo \"question\" | dschat", "--model", "--temperature", "--show-prompt", "--raw", "fim",
                   "hf download"):
        assert needle in text


def test_generation_config_defaults(chat_models, tmp_path):
    from dschat.settings.config import Settings
    from dschat.runtime import Options, sampling_params

    d = tmp_path / "m"
    shutil.copytree(chat_models["v2"], d)
    (d / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.3, "top_p": 0.95,
                                                          "max_new_tokens": 77}))
    eng = Engine.from_pretrained(d, dtype=torch.float32)
    p = sampling_params(Options(config=Settings.load()), eng, 10)
    assert (p.temperature, p.top_p, p.max_tokens) == (0.3, 0.95, 77)
    p = sampling_params(Options(config=Settings.load(), temperature=0.0, top_p=0.5), eng, 10)
    assert (p.temperature, p.top_p) == (0.0, 0.5)


# -- bad input: one readable line, non-zero exit, no traceback -------------------------------------------------------
def broken_copy(chat_models, tmp_path, how):
    d = tmp_path / "broken"
    shutil.copytree(chat_models["v2"], d)
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    shard = d / index["lm_head.weight"]
    if how == "truncated shard":
        shard.write_bytes(shard.read_bytes()[:1000])
        return d, shard.name
    if how == "missing shard":
        shard.unlink()
        return d, shard.name
    if how == "truncated config":
        (d / "config.json").write_text((d / "config.json").read_text()[:40])
        return d, "config.json"
    if how == "unreadable config":
        (d / "config.json").write_bytes(b"\xff\xfe\x00garbage")
        return d, "config.json"
    if how == "unknown model_type":
        cfg = json.loads((d / "config.json").read_text())
        cfg["model_type"] = "mamba"
        (d / "config.json").write_text(json.dumps(cfg))
        return d, "'mamba'"
    if how == "no tokenizer":
        (d / "tokenizer.json").unlink()
        return d, "tokenizer"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated shard", "missing shard", "truncated config", "unreadable config",
                                 "unknown model_type", "no tokenizer"])
def test_bad_models(chat_models, tmp_path, how):
    d, needle = broken_copy(chat_models, tmp_path, how)
    r = call(["--model", str(d), "-n", "3"], stdin="hello")
    assert_clean_error(r, needle)


def test_missing_model_directory(tmp_path):
    r = call(["--model", str(tmp_path / "nowhere")], stdin="hello")
    assert_clean_error(r, "nowhere")


def test_no_model_configured_says_how_to_get_one(tmp_path):
    r = call([], stdin="hello", env={"DSCHAT_MODEL": "", "DSCHAT_NO_DEMO": "1"})
    assert_clean_error(r, "hf download", "--model")


def test_stdin_that_is_not_utf8(chat_models):
    r = run(["--model", str(chat_models["v2"])], stdin=b"caf\xe9 \xff\n")
    assert_clean_error(r, "UTF-8", code=2)


def test_ctrl_c_while_streaming_exits_130_without_traceback(chat_models):
    p = subprocess.Popen(dschat_cmd() + ["--model", str(chat_models["v3"]), "-t", "1.0", "-n", "100000",
                                         "--seed", "1", "--no-save"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdin.write(b"tell me a long story")
    p.stdin.close()
    first = p.stdout.read(1)  # the answer has started streaming
    assert first
    p.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    code = p.wait(timeout=30)
    assert time.monotonic() - t0 < 10
    err = p.stderr.read().decode()
    assert code == 130 and "Traceback" not in err, err


def test_a_reader_that_goes_away_keeps_the_reply_so_far(chat_models):
    """`dschat ... | head`: the reader closes the pipe mid-answer. dschat ends quietly (141, as for SIGPIPE) and
    the reply generated so far is saved, marked interrupted."""
    p = subprocess.Popen(dschat_cmd() + ["--model", str(chat_models["v3"]), "-t", "1.0", "-n", "100000",
                                         "--seed", "1"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdin.write(b"tell me a long story")
    p.stdin.close()
    assert p.stdout.read(40)  # the answer streams; then the reader goes
    p.stdout.close()
    code = p.wait(timeout=60)
    err = p.stderr.read().decode()
    assert code == 128 + signal.SIGPIPE and "Traceback" not in err, err
    conv = Store().latest()
    assert conv is not None and [m.role for m in conv.messages] == ["user", "assistant"]
    assert conv.messages[1].interrupted and len(conv.messages[1].content) >= 10


def test_the_chat_without_a_terminal_on_stdout_is_a_clear_error(tmp_path):
    import pty

    master, slave = pty.openpty()  # stdin is a terminal, stdout a pipe: `dschat > file`
    try:
        r = subprocess.run(dschat_cmd(), stdin=slave, capture_output=True, timeout=60)
    finally:
        os.close(slave)
        os.close(master)
    err = r.stderr.decode()
    assert r.returncode == 2 and r.stdout == b""
    assert err.count("\n") == 1 and "needs a terminal" in err
