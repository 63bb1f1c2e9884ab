"""`dschat quantize` and `--quant` through the real command: the written directory loads packed and computes
exactly what quantizing on load computes; bad input is one line, a non-zero exit and nothing written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import assert_clean_error, call

from dschat.settings.config import Settings
from dschat.engine import Engine
from dschat.runtime import Options, quant_name


@pytest.fixture(scope="module")
def int4_dir(chat_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("quantized") / "v2-int4"
    r = call(["quantize", str(chat_models["v2"]), "--quant", "int4", "-o", str(out)])
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode().startswith(f"wrote {out}: int4, ")
    return out


def test_quantized_directory_loads_what_quantize_on_load_computes(chat_models, int4_dir):
    config = json.loads((int4_dir / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "dschat", "bits": 4, "group_size": 128,
                                             "symmetric": False}
    assert (int4_dir / "tokenizer.json").read_bytes() == (chat_models["v2"] / "tokenizer.json").read_bytes()
    assert not list(int4_dir.parent.glob(".*"))  # no temporary directory left behind
    index = json.loads((int4_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.mlp.experts.0.down_proj.weight_zero" in index and "lm_head.weight" in index
    # kv_b_proj is stored as is (a directory written before it ran packed is the same), packed as it loads
    assert "model.layers.1.self_attn.kv_b_proj.weight_scale" not in index
    saved = Engine.from_pretrained(int4_dir, dtype=torch.float32, speculative="none")
    fresh = Engine.from_pretrained(chat_models["v2"], dtype=torch.float32, speculative="none", quant="int4")
    assert saved.quant == fresh.quant == "int4"
    kv_b = saved.model.model.layers[1].self_attn.kv_b_proj
    assert type(kv_b).__name__ == "QuantLinear" and kv_b.spec.bits == 4
    ids = list(range(100, 116))
    assert torch.equal(saved.logits(ids), fresh.logits(ids))
    a = call(["--model", str(int4_dir), "-t", "0", "-n", "8", "--no-save", "--stats"], stdin="Hello")
    b = call(["--model", str(chat_models["v2"]), "--quant", "int4", "-t", "0", "-n", "8", "--no-save"], stdin="Hello")
    assert a.returncode == b.returncode == 0, a.stderr.decode() + b.stderr.decode()
    assert a.stdout == b.stdout and a.stdout.strip()
    stats = json.loads(a.stderr.decode().strip().splitlines()[-1])  # the loader's figures, in --stats
    assert stats["weight_bytes"] == saved.load_stats["weight_bytes"] == fresh.load_stats["weight_bytes"]
    assert stats["peak_host_bytes"] > stats["weight_bytes"] and stats["peak_gpu_bytes"] is None


def test_unknown_quant_and_fp8_keep_are_refused(chat_models, checkpoints):
    assert_clean_error(call(["--model", str(chat_models["v2"]), "--quant", "int3"], stdin="hi"),
                       "--quant int3: not a quantization (int8, int4 or none)")
    assert_clean_error(call(["--model", str(checkpoints["v3_fp8"]), "--quant", "int4", "--fp8", "keep"],
                           stdin="hi"), "--fp8 keep")


def test_quantize_refuses_without_writing(chat_models, int4_dir, tmp_path):
    out = tmp_path / "out"
    assert_clean_error(call(["quantize", str(chat_models["v2"]), "--quant", "int3", "-o", str(out)]),
                       "unknown quantization 'int3'")
    before = sorted(p.name for p in int4_dir.iterdir())
    assert_clean_error(call(["quantize", str(chat_models["v2"]), "--quant", "int4", "-o", str(int4_dir)]),
                       "already exists")
    assert sorted(p.name for p in int4_dir.iterdir()) == before
    assert_clean_error(call(["quantize", str(int4_dir), "--quant", "int8", "-o", str(out)]), "already quantized")
    assert list(tmp_path.iterdir()) == []


def test_a_directory_whose_config_and_tensors_disagree_is_refused(int4_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(int4_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"]["bits"] = 8
    (bad / "config.json").write_text(json.dumps(config))
    assert_clean_error(call(["--model", str(bad)], stdin="hi"), "is torch.uint8", "needs torch.int8")
    assert_clean_error(call(["--model", str(int4_dir), "--quant", "int8"], stdin="hi"),
                       "already quantized to int4")


def test_quant_in_the_config_file(chat_models, tmp_path):
    conf = tmp_path / "config" / "dschat"
    conf.mkdir(parents=True)
    (conf / "config.toml").write_text('quant = "int3"\n')
    env = {"XDG_CONFIG_HOME": str(tmp_path / "config")}
    assert_clean_error(call(["--model", str(chat_models["v2"])], stdin="hi", env=env), "setting 'quant'")
    (conf / "config.toml").write_text('quant = "int4"\n')
    settings = Settings.load(conf / "config.toml")
    assert quant_name(Options(config=settings)) == "int4"
    assert quant_name(Options(config=settings, quant="int8")) == "int8"  # the flag wins
    assert quant_name(Options(config=settings, quant="none")) is None


def test_index_shard_names_stay_inside_the_directory(int4_dir, tmp_path):
    """An index that names ../outside.safetensors loaded it."""

    bad = tmp_path / "bad"
    shutil.copytree(int4_dir, bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    (bad / first).rename(tmp_path / "outside.safetensors")
    for escape in ("../outside.safetensors", str(tmp_path / "outside.safetensors")):
        weight_map = {k: escape if v == first else v for k, v in index["weight_map"].items()}
        (bad / "model.safetensors.index.json").write_text(json.dumps({**index, "weight_map": weight_map}))
        assert_clean_error(call(["--model", str(bad), "-n", "2"], stdin="hi"), repr(escape), "is not a file of this directory")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e30, 0.0, -1.0])
def test_scales_out_of_range_are_refused(int4_dir, tmp_path, value):
    """NaN or enormous int4 scales loaded silently and gave empty answers."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(int4_dir, bad)
    for shard in sorted(bad.glob("*.safetensors")):
        tensors = load_file(shard)
        scales = [k for k in tensors if k.endswith("_scale")]
        if scales:
            with safe_open(str(shard), "pt") as f:
                meta = f.metadata()
            tensors[scales[0]].view(-1)[3] = value
            save_file(tensors, str(shard), metadata=meta)
            break
    assert_clean_error(call(["--model", str(bad), "-n", "2"], stdin="hi"), scales[0], "scales must be finite, above 0")


def test_quantize_copies_only_the_model_directorys_own_files_and_never_widens_modes(chat_models, tmp_path):
    """With SRC/LICENSE -> a private file elsewhere, the output held its contents at 0644; shards at 0600
    came out 0644."""
    import os
    import stat

    src = tmp_path / "src"
    shutil.copytree(chat_models["v2"], src)
    secret = tmp_path / "secret"
    secret.write_text("root:s3cr3t-shadow-7f3a")
    secret.chmod(0o600)
    (src / "LICENSE").symlink_to(secret)
    (src / "README.md").write_text("a model")
    (src / "README.md").chmod(0o640)
    for shard in src.glob("*.safetensors"):
        shard.chmod(0o600)
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        r = call(["quantize", str(src), "--quant", "int8", "-o", str(out)])
    finally:
        os.umask(old)
    assert r.returncode == 0, r.stderr
    assert not (out / "LICENSE").exists()
    assert all(b"s3cr3t-shadow-7f3a" not in f.read_bytes() for f in out.iterdir())
    mode = {f.name: stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()}
    assert all(mode[f.name] == 0o600 for f in out.glob("*.safetensors")), mode
    assert mode["README.md"] == 0o640 and mode["tokenizer.json"] == 0o644, mode
    assert stat.S_IMODE(out.stat().st_mode) & 0o077 == stat.S_IMODE(src.stat().st_mode) & 0o055
def quantize(src, out):
    return call(["quantize", str(src), "--quant", "int8", "-o", str(out)])


def test_the_output_path_is_checked_first_and_named(chat_models, tmp_path):
    """Issue 27 item 19: these failed after the whole quantization, naming the temporary directory."""
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    assert_clean_error(quantize(chat_models["v2"], dangling), f"{dangling}: already exists (a symlink)")
    long = tmp_path / ("n" * 245)
    assert_clean_error(quantize(chat_models["v2"], long), f"{long}: the name is too long")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling"]


def test_a_write_failure_names_the_output(chat_models, tmp_path):
    """A file-size limit (as a full disk would) while writing: the output named, nothing left behind."""
    import subprocess
    import sys

    from helpers import dschat_cmd

    out = tmp_path / "out"
    limit = "import resource, os, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000)); "
    cmd = [sys.executable, "-c", limit + "os.execv(sys.argv[1], sys.argv[1:])", *dschat_cmd(),
           "quantize", str(chat_models["v2"]), "--quant", "int8", "-o", str(out)]
    if len(dschat_cmd()) > 1 or not dschat_cmd()[0].startswith("/"):
        pytest.skip("needs the dschat script")
    r = subprocess.run(cmd, capture_output=True, timeout=120)
    assert_clean_error(r, f"{out}: cannot write (File too large")
    assert list(tmp_path.iterdir()) == []


def test_a_source_whose_config_disagrees_with_its_tensors_is_refused(chat_models, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(chat_models["v2"], src)
    config = json.loads((src / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (src / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert_clean_error(quantize(src, out), "num_hidden_layers")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_killed_run_leaves_a_temporary_directory_the_next_run_removes(chat_models, tmp_path):
    out = tmp_path / "out"
    stale = tmp_path / ".out.abcd1234.tmp"  # what a SIGKILLed run leaves
    stale.mkdir()
    (stale / "model-00001.safetensors").write_bytes(b"\0" * 1000)
    other = tmp_path / ".other.abcd1234.tmp"  # another output's: not ours to remove
    other.mkdir()
    r = quantize(chat_models["v2"], out)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.abcd1234.tmp", "out"]
