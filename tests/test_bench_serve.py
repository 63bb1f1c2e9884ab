"""benchmarks/bench_serve.py --smoke: every step of the server benchmark runs and writes its figures."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_serve  # noqa: E402


def test_smoke_run_writes_every_figure(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert bench_serve.main(["--smoke", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["smoke"] and r["in_process_tok_s"] > 0 and r["http_tok_s"] > 0 and r["http_vs_in_process"] > 0
    assert r["keystroke_cached_prefilled"] < r["keystroke_uncached_prefilled"]  # the shared cache prefills less
    assert r["file_tokens"] >= bench_serve.SMOKE["file_tokens"]
    assert r["start_server_s"] > 0 and r["start_in_process_s"] > 0 and r["start_speedup"] > 0
    assert r["loadavg_before"] >= 0 and r["loadavg_after"] >= 0
    assert "ratio" in capsys.readouterr().out
