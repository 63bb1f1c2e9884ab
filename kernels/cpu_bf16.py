"""bfloat16 weights on a CPU without bfloat16 arithmetic: dschat's own GEMV / GEMM (cpu_gemv_bf16.cpp, AVX2 + FMA,
built into cpu_gemv.py's library) for the bfloat16 model's linear layers and routed experts.

PyTorch's bfloat16 matmul on such a CPU (AVX2, no AVX512-BF16) runs a generic path: 1.3x the float32 decode
although it reads half the bytes, and a quarter of float32's prefill. Here the weights stay bfloat16 in
memory and are widened to float32 in registers; x is widened exactly; the sums run in float32 (FMA) and the
result is rounded to bfloat16 to nearest even, as PyTorch rounds its float32 sums (`linear_reference`). So
`linear` is PyTorch's bfloat16 F.linear up to float32 summation order: an output differs, by one bfloat16
step, only where the exact sum lies within float32 rounding of the midpoint between two bfloat16 numbers.

`experts` is fused_moe.moe_experts's function on bfloat16 stacks for one token: its chosen experts in one call
(only their rows read), rounding where the PyTorch loop (moe_experts_loop) rounds; fused_moe runs more
tokens expert by expert over `linear` (views of the stacks: nothing copied).

On a CPU that multiplies bfloat16 natively (AVX512-BF16 or AMX-BF16), PyTorch's bfloat16 matmul (oneDNN) runs
many rows two to four times as fast as this kernel's GEMM, which widens the weights to float32 for FMAs: there
`linear_or_torch` (the engine's Linear) and the experts' loop over many tokens run PyTorch's F.linear from
TORCH_MIN_ROWS rows, where the kernel's GEMV gives way to its GEMM (`torch_gemm`). Up to GEMV_MAX_ROWS rows the
GEMV gives each row the bits it gives that row alone, so a verify of that many rows (MTP's 2) computes what
decode computes; from there (n-gram's 5, prefill) the sums run in another order, as the kernel's GEMM's did
(some rows one bfloat16 step apart from their one-row results), so a verify may part from decode at a near-tie.

`available()` is false where cpu_gemv cannot be built (no compiler, no AVX2/FMA) or DSCHAT_CPU_GEMV=0 (said in
one line by cpu_gemv.native()): the callers then run PyTorch's bfloat16 matmul as before.
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch

from . import cpu_gemv

_P, _I64, _I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


def available() -> bool:
    """Whether the kernels run here (the library is built and loaded)."""
    return cpu_gemv.native() is not None


def _lib():
    lib = cpu_gemv.native()
    if lib is None:
        raise RuntimeError("cpu_bf16: the CPU kernels are not available")
    return lib


GEMV_MAX_ROWS = 4  # cpu_gemv_bf16.cpp's: up to this many rows of x its GEMV runs, from there its GEMM
# From this many rows of x PyTorch's matmul runs where `torch_gemm` (the kernel's GEMM's rows). Measured on a Zen 4
# (AVX512-BF16), 2 threads, PyTorch against the kernel: 512 x 10944 x 2048 55 against 112 ms, an expert's 48 x 2816
# x 2048 1.5 against 3.5 ms, 8 rows 0.43 against 0.97 ms, 5 rows 0.33 against 1.20; one row (decode) 0.30 against
# 0.22 ms (the kernel's GEMV).
TORCH_MIN_ROWS = GEMV_MAX_ROWS + 1


@functools.cache
def _bf16_arithmetic() -> bool:
    """Whether the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX-BF16) and PyTorch has oneDNN to use it."""
    return torch.backends.mkldnn.is_available() and bool({"avx512_bf16", "amx_bf16"} & cpu_gemv._cpu_flags())


def torch_gemm() -> bool:
    """Whether TORCH_MIN_ROWS rows of x or more (prefill) run PyTorch's bfloat16 matmul rather than this kernel's
    GEMM: where the CPU has bfloat16 arithmetic and oneDNN is on (torch.backends.mkldnn.enabled: without it
    PyTorch's bfloat16 matmul takes its slow generic path). DSCHAT_BF16_GEMM=dschat keeps the kernel's GEMM."""
    return (os.environ.get("DSCHAT_BF16_GEMM") != "dschat" and torch.backends.mkldnn.enabled
            and _bf16_arithmetic())


def torch_rows(rows: int) -> bool:
    """Whether `rows` rows of x (queries of MLA's absorbed attention, its fold and unfold) run PyTorch's
    bfloat16 products rather than this kernel's: TORCH_MIN_ROWS or more, where `torch_gemm`. A 64-token follow-up
    turn over 2112 cached tokens (Zen 4, 2 threads, V2-Lite's 16 heads): the attention 74 against 20 ms a layer,
    the fold 1.6 against 0.5 ms; at one query the kernel leads (2.9 against 3.2 ms; the fold 0.09 against 0.17)."""
    return rows >= TORCH_MIN_ROWS and torch_gemm()


def takes(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `linear_or_torch(x, w)` runs the kernel: both bfloat16 on the CPU, w a contiguous matrix, and x of
    few rows where PyTorch's matmul is the faster one for many (`torch_gemm`)."""
    return (x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16 and w.dim() == 2 and x.device.type == "cpu"
            and w.device.type == "cpu" and w.is_contiguous() and x.shape[-1] == w.shape[1] and available()
            and not torch_rows(x.shape[:-1].numel()))


def linear(x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """x [..., K] bfloat16 -> x W^T [..., N] in bfloat16 (rounded to nearest even) or float32 (`out_dtype`),
    W bfloat16 [N, K] contiguous (`takes`)."""
    K, N = w.shape[1], w.shape[0]
    xc = x if x.is_contiguous() else x.contiguous()
    y = torch.empty(*x.shape[:-1], N, dtype=out_dtype)
    err = _lib().dschat_bf16_linear(_P(xc.data_ptr()), _I64(xc.numel() // K), _I64(K), _P(w.data_ptr()), _I64(N),
                                    _P(y.data_ptr()), _I(1), _I(out_dtype == torch.bfloat16),
                                    _I(torch.get_num_threads()))
    if err:
        raise ValueError(f"cpu_bf16: bad arguments (error {err})")
    return y


def linear_or_torch(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`linear` where it `takes` x and w, else PyTorch's F.linear (the engine's Linear on the CPU in bfloat16, the
    experts' loop over many tokens)."""
    return linear(x, w) if takes(x, w) else torch.nn.functional.linear(x, w)


def bmm(x: torch.Tensor, w: torch.Tensor, trans: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """Batched x[b] W[b]^T (trans: w [B, N, K]) or x[b] W[b] (w [B, K, N]) for x [B, M, K], all bfloat16 with
    their last dimension contiguous (views: no copy), into `out` [B, M, N] (a view too; else a new tensor),
    rounded to bfloat16 once per element (MLA's absorbed attention, a few rows a head)."""
    B, M, K = x.shape
    N = w.shape[1] if trans else w.shape[2]
    assert w.shape[0] == B and w.shape[2 if trans else 1] == K and x.stride(-1) == 1 and w.stride(-1) == 1
    if out is None:
        out = torch.empty(B, M, N, dtype=torch.bfloat16)
    assert out.shape == (B, M, N) and out.dtype == torch.bfloat16 and out.stride(-1) == 1
    err = _lib().dschat_bf16_bmm(_P(x.data_ptr()), _I64(B), _I64(M), _I64(K), _I64(x.stride(0)), _I64(x.stride(1)),
                                 _P(w.data_ptr()), _I64(N), _I64(w.stride(0)), _I64(w.stride(1)), _I(int(trans)),
                                 _P(out.data_ptr()), _I64(out.stride(0)), _I64(out.stride(1)),
                                 _I(torch.get_num_threads()))
    if err:
        raise ValueError(f"cpu_bf16: bad arguments (error {err})")
    return out


def linear_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What `linear` computes, in float64 plain PyTorch: the bfloat16 numbers as they are, summed exactly (to
    float64), rounded once to bfloat16."""
    return (x.double() @ w.double().T).to(torch.bfloat16)


def experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
            w2: torch.Tensor) -> torch.Tensor:
    """One token x [1, H] bfloat16 through its chosen experts ids [k] (outside 0..E-1: nothing) with routing
    weights [k], over the stacks w13 [E, 2I, H] and w2 [E, H, I] (bfloat16, contiguous) -> [1, H] bfloat16."""
    H = x.shape[-1]
    assert x.numel() == H, "one token"
    E, I2 = w13.shape[:2]
    xc = x.contiguous()
    idc = ids.reshape(-1).to(torch.int64).contiguous()
    wc = weights.reshape(-1).to(torch.float32).contiguous()
    y = torch.empty(x.shape, dtype=torch.bfloat16)
    err = _lib().dschat_bf16_experts(_P(xc.data_ptr()), _I64(H), _P(idc.data_ptr()), _P(wc.data_ptr()),
                                     _I64(min(idc.numel(), wc.numel())), _P(w13.data_ptr()), _P(w2.data_ptr()),
                                     _I64(E), _I64(I2 // 2), _P(y.data_ptr()), _I(torch.get_num_threads()))
    if err:
        raise ValueError(f"cpu_bf16: bad arguments (error {err})")
    return y


def stacks_fit(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether fused_moe.moe_experts runs these through the kernels: bfloat16 x and stacks on the CPU, the
    stacks contiguous."""
    return (x.dtype == w13.dtype == w2.dtype == torch.bfloat16 and x.device.type == "cpu"
            and w13.device.type == "cpu" and w13.is_contiguous() and w2.is_contiguous() and available())


__all__ = ["available", "torch_gemm", "takes", "linear", "linear_or_torch", "linear_reference", "bmm", "experts",
           "stacks_fit"]
