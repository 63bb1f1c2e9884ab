"""Files dschat did not write are opened only when they are regular files, and read only up to a size: a FIFO
named like a cached prefix or a model's tokenizer.json hung dschat beyond SIGTERM and SIGINT (12 minutes,
until SIGKILL); now a FIFO model file is one line naming it, and a FIFO cache file is ignored with a warning."""

from __future__ import annotations

import os

import pytest
from helpers import assert_clean_error, call, model_copy


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "config.json",
                                  "model.safetensors.index.json", "model-00002-of-000003.safetensors"])
def test_a_fifo_in_the_model_directory_is_one_line(chat_models, tmp_path, name):
    model = model_copy(chat_models["v3"], tmp_path / "m")
    (model / name).unlink()
    os.mkfifo(model / name)
    r = call(["--model", str(model), "-t", "0", "-n", "2"], stdin="question")
    assert_clean_error(r, name, "a FIFO, not a regular file")


def test_a_fifo_named_like_a_cache_file_is_ignored(chat_models):
    model = ["--model", str(chat_models["v3"]), "-t", "0", "-n", "3"]
    assert call(model, stdin="question").returncode == 0
    kv = [p for p in (os.environ["XDG_CACHE_HOME"] + "/dschat/kv",) if os.path.isdir(p)][0]
    cached = [f for f in os.listdir(kv) if f.endswith(".safetensors")]
    assert cached
    for f in cached:
        os.unlink(os.path.join(kv, f))
        os.mkfifo(os.path.join(kv, f))
    r = call([*model, "-c"], stdin="and again")
    assert r.returncode == 0, r.stderr
    assert "a FIFO, not a regular file" in r.stderr.decode()  # a warning: the prefix is computed again


# -- files the user gives dschat to read ---------------------------------------------------------------------------
def test_fim_refuses_what_is_not_a_regular_file_or_too_large(tmp_path):
    """`fim /dev/zero` read until memory ran out and a 13 MB file took 42 s: now one line, before any model
    loads (no --model is needed to see it)."""
    from dschat.fim.source_file import MAX_SOURCE_BYTES

    os.mkfifo(tmp_path / "fifo.py")
    assert_clean_error(call(["fim", str(tmp_path / "fifo.py")], stdin=None), "a FIFO, not a regular file")
    assert_clean_error(call(["fim", "/dev/zero"], stdin=None), "a character device, not a regular file")
    big = tmp_path / "big.py"
    big.write_text("x = 1\n" * (MAX_SOURCE_BYTES // 6 + 1) + "<FILL>\n")
    assert_clean_error(call(["fim", str(big)], stdin=None), "big.py", "more than the 2,097,152")
    assert_clean_error(call(["fim", "-"], stdin=big.read_bytes()), "stdin: more than 2,097,152 bytes")


def test_a_fifo_config_file_or_import_file_is_one_line(tmp_path):
    config = tmp_path / "xdg_config_home" / "dschat"
    config.mkdir(parents=True)
    os.mkfifo(config / "config.toml")
    assert_clean_error(call(["hello"], env={"XDG_CONFIG_HOME": str(tmp_path / "xdg_config_home")}),
                       "config.toml: a FIFO, not a regular file")
    os.mkfifo(tmp_path / "chat.json")
    assert_clean_error(call(["import", str(tmp_path / "chat.json")]), "chat.json: a FIFO, not a regular file")


def test_a_fifo_in_place_of_turns_lock_is_one_line(chat_models):
    """(dschat's own file, where another program put a FIFO: opening it waited for a reader)"""
    data = os.path.join(os.environ["XDG_DATA_HOME"], "dschat")
    model = ["--model", str(chat_models["v3"]), "-t", "0", "-n", "2"]
    assert call(model, stdin="question").returncode == 0
    os.mkfifo(os.path.join(data, "turns.lock"))
    assert_clean_error(call([*model, "-c"], stdin="again"), "turns.lock")
