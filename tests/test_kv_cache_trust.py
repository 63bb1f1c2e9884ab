"""The saved latent cache is used only for the weights that wrote it, and only as written: its key holds a
hash of every shard's content (remembered by inode, size and times, so it is computed once per file), and
its checksum is keyed with a secret of the user's."""

from __future__ import annotations

import json
import os

from dschat.dev import tiny_checkpoints as tc
from helpers import call


def stats(r) -> dict:
    assert r.returncode == 0, r.stderr
    return json.loads(r.stderr.decode().strip().splitlines()[-1])


def test_other_weights_of_the_same_shapes_do_not_share_the_cache(chat_models, tmp_path):
    """A model of the same shapes with other weights reused another's cached prefix and answered otherwise
    than from a cold start."""
    a = chat_models["v3"]
    b = tc.write_checkpoint(tmp_path / "b", json.loads((a / "config.json").read_text()), seed=99,
                            tokenizer="deepseek-v3")
    assert stats(call(["--model", str(a), "-t", "0", "-n", "6", "--stats"], stdin="question"))["generated_tokens"]
    cont = ["--model", str(b), "-c", "--no-save", "-t", "0", "-n", "6", "--stats"]
    cold = call(cont, stdin="again", env={"XDG_CACHE_HOME": str(tmp_path / "empty-cache")})
    warm = call(cont, stdin="again")
    assert stats(warm)["cached_tokens"] == 0  # a's prefix is not b's
    assert warm.stdout == cold.stdout
    again = call(["--model", str(a), "-c", "--no-save", "-t", "0", "-n", "6", "--stats"], stdin="again")
    assert stats(again)["cached_tokens"] > 0  # a's own prefix still is a's


def test_a_shard_rewritten_in_place_changes_the_fingerprint_and_hashes_are_remembered(chat_models, tmp_path):
    from dschat.engine import Engine
    from dschat.engine.files import HASHES_FILE
    from dschat.engine.persist import default_dir

    cfg = json.loads((chat_models["v3"] / "config.json").read_text())
    model = tc.write_checkpoint(tmp_path / "m", cfg, seed=5)
    first = Engine.from_pretrained(model, speculative="none").fingerprint
    memo = json.loads((default_dir().parent / HASHES_FILE).read_text())
    assert len(memo) == len(list(model.glob("*.safetensors")))
    assert Engine.from_pretrained(model, speculative="none").fingerprint == first
    stamps = {p: os.stat(p) for p in model.glob("*.safetensors")}
    tc.write_checkpoint(tmp_path / "m2", cfg, seed=6)
    for p in model.glob("*.safetensors"):  # the same sizes, other bytes, written into the same files
        with open(p, "r+b") as f:
            f.write((tmp_path / "m2" / p.name).read_bytes())
        assert os.stat(p).st_size == stamps[p].st_size
        os.utime(p, ns=(stamps[p].st_atime_ns, stamps[p].st_mtime_ns))  # even with the old mtime
    assert Engine.from_pretrained(model, speculative="none").fingerprint != first


def test_altered_rows_with_a_recomputed_checksum_are_refused(chat_models, tmp_path):
    """The checksum was an unkeyed SHA-256 in the same file: altered rows with a recomputed one were used
    silently. Now it is an HMAC under the user's key (cache.key in the data directory, 0600): a checksum
    made without that key, or with another, does not pass."""
    import hashlib
    import hmac
    import stat

    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    base = ["--model", str(chat_models["v3"]), "-t", "0", "-n", "6", "--stats"]
    assert stats(call(base, stdin="question"))["generated_tokens"]
    kv = os.path.join(os.environ["XDG_CACHE_HOME"], "dschat", "kv")
    (path,) = [os.path.join(kv, f) for f in os.listdir(kv)]
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    data = load_file(path)
    data["rows"] = data["rows"] * 2
    blob = data["ids"].numpy().tobytes() + data["rows"].contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    for forged in (hashlib.sha256(blob).hexdigest(), hmac.new(os.urandom(32), blob, hashlib.sha256).hexdigest()):
        save_file(data, path, metadata={**meta, "sha256": forged, "hmac": forged})
        r = call([*base, "-c", "--no-save"], stdin="again")
        assert stats(r)["cached_tokens"] == 0
        assert "do not match their checksum" in r.stderr.decode()
    key_file = os.path.join(os.environ["XDG_DATA_HOME"], "dschat", "cache.key")
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600 and os.path.getsize(key_file) == 32
