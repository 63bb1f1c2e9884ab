"""benchmarks/bench_cpu.py --smoke, run as a user runs it (a subprocess, from another directory): every
configuration decodes and prefills, the table and the llama.cpp line come out, the JSON lines hold the figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_cpu.py"


def test_smoke_prints_the_table_and_writes_every_figure(tmp_path):
    out = tmp_path / "r.jsonl"
    r = subprocess.run([sys.executable, str(BENCH), "--smoke", "--json", str(out)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [x["config"] for x in rows] == ["float32", "int8", "int4"]
    for x in rows:
        assert x["decode_tok_s"] > 0 and x["prefill_tok_s"] > 0 and x["bandwidth"] > 0 and x["threads_ran"] == 1
    by = {x["config"]: x["bytes_per_token"] for x in rows}
    assert by["int4"] < by["int8"] < by["float32"]  # packed weights are counted at their packed size
    assert "| now | int4 |" in r.stdout and "read bandwidth" in r.stdout and "load average" in r.stdout
    assert "llama.cpp:" in r.stdout
