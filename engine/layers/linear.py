"""The linear layer, split over tensor-parallel ranks by columns or rows; its weight may stay FP8."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels import cpu_bf16, ops
from ...kernels.fp8_matmul import dequantize_fp8, fp8_linear

from .. import dist
from .weights import LoadContext, Target, check_shape, set_tensor


class Linear(nn.Module):
    """y = x W^T with an uninitialised weight (the checkpoint fills it). `split` says how tensor
    parallelism cuts it: "col" splits the output features, "row" the input features. The weight may stay
    in FP8 with its block scales (`scale`, `block`): then it is read as FP8 (kernels/fp8_matmul.py: a Triton
    kernel that dequantises in registers on CUDA, dequantise-then-matmul elsewhere). may_stay_fp8=False: a
    weight read whole elsewhere (MLA's kv_b_proj) is always dequantised. A bfloat16 weight on the CPU (one
    rank) runs kernels/cpu_bf16.py's kernel, faster than PyTorch's bfloat16 matmul where the CPU has no
    bfloat16 arithmetic (PyTorch's where the kernel cannot be built)."""

    def __init__(self, n_in: int, n_out: int, split: str | None = None, may_stay_fp8: bool = True):
        super().__init__()
        if split == "col":
            n_out = dist.split(n_out, "output features")
        elif split == "row":
            n_in = dist.split(n_in, "input features")
        self.split, self.may_stay_fp8 = split, may_stay_fp8
        self.weight = nn.Parameter(torch.empty(n_out, n_in))
        self.register_buffer("scale", None)
        self.block: tuple[int, int] = (128, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            return fp8_linear(x, self.weight, self.scale, self.block)
        if x.dtype == torch.bfloat16 and self.weight.dtype == torch.bfloat16 and x.device.type == "cpu" \
                and dist.world_size() == 1:
            return ops.traced(torch.ops.dschat.linear_bf16_cpu, cpu_bf16.linear_or_torch)(x, self.weight)
        return F.linear(x, self.weight)

    def weight_loader(self, target: Target, t: torch.Tensor, scale: torch.Tensor | None, ctx: LoadContext,
                      where: str):
        """This rank's slice of the whole weight t (rows for "col", columns for "row"). An FP8 weight (scale
        given) stays FP8 with its block scales where the slice falls on block boundaries; else it is
        dequantised first."""
        ws, rank = dist.world_size(), dist.rank()
        dim = {"col": 0, "row": 1}.get(self.split) if ws > 1 else None
        n = None if dim is None else t.shape[dim] // ws
        if scale is not None and self.may_stay_fp8 and (dim is None or n % ctx.block[dim] == 0):
            if dim is not None:
                blocks = n // ctx.block[dim]
                t, scale = t.narrow(dim, rank * n, n), scale.narrow(dim, rank * blocks, blocks)
            check_shape(t, self.weight.shape, where)
            set_tensor(self, target.name, t.to(ctx.device))
            self.scale, self.block = scale.to(device=ctx.device, dtype=torch.float32), ctx.block
            return
        if scale is not None:
            t = dequantize_fp8(t, scale, ctx.block)
        if dim is not None:
            t = t.chunk(ws, dim=dim)[rank]
        check_shape(t, self.weight.shape, where)
        set_tensor(self, target.name, t.to(device=ctx.device, dtype=ctx.dtype))
