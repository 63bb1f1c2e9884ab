"""benchmarks/count_launches.py, run as a user runs it (--smoke: the demo model and a 3-layer V2-Lite
structure): its JSON has the promised shape, every count is positive, and the Triton launches are exactly the
kernels the layers call."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "count_launches.py"


def counts(cwd) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    r = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--json"], cwd=cwd, capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1, r.stdout
    return json.loads(lines[0])


def test_counts_per_token_are_positive_and_the_kernels_the_layers_call(tmp_path):
    first = counts(tmp_path)
    assert set(first) == {"demo", "v2-lite"}
    for model, r in first.items():
        assert r["ops_per_token"] > 0 and r["triton_launches_per_token"] > 0, model
        # the decode step itself never waits on the host (issue 21); the host reads each token once
        assert r["syncs_in_step"] == 0 and r["syncs_per_token"] == 1, (model, r["syncs"])
        assert r["ops_per_token"] == r["aten_ops_per_token"] + r["triton_launches_per_token"]
        # the CUDA dispatch: one MLA kernel a layer and two MoE kernels a MoE layer (the first layer is dense)
        assert r["triton_launches_per_token"] == r["layers"] + 2 * (r["layers"] - 1), (model, r)
