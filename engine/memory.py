"""What a load cost in memory: the weights' bytes, the host memory the load held at its peak (and the
process's peak), the peak GPU memory."""

from __future__ import annotations

import resource

import torch
from torch import nn

from . import quant


def peak_host_bytes() -> int:
    """This process's peak resident memory so far (since load_started reset it, where Linux lets it)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def load_started() -> int | None:
    """Mark the start of a load: the peak resident memory is reset to what is resident now (Linux's
    /proc/self/clear_refs "5"), and that is returned; None where it cannot be reset (the load's peak is then
    not reported)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _status_bytes("VmRSS")


def load_peak_bytes(start: int | None) -> int | None:
    """Host memory the load added at its peak: the peak resident memory since load_started, less what was
    resident before it (the interpreter, torch, anything loaded earlier)."""
    peak = _status_bytes("VmHWM")
    return None if start is None or peak is None else max(0, peak - start)


def memory_report(model: nn.Module, device: torch.device, load_peak: int | None = None) -> dict:
    """Bytes of the loaded weights; the host memory the load held at its peak beyond what was resident before
    it (`load_peak_host_bytes`) and that over the weights' bytes (`load_peak_ratio`: 1.0 would be the weights
    alone; the loader reads one tensor at a time and quantizes it in blocks of rows, so it stays near 1 however
    large the checkpoint); this process's peak resident host memory so far; the peak GPU memory allocated
    (None off CUDA)."""
    weights = quant.weight_bytes(model)
    return {"weight_bytes": weights, "load_peak_host_bytes": load_peak,
            "load_peak_ratio": round(load_peak / weights, 3) if load_peak is not None and weights else None,
            "peak_host_bytes": peak_host_bytes(),
            "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}
