"""CPU threads: chosen from the model's bytes per token and the cores free, `--threads` and the config file's
`threads` override, and `--stats` says how many ran."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from helpers import assert_clean_error, call

from dschat.engine import threads


def stats_of(*args, env=None):
    r = call(["-t", "0", "-n", "4", "--no-save", "--stats", *args], stdin="def f(x):", env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stderr.decode().strip().splitlines()[-1])


def test_a_small_model_decodes_on_one_thread_a_large_one_on_the_free_cores(monkeypatch):
    assert threads.choose_threads(10 * 2**20) == 1
    assert threads.choose_threads(10 * 2**20, requested=3) == 3
    monkeypatch.setattr(threads, "cores", lambda: 8)
    monkeypatch.setattr(os, "getloadavg", lambda: (3.2, 0.0, 0.0))  # ourselves + ~2 busy processes
    assert threads.choose_threads(2**30) == 6
    monkeypatch.setattr(os, "getloadavg", lambda: (40.0, 0.0, 0.0))
    assert threads.choose_threads(2**30) == 1


def test_stats_say_how_many_threads_ran_and_the_flag_and_config_override():
    before = torch.get_num_threads()
    try:
        s = stats_of()  # the bundled demo model: a few MB per token
        assert s["threads"] == 1 and 0 < s["bytes_per_token"] < threads.SMALL_MODEL_BYTES
        assert stats_of("--threads", "2")["threads"] == 2
        conf = Path(os.environ["XDG_CONFIG_HOME"]) / "dschat" / "config.toml"
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text("threads = 3\n")
        assert stats_of()["threads"] == 3
        assert stats_of("--threads", "2")["threads"] == 2  # the flag wins
        conf.write_text('threads = "many"\n')
        r = call(["-n", "1"], stdin="x")
        assert r.returncode != 0 and "threads" in r.stderr.decode() and "Traceback" not in r.stderr.decode()
    finally:
        torch.set_num_threads(before)


def test_bad_thread_counts_are_refused():
    assert_clean_error(call(["--threads", "0", "-n", "1"], stdin="x"), "--threads 0")
