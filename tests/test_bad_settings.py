"""Bad flags and config values through the real `dschat` command: one line on stderr naming the setting, a
non-zero exit, no traceback, and nothing written (no conversation, no cache) because nothing started."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pexpect
import pytest
from helpers import call, spawn

from dschat.settings.config import ConfigError, Settings
from dschat.settings.keymap import check_keymap, known_key


def assert_one_line_error(r, named: str):
    err = r.stderr.decode()
    assert r.returncode not in (0, None) and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and named in err, err


def assert_nothing_written():
    for var in ("XDG_DATA_HOME", "XDG_CACHE_HOME"):
        assert not (Path(os.environ[var]) / "dschat").exists(), var


def write_config(body: str) -> Path:
    cfg = Path(os.environ["XDG_CONFIG_HOME"]) / "dschat" / "config.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(body)
    return cfg


@pytest.mark.parametrize("args, named", [
    (["--device", "tpu"], "--device tpu"),
    (["-t", "nan"], "--temperature nan"),
    (["-t", "inf"], "--temperature inf"),
    (["-t", "-1"], "--temperature -1"),
    (["--top-p", "0"], "--top-p 0"),
    (["--top-p", "1.5"], "--top-p 1.5"),
    (["--top-k", "-2"], "--top-k -2"),
    (["-n", "0"], "--max-tokens 0"),
    (["--cache-gb", "-1"], "--cache-gb -1"),
    (["--cache-gb", "0"], "--cache-gb 0"),
    (["--draft-tokens", "0"], "--draft-tokens 0"),
])
def test_bad_flags_are_one_line_before_anything_starts(chat_models, args, named):
    r = call(["--model", str(chat_models["v3"]), *args], stdin="hello")
    assert_one_line_error(r, named)
    assert_nothing_written()


@pytest.mark.parametrize("body, named", [
    ('temperature = "64"\n', "'temperature'"),
    ("temperature = null\n", "temperature = null"),
    ("temperature = 1e40\n", "'temperature'"),
    ("top_p = 0\n", "'top_p'"),
    ("max_tokens = 1e40\n", "'max_tokens'"),
    ("max_tokens = -5\n", "'max_tokens'"),
    ('device = "tpu"\n', "'device'"),
    ('dtype = "float8"\n', "'dtype'"),
    ("[keys]\nstop = 5\n", "[keys] stop"),
])
def test_bad_config_values_name_the_setting(chat_models, body, named):
    write_config(body)
    r = call(["--model", str(chat_models["v3"])], stdin="hello")
    assert_one_line_error(r, named)
    assert_nothing_written()


@pytest.mark.parametrize("n", ["0", "-1"])
def test_conversations_n_must_be_positive(n):
    assert_one_line_error(call(["conversations", "-n", n], stdin=None), f"-n {n}")


@pytest.mark.parametrize("key, ok", [
    ("ctrl+s", True), ("f2", True), ("escape", True), ("question_mark", True), ("?", True), ("slash", True),
    ("ctrl+shift+up", True), ("nonsense", False), ("ctrl+", False), ("cmd+s", False), ("", False), ("f2 ", True),
])
def test_key_names(key, ok):
    assert known_key(key) is ok


def test_keymap_check_names_the_action_or_key(tmp_path):
    actions = {"stop": "escape", "quit": "ctrl+q"}
    check_keymap({"stop": "ctrl+s,f2"}, actions, None)
    with pytest.raises(ConfigError, match=re.escape("[keys] stopp: no such action")):
        check_keymap({"stopp": "ctrl+s"}, actions, None)
    with pytest.raises(ConfigError, match=re.escape("'ctrl+qq' is not a key name")):
        check_keymap({"quit": "ctrl+qq"}, actions, tmp_path / "config.toml")


@pytest.mark.parametrize("body, named", [
    ('[keys]\nquit = "nonsense"\n', "'nonsense' is not a key name"),
    ('[keys]\nstopp = "escape"\n', "stopp: no such action"),
    ('[keys]\nhelp = "ctrl+q"\n', "ctrl+q is quit's key"),  # issue 27 item 22: it took Quit away
])
def test_a_bad_key_binding_stops_the_tui_before_it_starts(chat_models, body, named):
    write_config(body)
    p = spawn("--model", str(chat_models["v3"]))
    p.expect(pexpect.EOF, timeout=60)
    p.close()
    out = p.before
    assert p.exitstatus not in (0, None) and "Traceback" not in out, out
    assert named in out and len(out.strip().splitlines()) == 1, out


def test_a_key_is_taken_from_another_action_only_when_that_one_is_rebound_too():
    actions = {"help": "f1", "quit": "ctrl+q", "stop": "escape"}
    with pytest.raises(ConfigError, match=re.escape("help = 'ctrl+q': ctrl+q is quit's key")):
        check_keymap({"help": "ctrl+q"}, actions, None)
    with pytest.raises(ConfigError, match=re.escape("f5 is stop's key")):
        check_keymap({"help": "f5", "stop": "f5"}, actions, None)
    check_keymap({"help": "ctrl+q", "quit": "f10"}, actions, None)  # quit keeps a key of its own
    check_keymap({"help": "f1,f2"}, actions, None)  # its own default again


def test_good_settings_still_load():
    write_config('temperature = 0\ntop_p = 1\nmax_tokens = 1\ndevice = "cuda:1"\n[keys]\nstop = "ctrl+s"\n')
    s = Settings.load()
    assert (s.temperature, s.top_p, s.device, s.keys) == (0, 1, "cuda:1", {"stop": "ctrl+s"})


@pytest.mark.parametrize("flags, config", [
    (["-t", "1e-40"], ""),
    (["-t", "1", "--top-p", "1e-300"], ""),
    ([], "temperature = 1e-300\n"),
    ([], "temperature = 1.0\ntop_p = 1e-300\n"),
])
def test_tiny_temperatures_and_top_p_are_greedy(chat_models, flags, config):
    """Issue 27 item 18: below the documented floors (engine.sampling.MIN_TEMPERATURE, MIN_TOP_P) sampling is
    greedy; before, these passed the checks and failed in torch (inf or nan probabilities)."""
    args = ["--model", str(chat_models["v3"]), "-n", "6", "--no-save", "--seed", "1"]
    greedy = call([*args, "-t", "0"], stdin="Hello.")
    assert greedy.returncode == 0, greedy.stderr
    write_config(config)
    r = call([*args, *flags], stdin="Hello.")
    assert r.returncode == 0, r.stderr
    assert r.stdout == greedy.stdout


@pytest.mark.parametrize("env, flags, named", [
    ({"DSCHAT_MODEL": "   "}, [], "DSCHAT_MODEL is blank"),
    ({"DSCHAT_MODEL": "foo\nbar"}, [], "DSCHAT_MODEL 'foo\\nbar'"),
    ({}, ["--model", "foo\nbar"], "--model 'foo\\nbar'"),
])
def test_a_blank_or_multi_line_model_name_is_named_whole(env, flags, named):
    """Issue 27 item 26: before, a blank DSCHAT_MODEL said ': no such model directory' and one with a line
    break was reported by its first line only."""
    r = call([*flags, "-n", "2", "--no-save"], stdin="Hello.", env=env)
    assert_one_line_error(r, named)
