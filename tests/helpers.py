"""What several test files use: running the real `dschat` command, checking its error line, the tiny
checkpoints' recipes, and the transformers reference model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

import tiny_checkpoints as tc

CHECKPOINTS = {
    "v2_lite": lambda: tc.v2_lite_config(),
    "v2": lambda: tc.v2_config(),
    "v3": lambda: tc.v3_config(),
    "v3_legacy_rope": lambda: tc.v3_config(rope_parameters=False),
    "v3_fp8": lambda: tc.v3_fp8_config(),
}


def dschat_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "dschat"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "dschat"]


def run(args, stdin: bytes | str | None = b"", env=None, timeout=120):
    if isinstance(stdin, str):
        stdin = stdin.encode()
    return subprocess.run(dschat_cmd() + list(args), input=stdin, capture_output=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def assert_clean_error(r, *needles, code=None):
    err = r.stderr.decode()
    assert r.returncode != 0 and (code is None or r.returncode == code), (r.returncode, err)
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dschat: error: "), err
    for n in needles:
        assert n in lines[0], err


def load_reference(path: Path):
    import transformers

    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()
