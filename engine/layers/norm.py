"""RMSNorm, computed in float32 whatever the model's dtype (kernels/norm_rope.py: one Triton kernel on CUDA,
fused with the residual add where a block has one)."""

from __future__ import annotations

import torch
from torch import nn

from ...kernels import ops
from ...kernels.norm_rope import add_rms_norm, rms_norm


class RMSNorm(nn.Module):
    """weight * x / sqrt(mean(x^2) + eps), the mean taken in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.fused(torch.ops.dschat.rms_norm, rms_norm, x)(x, self.weight, self.eps)

    def add(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + residual, the norm of it); without a residual (x, the norm of x)."""
        if residual is None:
            return x, self(x)
        return ops.fused(torch.ops.dschat.add_rms_norm, add_rms_norm, x)(x, residual, self.weight, self.eps)
