"""Persisted latent-cache files carry a checksum of their rows: a file altered on disk (rows scaled or zeroed)
is a warning and a recompute with the same answer, never a silently different answer."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from helpers import call

from dschat.engine import Engine, SamplingParams
from dschat.engine.persist import CacheWarning
from dschat.history.store import Store


def alter(path, how):
    """Change the rows of a cache file in place, keeping its metadata (as a bit flip or a bad tool would)."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    data = load_file(str(path))
    data["rows"] = data["rows"] * 2 if how == "scaled" else torch.zeros_like(data["rows"])
    save_file(data, str(path), metadata=meta)


@pytest.mark.parametrize("how", ["scaled", "zeroed"])
def test_altered_rows_are_a_warning_and_a_recompute(chat_models, tmp_path, how):
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    ids = list(range(100, 140))
    eng = Engine.from_pretrained(chat_models["v2"], dtype=torch.float32, speculative="none")
    history = ids + list(eng.generate(ids, params))
    assert eng.save_prefix(history, tmp_path) > 0
    follow = history + list(range(200, 210))
    want = list(Engine.from_pretrained(chat_models["v2"], dtype=torch.float32, speculative="none")
                .generate(follow, params))
    (path,) = tmp_path.iterdir()
    alter(path, how)
    eng2 = Engine.from_pretrained(chat_models["v2"], dtype=torch.float32, speculative="none")
    with pytest.warns(CacheWarning, match="do not match their checksum"):
        assert eng2.load_prefix(history, tmp_path) == 0
    assert list(eng2.generate(follow, params)) == want and eng2.stats.cached_tokens == 0


def test_altered_cache_file_through_dschat(chat_models):
    model = chat_models["v3"]
    base = ["--model", str(model), "-t", "0", "-n", "8"]
    assert call(base, stdin="Tell me about pages.").returncode == 0
    kv_dir = os.path.join(os.environ["XDG_CACHE_HOME"], "dschat", "kv")
    (name,) = os.listdir(kv_dir)
    alter(os.path.join(kv_dir, name), "scaled")
    r = call(base + ["-c", "--no-save"], stdin="More please.")
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.decode().splitlines() if line.startswith("dschat: warning:")]
    assert len(warnings) == 1 and "checksum" in warnings[0], r.stderr
    fresh = call(base + ["--conversation", Store().latest().id, "--no-save"], stdin="More please.",
                env={"XDG_CACHE_HOME": os.environ["XDG_CACHE_HOME"] + "-empty"})
    assert r.stdout == fresh.stdout  # the answer of a cold start
