"""y = x W^T with W packed as int8 (per output channel) or int4 (group-wise): see quant_format.py.

Three implementations of the same function:
* `quant_matmul_reference`: dequantise the whole weight, then one matmul (plain PyTorch; the oracle);
* `quant_matmul_cpu`: PyTorch's own int8 kernel (`aten._weight_int8pack_mm`) for the few rows of a decode
  step, where it beats dequantising (benchmarks/bench_quant.py measures both); the reference otherwise;
* `quant_matmul_triton`: reads the packed bytes and dequantises them in registers, a K-block at a time,
  so the full-precision weight never exists in memory (GEMV for decode, GEMM for prefill: one kernel).
`quant_matmul` picks Triton for CUDA tensors, the CPU path for CPU ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .quant_format import SYMMETRIC_ZERO, Packed, dequantize
from .triton_support import tl, triton

CPU_INT8_MAX_ROWS = 8  # up to this many rows PyTorch's int8 kernel is faster than dequantise + matmul


def quant_matmul_reference(x: torch.Tensor, w: Packed) -> torch.Tensor:
    """x [..., K] -> [..., N] in x's dtype."""
    return F.linear(x, dequantize(w).to(x.dtype))


def quant_matmul_cpu(x: torch.Tensor, w: Packed) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    if w.bits == 8 and rows.shape[0] <= CPU_INT8_MAX_ROWS and x.dtype in (torch.float32, torch.bfloat16):
        y = torch.ops.aten._weight_int8pack_mm(rows.contiguous(), w.data, w.scale.to(x.dtype))
        return y.view(*x.shape[:-1], -1)
    return quant_matmul_reference(x, w)


if triton is not None:

    @triton.jit
    def _quant_matmul_kernel(X, Data, Scale, Zero, Y, M, N, K, n_groups,
                             stride_xm, stride_dn, stride_ym,
                             BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             PRECISION: tl.constexpr):
        """One [BLOCK_M, BLOCK_N] tile of y. int4: BLOCK_K divides the group size, so one scale per row per
        step, and each byte is read once (its two nibbles interleaved back into column order)."""
        pm, pn = tl.program_id(0), tl.program_id(1)
        rm = pm * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            x = tl.load(X + rm[:, None] * stride_xm + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K),
                        other=0.0)
            if BITS == 8:
                wmask = (rn[:, None] < N) & (kk[None, :] < K)
                w = tl.load(Data + rn[:, None] * stride_dn + kk[None, :], mask=wmask, other=0).to(tl.float32)
            else:
                half = k0 // 2 + tl.arange(0, BLOCK_K // 2)
                byte = tl.load(Data + rn[:, None] * stride_dn + half[None, :],
                               mask=(rn[:, None] < N) & (half[None, :] * 2 < K), other=0)
                nib = tl.interleave(byte & 0xF, byte >> 4).to(tl.float32)
                g = k0 // GROUP
                s = tl.load(Scale + rn * n_groups + g, mask=rn < N, other=0.0)
                if HAS_ZERO:
                    z = tl.load(Zero + rn * n_groups + g, mask=rn < N, other=0).to(tl.float32)
                else:
                    z = tl.zeros((BLOCK_N,), dtype=tl.float32) + 8.0
                w = (nib - z[:, None]) * s[:, None]
            acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=PRECISION)
        if BITS == 8:
            acc = acc * tl.load(Scale + rn, mask=rn < N, other=0.0)[None, :]
        tl.store(Y + rm[:, None] * stride_ym + rn[None, :], acc.to(Y.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))


def triton_fits(w: Packed) -> bool:
    """The kernel steps through K within one group at a time: the group must be a power of two of at least 16."""
    return w.bits == 8 or (w.group >= 16 and w.group & (w.group - 1) == 0)


def quant_matmul_triton(x: torch.Tensor, w: Packed, block_n: int = 64) -> torch.Tensor:
    assert SYMMETRIC_ZERO == 8  # the kernel's constant for symmetric int4
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    M, K = rows.shape
    N = w.out_features
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    block_m = 16 if M <= 16 else 64
    block_k = min(w.group, 64) if w.bits == 4 else 64  # a group in one step or more
    zero = w.zero if w.zero is not None else w.scale  # unused when there is no zero point
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _quant_matmul_kernel[grid](
        rows, w.data, w.scale, zero, y, M, N, K, w.scale.shape[-1] if w.bits == 4 else 1,
        rows.stride(0), w.data.stride(0), y.stride(0),
        BITS=w.bits, GROUP=max(w.group, 1), HAS_ZERO=w.zero is not None, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k,
        # float32 stays float32 (no TF32 rounding): the exactness tests run the engine in float32
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32")
    return y.view(*x.shape[:-1], N)


def quant_matmul(x: torch.Tensor, w: Packed) -> torch.Tensor:
    """Triton on CUDA (where the group size fits it), the CPU path on the CPU, the reference elsewhere."""
    if x.is_cuda and triton is not None and triton_fits(w):
        return quant_matmul_triton(x, w)
    if x.device.type == "cpu":
        return quant_matmul_cpu(x, w)
    return quant_matmul_reference(x, w)
