"""Triton, imported only where a kernel can run: on a CUDA device, or in Triton's interpreter
(TRITON_INTERPRET=1, how the tests run the kernels on the CPU). Elsewhere `triton` and `tl` are None and
every kernel's PyTorch reference runs: importing Triton there took about 0.4 s of each command's start-up
(a tenth of `echo hi | dschat -n 1` on the CPU) for kernels that never run.

DSCHAT_TRITON_COMPILE_ONLY=1 imports Triton without a GPU all the same: benchmarks/check_kernels.py compiles
the kernels for a GPU it does not have (a stub driver; nothing is launched)."""

from __future__ import annotations

import os

import torch


def _load():
    wanted = os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("DSCHAT_TRITON_COMPILE_ONLY") == "1"
    if not wanted and not torch.cuda.is_available():
        return None, None
    try:
        import triton
        import triton.language as tl
    except ImportError:  # pragma: no cover - triton is a Linux dependency
        return None, None
    return triton, tl


triton, tl = _load()

# Triton's interpreter (3.9) multiplies bfloat16 tl.dot operands as raw integers: kernels give tl.dot float32
# operands there, rounded to the operand type first (the same values, products exact in float32 either way).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


H100_SMS = 132  # the SM count kernels size their grids for where no GPU says otherwise (check_kernels)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; an H100's count elsewhere (meta tensors, the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return H100_SMS
