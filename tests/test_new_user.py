"""What a new user tripped on (issue 23, section 4), outside the TUI: each is a fix with its regression test."""

from __future__ import annotations

import re

import pytest
from helpers import call

import dschat.fim.command as fim_command


@pytest.mark.parametrize("word, meant", [("conversation", "conversations"), ("show", "export"),
                                         ("server", "serve"), ("quantise", "quantize"), ("ls", "conversations")])
def test_a_word_close_to_a_command_asks_instead_of_loading_a_model(word, meant):
    r = call([word], stdin=None)
    err = r.stderr.decode()
    assert r.returncode == 2 and f"did you mean `dschat {meant}`?" in err and f"dschat -- {word}" in err
    assert "demo model" not in err  # nothing loaded: the notice comes with loading


def test_a_real_one_word_question_still_works_after_double_dash():
    r = call(["-n", "2", "--no-save", "--", "show"], stdin=None)
    assert r.returncode == 0 and "did you mean" not in r.stderr.decode()
    assert call(["-n", "2", "--no-save", "hello"], stdin=None).returncode == 0  # not close to any command


def test_version():
    r = call(["--version"], stdin=None)
    assert r.returncode == 0 and re.fullmatch(r"dschat \d+\.\d+\.\d+\S*\n", r.stdout.decode())


def test_an_unknown_quantization_is_a_usage_error_before_anything_loads():
    r = call(["--quant", "int3", "hi"], stdin=None)
    err = r.stderr.decode()
    assert r.returncode == 2 and "--quant int3" in err and "demo model" not in err


@pytest.mark.parametrize("command, metavars", [("import", ["FILE"]), ("rm", ["ID"]), ("rename", ["ID", "TITLE"]),
                                               ("export", ["ID"])])
def test_history_commands_describe_their_arguments(command, metavars):
    r = call([command, "--help"], stdin=None)
    out = r.stdout.decode()
    assert r.returncode == 0
    positional = out[out.index("positional arguments:"):out.index("options:")]
    for m in metavars:
        line = next(line for line in positional.splitlines() if line.strip().startswith(m))
        assert len(line.split()) > 1, f"{command} {m} has no help: {line!r}"


def test_the_engine_finds_the_bundled_demo_model_by_the_clis_name():
    from dschat.engine import Engine

    eng = Engine.from_pretrained("demo", device="cpu")
    assert (eng.path / "config.json").exists() and eng.path.name == "demo_model"


def test_an_empty_insertion_is_said(chat_models, tmp_path, monkeypatch):
    src = tmp_path / "a.py"
    src.write_text("def f():\n    <FILL>\n")
    real = fim_command.fill_with_stats

    def nothing(*a, **kw):  # the model stops at once: an insertion of nothing
        _, _, stats = real(*a, **kw)
        return "", "stop", stats

    monkeypatch.setattr(fim_command, "fill_with_stats", nothing)
    r = call(["fim", "-i", str(src), "--model", str(chat_models["v3"]), "-n", "4"], stdin=None)
    assert r.returncode == 0 and src.read_text() == "def f():\n    \n"
    err = r.stderr.decode()
    assert "inserted nothing at " in err and "a.py:2:5 (stop)" in err and "marker is removed" in err
