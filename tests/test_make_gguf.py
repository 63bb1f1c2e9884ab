"""benchmarks/make_gguf.py (the GGUF files for bench_cpu's llama.cpp column) needs a llama.cpp source tree,
which the tests do not have: what it says without one, and that its patch is the one its docstring names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_without_a_llama_cpp_tree_it_says_so_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(BENCH / "make_gguf.py"), str(tmp_path), "--name", "demo", "--out",
                        str(tmp_path / "out"), "--llama-src", str(tmp_path / "nowhere")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"make_gguf: error: no convert_hf_to_gguf.py in {tmp_path / 'nowhere'}"
    assert not (tmp_path / "out").exists()


def test_the_patch_touches_only_the_converter():
    patch = (BENCH / "llama_converter.patch").read_text()
    files = [line.split()[1] for line in patch.splitlines() if line.startswith("+++ ")]
    assert files == ["b/conversion/base.py", "b/conversion/deepseek.py"]
    assert "add_q_lora_rank(0)" in patch and '"gpt-2"' in patch
