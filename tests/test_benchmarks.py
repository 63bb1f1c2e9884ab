"""Every benchmark runs, as a user runs it, in its smoke mode (toy sizes, seconds).

An API change in the engine or the app cannot break a benchmark unseen. A smoke run is the script's own code
run as `python benchmarks/NAME.py --smoke` runs it (`__main__`, its argv, its folder first on sys.path, the
working directory), but in the test's process (`smoke` below): a new process would spend most of a smoke
run's seconds importing torch and transformers again. The process itself is tested where it is the point:
bench_busy starts its decode processes, and the GPU benchmarks are started by path below (no GPU: one line,
exit 2). The scripts the README names run from the repository root, and a script that put the root on
sys.path (which would import this repository's kernels/ in place of the `kernels` package transformers
imports) fails its smoke test; the others run from a directory outside the checkout. bench_gpu's smoke run
also writes every figure of its JSON, transformers' ratio included (never a silent None).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import smoke

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"

SMOKE = {
    "bench_busy.py": ["--smoke"],
    "bench_decode.py": ["--smoke"],
    "bench_gpu.py": ["--smoke"],  # and --out, below
    "bench_kernels.py": ["--smoke"],
    "bench_quant.py": ["--smoke"],
    "bench_reuse.py": ["--smoke"],
    "bench_verify.py": ["--smoke"],
    "check_numerics.py": ["--smoke", "--device", "cpu"],
}
FROM_ROOT = {"bench_decode.py", "bench_gpu.py", "bench_quant.py"}


def script(name: str, args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    return subprocess.run([sys.executable, str(BENCH / name), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_every_benchmark_has_a_smoke_run():
    """Here, or in a test file of its own (tests/test_bench_serve.py for bench_serve.py)."""
    scripts = {p.name for p in BENCH.glob("*.py")}
    own = {name for name in scripts if (ROOT / "tests" / f"test_{name}").exists()}
    assert scripts - own == set(SMOKE) | {"bench_startup.py"}, "a new benchmark needs its smoke run here"


@pytest.mark.parametrize("name", sorted(set(SMOKE) - {"bench_gpu.py"}))
def test_smoke_run(name, tmp_path, monkeypatch):
    r = smoke(name, SMOKE[name], ROOT if name in FROM_ROOT else tmp_path, monkeypatch)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and r.stdout.strip()
    if name == "bench_decode.py":  # its demo part too (what `--demo-only` runs alone): every drafter
        assert "mtp" in r.stdout and "ngram" in r.stdout


def test_bench_gpu_smoke_writes_every_figure(tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    r = smoke("bench_gpu.py", ["--smoke", "--out", str(out)], ROOT, monkeypatch)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert "transformers_error" not in res, res["transformers_error"]  # the reference must build: say why not
    assert res["device"] == "cpu" and res["smoke"] and res["torch"]
    assert 0 < res["roofline_fraction"] and res["vs_transformers"] > 0
    decode = [v for k, v in res.items() if k.startswith("v2_lite_decode_")]
    assert len(decode) == 2 and all(row["same_tokens"] and row["bytes_per_token"] > 0 for row in decode)
    assert set(res["verify_cost"]) == {"1+1", "1+2", "1+3"}
    assert res["demo_mtp_same_tokens"] and res["v3_fp8_vs_bf16"] > 0
    assert len(res["prefill_tok_s"]) == 2
    assert "roofline" in r.stdout
    assert res["v3_sizing"]["fits"] and "estimated peak" in r.stdout


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), BENCH / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_gpu_sizes_the_v3_slice_to_80_gb():
    """At V3's real shapes a 1,024-token `--fp8 keep` prefill pass would dequantise every expert to float32
    (well over 80 GB): the section prefills in chunks whose estimated peak fits, and says so."""
    bg = load_script("bench_gpu.py")
    config = bg.v3_slice_shapes(3, smoke=False)
    plan = bg.size_v3_section(config, torch.bfloat16, 4.0, 0.9 * 80e9, 1024)
    assert plan["fits"] and 1 <= plan["prefill_chunk"] < 1024
    assert plan["peak_bytes_estimate"] <= plan["budget_bytes"]
    assert plan["fp8_weights_bytes"] + bg.fp8_keep_pass_bytes(config, 1024) > 80e9
    assert bg.fp8_keep_pass_bytes(config, 2 * plan["prefill_chunk"]) > bg.fp8_keep_pass_bytes(
        config, plan["prefill_chunk"])


def test_bench_gpu_keeps_what_it_measured_when_a_later_section_fails(monkeypatch):
    bg = load_script("bench_gpu.py")
    saved = []

    def fail(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(bg, "demo_mtp", fail)  # the section after V2-Lite's decode, verify and prefill
    with pytest.raises(RuntimeError):
        bg.run(torch.device("cpu"), torch.float32, bg.SMOKE, True, False, save=lambda r: saved.append(dict(r)))
    assert len(saved) >= 4 and "prefill_tok_s" in saved[-1] and "verify_cost" in saved[-1]
    assert any(k.startswith("v2_lite_decode_") for k in saved[-1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="there is a GPU here")
@pytest.mark.parametrize("name", ["bench_gpu.py", "bench_kernels.py"])
def test_without_a_gpu_a_gpu_benchmark_says_so_in_one_line(name, tmp_path):
    r = script(name, [], tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--smoke" in r.stderr, r.stderr


def test_bench_startup_compares_an_install_with_itself(tmp_path):
    exe = shutil.which("dschat") or str(Path(sys.executable).with_name("dschat"))
    # what it times is `dschat --version` (a start without torch), not its default chat on the demo model: the
    # benchmark's own work (warm-up, interleaved pairs, medians, ratios) is the same, in a fraction of the time
    r = script("bench_startup.py", [exe, exe, "--pairs", "1", "--args=--version", "--input="], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "1 pairs of `dschat --version`" in r.stdout and "after / before: wall" in r.stdout
