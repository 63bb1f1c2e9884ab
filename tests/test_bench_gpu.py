"""benchmarks/bench_gpu.py --smoke: every step of the GPU benchmark on tiny shapes on the CPU, writing its
JSON; the engine and transformers decode the same tokens from the same (shared) weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_gpu  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402


def test_smoke_run_writes_every_figure(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert bench_gpu.main(["--smoke", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["device"] == "cpu" and r["smoke"] and r["torch"]
    assert "transformers_error" not in r, r["transformers_error"]  # the reference must build: say why not
    assert 0 < r["roofline_fraction"] and r["vs_transformers"] > 0
    for ctx in bench_gpu.SMOKE["contexts"]:
        row = r[f"v2_lite_decode_{ctx}"]
        assert row["same_tokens"] and row["bytes_per_token"] > 0
    assert set(r["verify_cost"]) == {"1+1", "1+2", "1+3"}
    assert r["demo_mtp_same_tokens"] and r["v3_fp8_vs_bf16"] > 0
    assert set(r["prefill_tok_s"]) == {str(n) for n in bench_gpu.SMOKE["prefill"]}
    assert "roofline" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="there is a GPU here")
def test_without_a_gpu_it_says_so_in_one_line(capsys):
    assert bench_gpu.main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--smoke" in err
