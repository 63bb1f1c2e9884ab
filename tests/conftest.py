"""Shared fixtures: tiny random checkpoints in the hub layout, built once per test session."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

# Triton kernels run in Triton's interpreter on the CPU; this must be set before triton.jit runs.
os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests import the installed dschat, never the repository root: there, kernels/ would shadow the `kernels`
# package that transformers imports. `python -m pytest` puts the working directory first on sys.path; take the
# root off again (tests/test_layering.py checks nothing put it back).
ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]

import pytest  # noqa: E402
import torch  # noqa: E402

from dschat.dev import tiny_checkpoints as tc  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py
from helpers import CHECKPOINTS  # noqa: E402

# Keep runs hermetic: never touch the user's config, history or caches, never reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# ... except the CPU kernels dschat builds at first use (kernels/cpu_gemv.py): keyed by their source, built once
# per machine into the user's cache and shared by every test, worker and dschat process the tests start.
os.environ.setdefault("DSCHAT_KERNELS_DIR", str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                                                / "dschat" / "kernels"))
from dschat.kernels import cpu_gemv  # noqa: E402

cpu_gemv.native()  # built (or found) here, once, rather than inside a test's subprocess and its timeout
# Under pytest-xdist (the README's `-n 2`) each worker gets a share of the cores: two workers with two threads
# each on two cores made small matmuls many times slower. The `dschat` processes a test starts run while it
# waits, on the same share (OMP_NUM_THREADS, which PyTorch reads), rather than competing with the test for the cores.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_threads = max(1, min(2, (os.cpu_count() or 1) // _workers))
torch.set_num_threads(_threads)
os.environ.setdefault("OMP_NUM_THREADS", str(_threads))


# Under pytest-xdist (the README's `-n 2`; pyproject's addopts choose `--dist loadgroup`) tests are handed out one by
# one, except those that share a module-scoped fixture (a torchrun of two ranks, a loaded model, a running server):
# they go to one worker together, so the fixture is built once rather than once on each worker. And the slowest
# modules (end-to-end runs: processes, terminals, training, benchmarks) go first, so that the run does not end
# with one worker still busy on a long test while the other is idle.
SLOW_FIRST = ("test_training", "test_benchmarks", "test_reuse_and_speculation", "test_tensor_parallel",
              "test_concurrent_turns", "test_dependencies", "test_demo", "test_system_changes", "test_hub_download",
              "test_count_launches", "test_tui_e2e", "test_signals", "test_pipe_mode", "test_conversations",
              "test_linemode", "test_terminal_text", "test_history_unwritable", "test_fim_files", "test_fim")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        defs = getattr(item, "_fixtureinfo", None)
        # a module-scoped fixture, or a session-scoped one that a test file defines for itself (test_tokenizer's
        # transformers tokenizers): built once, on one worker, not once on each
        shared = defs and any(fd[-1].scope == "module" or (fd[-1].scope == "session" and fd[-1].baseid.endswith(".py"))
                              for fd in defs.name2fixturedefs.values() if fd)
        if shared:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(getattr(item.module, "__name__", ""), len(rank)))  # stable: else as collected


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("home")
    for var in ("XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_RUNTIME_DIR"):  # the runtime directory:
        monkeypatch.setenv(var, str(home / var.lower()))  # a `dschat serve` the user runs is not the tests'
    monkeypatch.delenv("DSCHAT_API_KEY", raising=False)
    monkeypatch.delenv("DSCHAT_MODEL", raising=False)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {name: tc.write_checkpoint(root / name, make(), seed=i) for i, (name, make) in enumerate(CHECKPOINTS.items())}


@pytest.fixture(scope="session")
def reference_dirs(checkpoints, tmp_path_factory) -> dict[str, Path]:
    """For each checkpoint, a directory transformers can load as the reference: the same weights in
    float32 (FP8 ones dequantised tile by tile by the test helper, not by the engine)."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("ref")
    out = {}
    for name, path in checkpoints.items():
        cfg = json.loads((path / "config.json").read_text())
        cfg.pop("quantization_config", None)
        d = root / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
        save_file(tc.dequantized_weights(path), str(d / "model.safetensors"))
        out[name] = d
    return out


def chat_config(kind: str) -> dict:
    """A tiny model whose vocabulary fits a real DeepSeek tokenizer."""
    if kind == "v3":
        c = tc.v3_config(vocab=129280)
        c["num_nextn_predict_layers"] = 0
    else:
        c = tc.v2_lite_config(vocab=102400)
    c.update(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
             first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=None if kind == "v2" else 48,
             bos_token_id=0 if kind == "v3" else 100000, eos_token_id=1 if kind == "v3" else 100001)
    return c


@pytest.fixture(scope="session")
def chat_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat_models")
    return {
        "v3": tc.write_checkpoint(root / "v3", chat_config("v3"), seed=21, tokenizer="deepseek-v3"),
        "v2": tc.write_checkpoint(root / "v2", chat_config("v2"), seed=22, tokenizer="deepseek-v2"),
    }


@pytest.fixture(scope="session")
def chat_engines(chat_models):
    from dschat.engine import Engine

    return {k: Engine.from_pretrained(p, dtype=torch.float32, speculative="none") for k, p in chat_models.items()}


@pytest.fixture
def small_context(chat_models, tmp_path):
    """The v3 chat model with a 48-token context window (its files linked, its config rewritten)."""
    small = tmp_path / "small-window"
    shutil.copytree(chat_models["v3"], small, copy_function=os.symlink)
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").unlink()
    (small / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 48}))
    return small
