"""The routed experts of a DeepSeekMoE layer over STACKED, packed (int8 / int4) expert weights: the same
function and call shape as fused_moe.moe_experts, with w13 [E, 2I, H] and w2 [E, H, I] given as
quant_format.Packed stacks.

* `moe_experts_quant_reference`: dequantise the experts that any token chose, then fused_moe's reference;
* `moe_experts_quant_triton`: fused_moe's two GEMV-shaped kernels (the same kernels, PACKED), reading the
  chosen experts' packed rows in place and dequantising them in registers (kernels/expert_rows.py; decode
  and 1+K verification shapes);
`moe_experts_quant` picks Triton for decode-sized CUDA batches; elsewhere the chosen experts are dequantised
and fused_moe.moe_experts runs them. Each takes the shared experts too (`shared`: their gate, up and down
as Packed weights, packed as the routed ones are), added with weight 1: inside the kernels on the Triton path.
"""

from __future__ import annotations

import torch

from .fused_moe import BLOCK_K, BLOCK_N, GATHER_MAX_TOKENS, moe_experts, moe_experts_reference, run_expert_kernels
from .quant_format import Packed, dequantize
from .triton_support import triton


def select(w: Packed, experts: torch.Tensor) -> Packed:
    """The packed stacks of some experts only."""
    zero = None if w.zero is None else w.zero[experts]
    return Packed(w.data[experts], w.scale[experts], zero, w.bits, w.group, w.in_features)


def _dequantized_used(x, w13: Packed, w2: Packed, ids):
    """The float stacks of the experts chosen here and the ids renumbered into them (others -1)."""
    E = w13.data.shape[0]
    valid = (ids >= 0) & (ids < E)
    used, local = torch.unique(torch.where(valid, ids, 0), return_inverse=True)
    return (dequantize(select(w13, used)).to(x.dtype), dequantize(select(w2, used)).to(x.dtype),
            torch.where(valid, local, -1))


def _dequantized_shared(x, shared):
    return None if shared is None else tuple(dequantize(p).to(x.dtype) for p in shared)


def moe_experts_quant_reference(x: torch.Tensor, w13: Packed, w2: Packed, ids: torch.Tensor,
                                weights: torch.Tensor, shared=None) -> torch.Tensor:
    """x [T,H], packed w13 [E,2I,H] and w2 [E,H,I], ids [T,k] int64, weights [T,k] float32 -> [T,H]."""
    f13, f2, local = _dequantized_used(x, w13, w2, ids)
    return moe_experts_reference(x, f13, f2, local, weights, _dequantized_shared(x, shared))


def packed_stack(w: Packed):
    """A packed stack as fused_moe's kernels take it (the twin of fused_moe.plain_stack)."""
    zero = w.zero if w.zero is not None else w.scale  # unused without zero points
    n_groups = w.scale.shape[-1] if w.bits == 4 else 1
    return (w.data.contiguous(), w.scale.contiguous(), zero.contiguous()), w.data.shape[-1], n_groups, dict(
        PACKED=True, BITS=w.bits, GROUP=max(w.group, 1), HAS_ZERO=w.zero is not None)


def moe_experts_quant_triton(x: torch.Tensor, w13: Packed, w2: Packed, ids: torch.Tensor, weights: torch.Tensor,
                             block_n: int = BLOCK_N, block_k: int | None = None, shared=None) -> torch.Tensor:
    """Same contract as moe_experts_quant_reference; the chosen experts' packed rows are read in place.
    int4 tiles lie in one group where the group allows (a power of two of at least 16)."""
    E, I = w2.data.shape[0], w2.in_features
    if block_k is None:
        g = w13.group
        block_k = min(BLOCK_K, g) if w13.bits == 4 and g >= 16 and g & (g - 1) == 0 else BLOCK_K
    sh = None if shared is None else (*map(packed_stack, shared), shared[0].out_features)
    return run_expert_kernels(x, packed_stack(w13), packed_stack(w2), ids, weights, E, I, block_n, block_k, sh)


def moe_experts_quant(x, w13: Packed, w2: Packed, ids, weights, shared=None):
    """Triton on CUDA for decode-sized batches; elsewhere the chosen experts dequantised, then run by
    fused_moe.moe_experts (its host loop on the CPU)."""
    if triton is not None and x.is_cuda and ids.shape[0] <= GATHER_MAX_TOKENS:
        return moe_experts_quant_triton(x, w13, w2, ids, weights, shared=shared)
    f13, f2, local = _dequantized_used(x, w13, w2, ids)
    return moe_experts(x, f13, f2, local, weights, _dequantized_shared(x, shared))
