"""The routed experts of a DeepSeekMoE layer over STACKED, packed (int8 / int4) expert weights: the same
function and call shape as fused_moe.moe_experts, with w13 [E, 2I, H] and w2 [E, H, I] given as
quant_format.Packed stacks.

* `moe_experts_quant_reference`: dequantise the experts that any token chose, then fused_moe's reference;
* `moe_experts_quant_triton`: fused_moe's two GEMV-shaped kernels, reading the chosen experts' packed rows in
  place and dequantising them in registers (decode and 1+K verification shapes);
`moe_experts_quant` picks Triton for decode-sized CUDA batches; elsewhere the chosen experts are dequantised
and fused_moe.moe_experts runs them.
"""

from __future__ import annotations

import torch

from .fused_moe import GATHER_MAX_TOKENS, moe_experts, moe_experts_reference
from .quant_format import Packed, dequantize
from .triton_support import tl, triton


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


def moe_experts_quant_reference(x: torch.Tensor, w13: Packed, w2: Packed, ids: torch.Tensor,
                                weights: torch.Tensor) -> torch.Tensor:
    """x [T,H], packed w13 [E,2I,H] and w2 [E,H,I], ids [T,k] int64, weights [T,k] float32 -> [T,H]."""
    f13, f2, local = _dequantized_used(x, w13, w2, ids)
    return moe_experts_reference(x, f13, f2, local, weights)


if triton is not None:

    @triton.jit
    def _unpacked(Data, Scale, Zero, e, rows, cols, mask, n_rows, row_bytes, n_groups,
                  BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr):
        """Dequantised weights [len(rows), len(cols)] of expert e, read from its packed stack."""
        if BITS == 8:
            q = tl.load(Data + (e * n_rows + rows[:, None]) * row_bytes + cols[None, :], mask=mask, other=0)
            s = tl.load(Scale + e * n_rows + rows, mask=rows < n_rows, other=0.0)
            return q.to(tl.float32) * s[:, None]
        byte = tl.load(Data + (e * n_rows + rows[:, None]) * row_bytes + cols[None, :] // 2, mask=mask, other=0)
        nib = ((byte >> ((cols[None, :] % 2) * 4)) & 0xF).to(tl.float32)
        gi = (e * n_rows + rows[:, None]) * n_groups + cols[None, :] // GROUP
        s = tl.load(Scale + gi, mask=mask, other=0.0)
        if HAS_ZERO:
            z = tl.load(Zero + gi, mask=mask, other=0).to(tl.float32)
        else:
            z = 8.0
        return (nib - z) * s

    @triton.jit
    def _gate_up_quant_kernel(X, Data, Scale, Zero, Ids, Act, H, I, E, k, stride_xt, stride_at, row_bytes,
                              n_groups, BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """act[t*k + j, n] = silu(gate_e[n] . x[t]) * (up_e[n] . x[t]) for a block of n, e = ids[t, j]."""
        row = tl.program_id(0)
        nb = tl.program_id(1)
        t = row // k
        e = tl.load(Ids + row)
        ok = (e >= 0) & (e < E)
        e = tl.where(ok, e, 0)
        n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < tl.where(ok, I, 0)  # an expert of another rank reads nothing
        acc_g = tl.zeros([BLOCK_N], tl.float32)
        acc_u = tl.zeros([BLOCK_N], tl.float32)
        for h0 in range(0, H, BLOCK_K):
            h = h0 + tl.arange(0, BLOCK_K)
            hmask = h < H
            xv = tl.load(X + t * stride_xt + h, mask=hmask, other=0.0).to(tl.float32)
            m = nmask[:, None] & hmask[None, :]
            g = _unpacked(Data, Scale, Zero, e, n, h, m, 2 * I, row_bytes, n_groups, BITS, GROUP, HAS_ZERO)
            u = _unpacked(Data, Scale, Zero, e, n + I, h, m, 2 * I, row_bytes, n_groups, BITS, GROUP, HAS_ZERO)
            acc_g += tl.sum(g * xv[None, :], axis=1)
            acc_u += tl.sum(u * xv[None, :], axis=1)
        act = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
        tl.store(Act + row * stride_at + n, act, mask=n < I)

    @triton.jit
    def _down_quant_kernel(Act, Data, Scale, Zero, Ids, Wts, Y, H, I, E, k, stride_at, stride_yt, row_bytes,
                           n_groups, BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """y[t, n] = sum_j w[t, j] * (down_e[n] . act[t*k + j]) for a block of output features n."""
        t = tl.program_id(0)
        nb = tl.program_id(1)
        n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_N], tl.float32)
        for j in range(0, k):
            e = tl.load(Ids + t * k + j)
            ok = (e >= 0) & (e < E)
            w = tl.where(ok, tl.load(Wts + t * k + j), 0.0)
            e = tl.where(ok, e, 0)
            nmask = n < tl.where(ok, H, 0)
            part = tl.zeros([BLOCK_N], tl.float32)
            for i0 in range(0, I, BLOCK_K):
                i = i0 + tl.arange(0, BLOCK_K)
                imask = i < I
                a = tl.load(Act + (t * k + j) * stride_at + i, mask=imask, other=0.0)
                wv = _unpacked(Data, Scale, Zero, e, n, i, nmask[:, None] & imask[None, :], H, row_bytes,
                               n_groups, BITS, GROUP, HAS_ZERO)
                part += tl.sum(wv * a[None, :], axis=1)
            acc += w * part
        tl.store(Y + t * stride_yt + n, acc, mask=n < H)


def _args(w: Packed):
    zero = w.zero if w.zero is not None else w.scale  # unused without zero points
    n_groups = w.scale.shape[-1] if w.bits == 4 else 1
    return (w.data.contiguous(), w.scale.contiguous(), zero.contiguous()), w.data.shape[-1], n_groups, dict(
        BITS=w.bits, GROUP=max(w.group, 1), HAS_ZERO=w.zero is not None)


def moe_experts_quant_triton(x: torch.Tensor, w13: Packed, w2: Packed, ids: torch.Tensor, weights: torch.Tensor,
                             block_n: int = 32, block_k: int = 128) -> torch.Tensor:
    """Same contract as moe_experts_quant_reference; the chosen experts' packed rows are read in place."""
    T, k = ids.shape
    E, H, I = w2.data.shape[0], w2.out_features, w2.in_features
    x, ids, weights = x.contiguous(), ids.contiguous(), weights.float().contiguous()
    act = torch.empty(T * k, I, device=x.device, dtype=torch.float32)
    t13, bytes13, g13, c13 = _args(w13)
    _gate_up_quant_kernel[(T * k, triton.cdiv(I, block_n))](
        x, *t13, ids, act, H, I, E, k, x.stride(0), act.stride(0), bytes13, g13, **c13,
        BLOCK_N=block_n, BLOCK_K=block_k)
    y = torch.empty(T, H, device=x.device, dtype=torch.float32)
    t2, bytes2, g2, c2 = _args(w2)
    _down_quant_kernel[(T, triton.cdiv(H, block_n))](
        act, *t2, ids, weights, y, H, I, E, k, act.stride(0), y.stride(0), bytes2, g2, **c2,
        BLOCK_N=block_n, BLOCK_K=block_k)
    return y.to(x.dtype)


def moe_experts_quant(x, w13: Packed, w2: Packed, ids, weights):
    """Triton on CUDA for decode-sized batches; elsewhere the chosen experts dequantised, then run by
    fused_moe.moe_experts (its host loop on the CPU)."""
    if triton is not None and x.is_cuda and ids.shape[0] <= GATHER_MAX_TOKENS:
        return moe_experts_quant_triton(x, w13, w2, ids, weights)
    f13, f2, local = _dequantized_used(x, w13, w2, ids)
    return moe_experts(x, f13, f2, local, weights)
