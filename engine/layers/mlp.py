"""The SwiGLU MLP of dense layers and shared experts."""

from __future__ import annotations

import torch
from torch import nn

from ...kernels import ops
from ...kernels.norm_rope import silu_mul

from .. import dist
from .linear import Linear


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). `parallel` splits its columns over ranks (dense layers and
    shared experts); routed experts are whole on one rank."""

    def __init__(self, dim: int, inter: int, parallel: bool = True):
        super().__init__()
        self.gate_proj = Linear(dim, inter, split="col" if parallel else None)
        self.up_proj = Linear(dim, inter, split="col" if parallel else None)
        self.down_proj = Linear(inter, dim, split="row" if parallel else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x)  # silu(gate) * up: one kernel on CUDA (kernels/norm_rope.py)
        return self.down_proj(ops.fused(torch.ops.dschat.silu_mul, silu_mul, x)(gate, self.up_proj(x)))


class DenseMLP(MLP):
    """A dense layer's MLP: its column-split partial outputs are summed across ranks (inside an MoE the
    shared experts' partial sum joins the routed experts' before one all-reduce)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dist.all_reduce(super().forward(x))
