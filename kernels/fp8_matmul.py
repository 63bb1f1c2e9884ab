"""Block-scaled FP8 weights, as DeepSeek-V3 ships them: an e4m3 weight [out, in] and a float32
`weight_scale_inv` [ceil(out/128), ceil(in/128)]; the real weight is each 128x128 tile times its scale
(edge tiles may be partial).

`dequantize_fp8` turns a weight (or a stack of them, leading dimensions first) into float32. The matmul
y = x W^T has two implementations: `fp8_linear_reference` (dequantise, then F.linear) and
`fp8_linear_triton` (reads the FP8 tiles as they are and dequantises them to x's dtype in registers, so a
batch-1 decode reads half the bytes of bf16, and multiplies them on the tensor cores). `fp8_linear` picks Triton
for CUDA tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .triton_support import tl, triton


def dequantize_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Blockwise FP8 [..., out, in] -> float32: each [block x block] tile times its scale [..., bo, bi]."""
    out_f, in_f = w.shape[-2:]
    bo, bi = block
    s = scale_inv.float().repeat_interleave(bo, dim=-2)[..., :out_f, :]
    s = s.repeat_interleave(bi, dim=-1)[..., :in_f]
    return w.float() * s


def fp8_linear_reference(x: torch.Tensor, w: torch.Tensor, scale_inv: torch.Tensor,
                         block: tuple[int, int]) -> torch.Tensor:
    """y = x W^T with W dequantised first: x [..., in] -> [..., out] in x's dtype."""
    return F.linear(x, dequantize_fp8(w, scale_inv, block).to(x.dtype))


if triton is not None:

    @triton.jit
    def _fp8_linear_kernel(X, W, S, Y, M, N, K, stride_xm, stride_wn, stride_sn, stride_ym,
                           BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           PRECISION: tl.constexpr):
        """A [BLOCK_M, BLOCK_N] tile of y: FP8 weight tiles are read as they are and dequantised in
        registers with the scale of their [BLOCK_SIZE_N, BLOCK_SIZE_K] block (BLOCK_N and BLOCK_K divide
        the block sizes, so a tile's row never spans two blocks along K), rounded to x's dtype as the
        reference rounds the whole weight, then multiplied on the tensor cores (bf16 / fp16 x; float32
        x stays float32, "ieee")."""
        pm = tl.program_id(0)
        pn = tl.program_id(1)
        m = pm * BLOCK_M + tl.arange(0, BLOCK_M)
        n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(X + m[:, None] * stride_xm + k[None, :], mask=(m[:, None] < M) & (k[None, :] < K),
                        other=0.0)
            w = tl.load(W + n[:, None] * stride_wn + k[None, :], mask=(n[:, None] < N) & (k[None, :] < K),
                        other=0.0).to(tl.float32)
            s = tl.load(S + (n // BLOCK_SIZE_N) * stride_sn + k0 // BLOCK_SIZE_K, mask=n < N, other=0.0)
            acc += tl.dot(x, tl.trans((w * s[:, None]).to(x.dtype)), input_precision=PRECISION)
        tl.store(Y + m[:, None] * stride_ym + n[None, :], acc, mask=(m[:, None] < M) & (n[None, :] < N))


def fp8_linear_triton(x: torch.Tensor, w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                      block_n: int = 64, block_k: int = 64) -> torch.Tensor:
    """Same contract as fp8_linear_reference; the weight is read in FP8 (half the bytes of bf16)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    M, K = x2.shape
    N = w.shape[0]
    assert block[0] % block_n == 0 and block[1] % block_k == 0, "tiles must not straddle scale blocks"
    y = torch.empty(M, N, device=x.device, dtype=torch.float32)
    block_m = 16  # tl.dot's smallest tile; batch-1 decode uses one row of it
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _fp8_linear_kernel[grid](x2, w, scale_inv, y, M, N, K, x2.stride(0), w.stride(0), scale_inv.stride(0),
                             y.stride(0), BLOCK_SIZE_N=block[0], BLOCK_SIZE_K=block[1],
                             BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                             PRECISION="ieee" if x2.dtype == torch.float32 else "tf32")
    return y.to(x.dtype).view(*shape[:-1], N)


def fp8_linear(x, w, scale_inv, block):
    """Triton on CUDA, the reference elsewhere."""
    if triton is not None and x.is_cuda:
        return fp8_linear_triton(x, w, scale_inv, block)
    return fp8_linear_reference(x, w, scale_inv, block)
