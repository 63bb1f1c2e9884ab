"""The linear layer, split over tensor-parallel ranks by columns or rows; its weight may stay FP8."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels.fp8_matmul import fp8_linear

from .. import dist


class Linear(nn.Module):
    """y = x W^T with an uninitialised weight (the checkpoint fills it). `split` says how tensor
    parallelism cuts it: "col" splits the output features, "row" the input features. The weight may stay
    in FP8 with its block scales (`scale`, `block`): then it is read as FP8 (kernels/fp8_matmul.py: a Triton
    kernel that dequantises in registers on CUDA, dequantise-then-matmul elsewhere)."""

    def __init__(self, n_in: int, n_out: int, split: str | None = None):
        super().__init__()
        if split == "col":
            n_out = dist.split(n_out, "output features")
        elif split == "row":
            n_in = dist.split(n_in, "input features")
        self.split = split
        self.weight = nn.Parameter(torch.empty(n_out, n_in))
        self.register_buffer("scale", None)
        self.block: tuple[int, int] = (128, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            return fp8_linear(x, self.weight, self.scale, self.block)
        return F.linear(x, self.weight)
