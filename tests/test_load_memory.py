"""Loading a checkpoint in int4 never holds the float model whole (issue 25): the host memory the load adds
at its peak stays within 1.3x the int4 weights' bytes, measured in a real `dschat` process and shown by
--stats."""

from __future__ import annotations

import json

import pytest
from dschat.dev import tiny_checkpoints as tc

from helpers import run


@pytest.fixture(scope="module")
def expert_heavy(tmp_path_factory):
    """A V2-Lite-shaped model whose routed experts dominate its bytes, as V2-Lite's do (~0.26 GB of bf16 in
    one shard, ~0.2 GB of it experts), with a real tokenizer."""
    c = tc.v2_lite_config(vocab=102400)
    c.update(hidden_size=128, intermediate_size=1024, moe_intermediate_size=2048, n_routed_experts=64,
             num_experts_per_tok=4, num_hidden_layers=3, first_k_dense_replace=1, kv_lora_rank=64)
    return tc.write_checkpoint(tmp_path_factory.mktemp("mem") / "m", c, shards=1, tokenizer="deepseek-v2")


def test_int4_load_peak_is_near_the_int4_weights(expert_heavy):
    r = run(["--model", str(expert_heavy), "--quant", "int4", "-t", "0", "-n", "2", "--no-save", "--stats"],
            stdin="Hello", timeout=300)
    assert r.returncode == 0, r.stderr.decode()
    stats = json.loads(r.stderr.decode().strip().splitlines()[-1])
    weights, peak = stats["weight_bytes"], stats["load_peak_host_bytes"]
    bf16 = sum(f.stat().st_size for f in expert_heavy.glob("*.safetensors"))
    assert 1.3 * weights < 0.7 * bf16  # the bound is well below the bf16 model (the float32 one is twice that)
    assert peak is not None and stats["load_peak_ratio"] == round(peak / weights, 3)
    # 1.3x the weights, plus what the allocator and the libraries touch during any load whatever its size: at
    # these 122 MB the ratio alone ran 1.25-1.35 from run to run (1.08 at V2-Lite's 1.42 GB, docs/models.md);
    # without reading tensor by tensor it was 3.36
    assert weights * 0.9 <= peak <= 1.3 * weights + 40 * 2**20, stats
    assert stats["peak_host_bytes"] >= peak
