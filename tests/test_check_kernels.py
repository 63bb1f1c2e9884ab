"""Every Triton kernel compiles for an H100 (sm_90a) without a GPU, spills no register, and the MoE decode
kernels launch a block for every SM at the V2-Lite and V3 shapes (benchmarks/check_kernels.py, run as a
user runs it). Triton's compiled kernels are cached in pytest's cache directory between runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "check_kernels.py"
H100_SMS = 132
KERNELS = {"moe_gate_up/bf16", "moe_down/bf16", "moe_gate_up/int8", "moe_down/int8", "moe_gate_up/int4",
           "moe_down/int4", "mla_decode", "mla_merge", "add_rms_norm", "rope_latent", "router", "silu_mul",
           "quant_matmul/int8", "quant_matmul/int4", "fp8_linear"}
FP8_MOE = {"moe_gate_up/fp8", "moe_down/fp8"}  # V3's experts as it ships them (`--fp8 keep`)


def ptxas_runs() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return subprocess.run([get_ptxas(90).path, "--version"], capture_output=True).returncode == 0
    except Exception:  # noqa: BLE001 - no Triton, no NVIDIA backend, a ptxas that cannot run here
        return False


pytestmark = pytest.mark.skipif(not ptxas_runs(), reason="Triton's ptxas cannot run here")


def check(args, cwd, cache_dir) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env["TRITON_CACHE_DIR"] = str(cache_dir)
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.fixture(scope="module")
def rows(request, tmp_path_factory):
    r = check(["--json"], tmp_path_factory.mktemp("run"), request.config.cache.mkdir("triton-sm90a"))
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    return r, json.loads(r.stdout)


def test_every_kernel_compiles_at_every_shape(rows):
    r, rows = rows
    by_shape = {}
    for row in rows:
        assert set(row) >= {"kernel", "shape", "grid_blocks", "registers", "spill_bytes", "tensor_cores"}
        by_shape.setdefault(row["shape"], set()).add(row["kernel"])
        assert 0 < row["registers"] <= 255 and row["grid_blocks"] > 0
    for model in ("demo", "v2-lite", "v3"):
        assert by_shape[model] == KERNELS | (FP8_MOE if model == "v3" else set()), model
        assert by_shape[f"{model}/M=512"] == {"quant_matmul/int8", "quant_matmul/int4", "fp8_linear"}


def test_no_kernel_spills_registers(rows):
    r, rows = rows
    spills = [(row["kernel"], row["shape"], row["spill_bytes"]) for row in rows if row["spill_bytes"]]
    assert not spills
    assert r.returncode == 0, r.stderr


def test_moe_decode_launches_a_block_for_every_sm(rows):
    _, rows = rows
    moe = [row for row in rows if row["kernel"].startswith("moe_") and row["shape"] in ("v2-lite", "v3")]
    assert len(moe) == 14  # bf16, int8, int4 at both shapes, and V3's FP8 experts
    assert all(row["grid_blocks"] >= H100_SMS for row in moe), [(r["kernel"], r["grid_blocks"]) for r in moe]


def test_matmuls_use_the_tensor_cores(rows):
    _, rows = rows
    for row in rows:
        if row["kernel"].split("/")[0] in ("fp8_linear", "quant_matmul", "mla_decode", "moe_gate_up", "moe_down"):
            assert row["tensor_cores"], (row["kernel"], row["shape"])


def test_moe_decode_kernels_pipeline_their_weight_loads(rows):
    """cp.async into multi-stage shared-memory buffers (Triton's software pipelining, issue 21 item 6)."""
    _, rows = rows
    moe = [row for row in rows if row["kernel"].startswith("moe_")]
    assert moe and all(row["pipelined"] and row["num_stages"] >= 3 and row["shared_bytes"] > 0 for row in moe), [
        (r["kernel"], r["shape"], r["pipelined"], r["shared_bytes"]) for r in moe]
    assert not any(row["pipelined"] for row in rows if row["kernel"] in ("add_rms_norm", "router"))  # it can fail


def test_an_unknown_model_is_one_line(tmp_path):
    r = check(["--models", "v9"], tmp_path, tmp_path / "cache")
    assert r.returncode == 2 and r.stderr.startswith("check_kernels: error: ") and r.stderr.count("\n") == 1
