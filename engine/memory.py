"""What a load cost in memory: the weights' bytes, the process's peak host memory, the peak GPU memory."""

from __future__ import annotations

import resource

import torch
from torch import nn

from . import quant


def peak_host_bytes() -> int:
    """This process's peak resident memory so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_report(model: nn.Module, device: torch.device) -> dict:
    """Bytes of the loaded weights, this process's peak resident host memory so far (the loader holds one
    tensor and one shard's mapped pages beyond the model), and the peak GPU memory allocated (None off CUDA)."""
    return {"weight_bytes": quant.weight_bytes(model), "peak_host_bytes": peak_host_bytes(),
            "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}
