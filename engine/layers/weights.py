"""How a checkpoint tensor becomes a module's weight. Every module the model is built from either has a
`weight_loader(target, t, scale, ctx, where)` of its own (Linear: tensor-parallel slicing and FP8 kept with
its block scales; QuantLinear and the expert stacks: packing; Gate: float32 bias) or is loaded by
`default_weight_loader` (whole on every rank, in the model's dtype). engine/loader.py finds each tensor's
Target and calls the loader of its module; the model is built on the meta device, so a weight is allocated
only when its tensor arrives."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...kernels.fp8_matmul import dequantize_fp8

from ..errors import ModelError


@dataclass(frozen=True)
class LoadContext:
    """What every weight loader of one load needs: where the weights go, in which dtype, the checkpoint's FP8
    block size, and whether FP8 weights stay FP8 (`--fp8 keep`) or are dequantised as they arrive."""

    device: torch.device
    dtype: torch.dtype
    block: tuple[int, int]
    keep_fp8: bool


@dataclass(frozen=True)
class Target:
    """Where one checkpoint tensor goes: the module that loads it and the name it loads under there (a
    parameter or buffer: "weight", "e_score_correction_bias"); for a routed expert, the expert's index in
    its layer's stack on this rank and the projection as `name` ("gate", "up" or "down")."""

    module: nn.Module
    name: str
    expert: int | None = None

    def load(self, t, scale: torch.Tensor | None, ctx: LoadContext, where: str):
        """Put t (with its FP8 block scales, if any) into the module, by the module's own weight loader."""
        loader = getattr(self.module, "weight_loader", None)
        (loader or default_weight_loader)(self, t, scale, ctx, where)


def set_tensor(module: nn.Module, name: str, value: torch.Tensor):
    """Replace a (meta) parameter or buffer of `module` by `value` (a parameter without gradients)."""
    if name in module._buffers:
        module._buffers[name] = value
    else:
        module._parameters[name] = value if isinstance(value, nn.Parameter) else nn.Parameter(
            value, requires_grad=False)


def check_shape(t: torch.Tensor, shape, where: str):
    if tuple(t.shape) != tuple(shape):
        raise ModelError(f"{where} has shape {list(t.shape)}, expected {list(shape)}")


def wanted_shape(module: nn.Module, name: str) -> torch.Size:
    return getattr(module, name).shape


def default_weight_loader(target: Target, t: torch.Tensor, scale: torch.Tensor | None, ctx: LoadContext,
                          where: str, dtype: torch.dtype | None = None):
    """The whole tensor on every rank, on the device, in `dtype` (default: the model's); FP8 dequantised."""
    if scale is not None:
        t = dequantize_fp8(t, scale, ctx.block)
    check_shape(t, wanted_shape(target.module, target.name), where)
    set_tensor(target.module, target.name, t.to(device=ctx.device, dtype=dtype or ctx.dtype))
