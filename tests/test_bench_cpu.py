"""benchmarks/bench_cpu.py --smoke, run as a user runs it from another directory (in the test's process:
tests/helpers.py `smoke`): every configuration decodes and prefills, the table and the llama.cpp line come out,
the JSON lines hold the figures; the stand-in llama-bench is a process it starts."""

from __future__ import annotations

import json
import sys

from helpers import smoke


def test_smoke_prints_the_table_and_writes_every_figure(tmp_path, monkeypatch):
    out = tmp_path / "r.jsonl"
    r = smoke("bench_cpu.py", ["--smoke", "--json", str(out)], tmp_path, monkeypatch)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [x["config"] for x in rows] == ["float32", "int8", "int4"]
    for x in rows:
        assert x["decode_tok_s"] > 0 and x["prefill_tok_s"] > 0 and x["bandwidth"] > 0 and x["threads_ran"] == 1
        assert x["bandwidth_best"] >= x["bandwidth"]  # the best 64 MiB read, and the median the roofline takes
    by = {x["config"]: x["bytes_per_token"] for x in rows}
    assert by["int4"] < by["int8"] < by["float32"]  # packed weights are counted at their packed size
    assert "| now | int4 |" in r.stdout and "read bandwidth" in r.stdout and "load average" in r.stdout
    assert "llama.cpp:" in r.stdout


STAND_IN = """#!{python}
# a stand-in for llama-bench (the real one is built from source, minutes): its JSON-lines output, its flags logged
import json, sys
a = sys.argv[1:]
open({log!r}, "a").write(" ".join(a) + "\\n")
if "q8_0" in a[a.index("-m") + 1]:
    sys.exit("error: failed to load model")
n, p = int(a[a.index("-n") + 1]), int(a[a.index("-p") + 1])
print(json.dumps({{"n_prompt": p, "n_gen": n, "avg_ts": 100.0 if n else 1000.0}}))
"""


def test_llama_cpp_runs_in_the_rounds_and_is_compared_at_the_same_precision(tmp_path, monkeypatch):
    log, exe, gguf = tmp_path / "calls", tmp_path / "llama-bench", tmp_path / "gguf"
    exe.write_text(STAND_IN.format(python=sys.executable, log=str(log)))
    exe.chmod(0o755)
    gguf.mkdir()
    for t in ("q4_0", "q8_0"):
        (gguf / f"demo-{t}.gguf").write_bytes(b"not a gguf")
    out = tmp_path / "r.jsonl"
    r = smoke("bench_cpu.py", ["--smoke", "--json", str(out), "--gguf", str(gguf), "--llama-bench", str(exe),
                               "--llama-types", "bf16,q8_0,q4_0", "--llama-args", "--repack 0"], tmp_path, monkeypatch)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(x["label"], x["config"]) for x in rows] == [("now", "float32"), ("now", "int8"), ("now", "int4"),
                                                         ("llama.cpp", "q8_0"), ("llama.cpp", "q4_0")]
    llama = rows[-1]
    assert llama["decode_tok_s"] == 100.0 and llama["prefill_tok_s"] == 1000.0 and "load_before" in llama
    assert "failed to load model" in rows[-2]["error"]
    calls = log.read_text().splitlines()
    assert len(calls) == 3 and all("-t 1" in c and c.endswith("--repack 0") for c in calls)
    assert "-p 0 -n 4 -d 128" in calls[-2] and "-p 32 -n 0" in calls[-1]
    assert "llama.cpp: no demo-bf16.gguf" in r.stdout
    int4 = next(x for x in rows if x["config"] == "int4")
    line = next(x for x in r.stdout.splitlines() if "dschat int4 / llama.cpp Q4_0" in x)
    assert f"decode {int4['decode_tok_s'] / 100:.3f}x, prefill {int4['prefill_tok_s'] / 1000:.3f}x" in line
    assert "| llama.cpp | Q4_0 |" in r.stdout and "dschat int8 / llama.cpp" not in r.stdout


def test_depth_measures_a_long_context_and_a_follow_up_turn_on_both(tmp_path, monkeypatch):
    """--depth N: every process also decodes after an N-token context and prefills a 64-token follow-up turn over
    it (dschat with its prefix cache; llama-bench `-n TOKENS -d N` and `-p 64 -n 0 -d N`), in their own table and
    in the ratios."""
    log, exe, gguf = tmp_path / "calls", tmp_path / "llama-bench", tmp_path / "gguf"
    exe.write_text(STAND_IN.format(python=sys.executable, log=str(log)))
    exe.chmod(0o755)
    gguf.mkdir()
    (gguf / "demo-q4_0.gguf").write_bytes(b"not a gguf")
    out = tmp_path / "r.jsonl"
    r = smoke("bench_cpu.py", ["--smoke", "--json", str(out), "--gguf", str(gguf), "--llama-bench", str(exe),
                               "--llama-types", "q4_0", "--depth", "40"], tmp_path, monkeypatch)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {x["config"]: x for x in map(json.loads, out.read_text().splitlines())}
    for c in ("float32", "int8", "int4", "q4_0"):
        assert rows[c]["decode_deep_tok_s"] > 0 and rows[c]["follow_tok_s"] > 0, c
    calls = log.read_text().splitlines()
    assert any("-p 0 -n 4 -d 40" in c for c in calls) and any("-p 64 -n 0 -d 40" in c for c in calls)
    assert "after a 40-token context" in r.stdout and "| llama.cpp | Q4_0 | 100.0 | 1000.0 |" in r.stdout
    int4 = rows["int4"]
    line = next(x for x in r.stdout.splitlines() if "dschat int4 / llama.cpp Q4_0" in x)
    assert (f"decode deep {int4['decode_deep_tok_s'] / 100:.3f}x, follow-up prefill "
            f"{int4['follow_tok_s'] / 1000:.3f}x") in line
