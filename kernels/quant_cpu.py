"""Packed int8 / int4 weights (and lm_head's int6, through cpu_gemv.gemv only) on the CPU: dschat's own kernels
(cpu_gemv.py: AVX2, the stored layout read in place) or, where those cannot run, PyTorch's packed-weight
kernels, for the few rows of a decode step; the float model of the dequantised weight for many rows (prefill);
and the routed experts over either, touching only the chosen experts' packed rows.

With cpu_gemv (`native_gemv()` true), below `gemm_min_rows(bits)` rows (14; int8 12 where the library has no integer
GEMM: decode, speculation's verify, an expert's few tokens) x is quantized to int8 blocks of 32 and multiplied with
the stored weight exactly in integers, one weight row at a time (cpu_gemv.gemv; cpu_gemv.py says what that
computes). From there up (prefill, an expert's tokens in a prefill) a GEMM runs: int4 the integer GEMM over the same
int8 activations as gemv (cpu_gemv.igemm4): gemv's numbers up to float32 summation order; int8 likewise
(cpu_gemv.igemm8) where the library is built for AVX512-VNNI, else the float GEMM: x stays float32 and the weight is
dequantised panel by panel in registers (cpu_gemv.gemm_f32): F.linear(x, dequantize(w)) up to float32 summation
order. int4 is not repacked. CPU_KERNEL_MAX_ROWS = 0 (tests) runs the float GEMM at every row count.
Without cpu_gemv (no compiler, no AVX2, DSCHAT_CPU_GEMV=0) the PyTorch kernels below run:

* int8 runs `aten._weight_int8pack_mm` on the stored layout (quant_format.py: int8 [N, K] + a float32 scale
  per row); the scale is applied in float32 after the kernel, so the weight is exactly the stored one.
* int4 is repacked once, on load, into `aten._convert_weight_to_int4pack_for_cpu`'s layout (`Int4Cpu`):
  bytes [Np/B, Kp, B/2], the low nibble of byte (b, k, j) is W[Bb + j, k] and the high one W[Bb + B/2 + j, k]
  (B = `n_block()`: 32 on an AVX2 CPU, 64 on an AVX-512 one, as PyTorch's kernels are built; Np: N padded to a
  multiple of B with zero rows), and per group a bfloat16 (scale, offset) pair with
  W = (q - 8) * scale + offset; offset = (8 - zero) * scale. So the weight the kernel reads is the stored one
  with its scales rounded to bfloat16.
* Both kernels are fast only with bfloat16 activations (measured on an AVX2 CPU: float32 activations take a generic
  path 8-40x slower than a float32 matmul). So up to `kernel_rows(w)` rows, x is rounded to bfloat16, the kernel
  accumulates in float32 and rounds its output to bfloat16, and the result comes back in x's dtype: about 3
  significant digits, the tolerance the tests allow (a float model of the dequantised weights, logits within 2% of
  their range). Above that the kernels cost about one weight read per row, so the weight is dequantised to x's dtype
  once and multiplied exactly (`dequantize_cpu`): prefill's numerics are those of the float model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import cpu_gemv
from .fused_moe import routed_sum
from .quant_format import SYMMETRIC_ZERO, Packed, dequantize, unpack_int4

# Up to this many rows (int4: three times as many) the packed kernels beat dequantise + matmul: each row costs
# them about one read of the weight, while dequantising costs several (measured at V2-Lite's shapes, 1 thread).
CPU_KERNEL_MAX_ROWS = 16
INT4_GROUPS = (32, 64, 128, 256)  # the group sizes the int4 kernel takes (others run quant_matmul's reference)
INT8_N_CHUNK = 4096  # the int8 kernel over lm_head's 102400 rows at once runs at half the speed of 4096-row slices
INT8_K_MULTIPLE = 16  # the int8 kernel misreads other input widths (crashes, or infinities): dequantise those
# From this many rows of x up (by bits), cpu_gemv's GEMMs beat its one-weight-row-at-a-time integer kernel:
# int8 the float GEMM (gemm_f32: x in float32 times the weight dequantised panel by panel in registers; on an
# AVX2 CPU without VNNI an int8 dot product's multiplies have half the float FMA's throughput), int4 the integer
# GEMM (igemm4: x's int8 blocks as the kernel quantizes them, 8 maddubs summed in int16 per madd, beating the
# float FMA). Measured 1 thread, CPU time, GFLOP/s, integer kernel -> GEMM, at the expert shape 2816 x 2048:
# int8 8 rows 20.0 -> 17.3 (float GEMM), 16 rows 21.0 -> 23.8, 48 rows 22.0 -> 30.9; int4 4 rows 26.2 -> 21.2,
# 8 rows 26.0 -> 27.5, 48 rows 29.9 -> 39.4 (the float GEMM: 30.1); dense 512 x 10944 x 2048: int8 21.9 ->
# 34.1 (dequantise + a float32 matmul, the path before: 27.5), int4 30.1 -> 41.2 (float GEMM 33.9).
# Since the GEMV's blocked kernel prefetches its weight rows (cpu_gemv.cpp tile_q8 / tile_q4), it runs 2-16 rows
# 25-45% faster and the crossings moved up: measured 2 threads, Zen 4, gemv -> igemm4, µs: 2816 x 2048, 8 rows
# 351 -> 480, 12 548 -> 564, 16 724 -> 673; 2048 x 1408, 12 rows 311 -> 336, 16 405 -> 407; the dense gate|up
# 21888 x 2048, 12 rows 4056 -> 5214, 16 5507 -> 5740 (the integer GEMM's panels are made each call: at one row
# of an expert 0.6 against 0.15 ms): the GEMV ahead at 12 rows, the GEMM at 16 but on the dense shape; from 14.
# (int8's float GEMM, for CPUs without VNNI, keeps its 12: not measured again.)
FGEMM8_MIN_ROWS = 12
# int8's integer GEMM (igemm8: AVX512-VNNI builds; int4's GEMM with the weight + 128 as dpbusd's unsigned operand)
# overtakes gemv where int4's does: measured 2 threads, Zen 4, gemv -> igemm8 (float GEMM), µs: 2816 x 2048, 6
# rows 316 -> 351 (782), 8 rows 422 -> 430 (944), 10 rows 537 -> 473, 12 rows 685 -> 475 (1118); 2048 x 1408, 6
# rows 171 -> 148, 8 rows 217 -> 188; prefill's 48 rows of an expert (2816 x 2048) 2.88 ms -> 1.24, the dense
# 512 x 10944 x 2048 107 -> 50 ms. With the GEMV's prefetch (above): 2816 x 2048, 8 rows 487 -> 627, 12 698 ->
# 694, 16 852 -> 804; 2048 x 1408, 12 rows 347 -> 422, 16 443 -> 483; 21888 x 2048, 12 rows 4744 -> 5112, 16
# 6189 -> 5704: the GEMV ahead at 12, the GEMM at 16 (but the down projection's): from 14, as int4.
IGEMM_MIN_ROWS = 14  # the integer GEMMs, int4's and int8's


def integer_gemm(bits: int) -> bool:
    """Whether many rows of x run an integer GEMM over this packing: int4 always, int8 where the library has
    igemm8 (AVX512-VNNI); else int8's float GEMM."""
    return bits != 8 or cpu_gemv.has_igemm8()


def gemm_min_rows(bits: int) -> int:
    """From how many rows of x a GEMM runs instead of cpu_gemv's one-weight-row-at-a-time kernel (its numbers
    those of gemv below, of the GEMM from there; see the module's text)."""
    return IGEMM_MIN_ROWS if integer_gemm(bits) else FGEMM8_MIN_ROWS


def native_gemv(w: Packed | None = None) -> bool:
    """Whether cpu_gemv runs (for w: and takes w)."""
    return (w is None or (type(w) is Packed and cpu_gemv.fits(w))) and cpu_gemv.native() is not None


@dataclass
class Int4Cpu:
    """An int4 weight [N, K] (or a stack [..., N, K]) in the CPU kernel's layout (see the module's text)."""
    data: torch.Tensor  # uint8 [..., Np, Kp/2]
    scale_offset: torch.Tensor  # bfloat16 [..., Kp/group, Np, 2]
    out_features: int
    in_features: int
    group: int

    def __getitem__(self, e) -> "Int4Cpu":
        """Expert e of a stack (views: nothing copied)."""
        return Int4Cpu(self.data[e], self.scale_offset[e], self.out_features, self.in_features, self.group)

    def nbytes(self) -> int:
        return self.data.numel() + self.scale_offset.numel() * 2


_N_BLOCK: list[int] = []


def n_block() -> int:
    """How many output rows PyTorch's int4 layout packs in a block on this CPU: 32 where its kernels are the AVX2
    ones, 64 where they are the AVX-512 ones (the layout follows the CPU). Read once from the packing op itself:
    row n of a probe holds n // 8, so the high nibble of the first byte is row n_block / 2's, n_block / 16."""
    if not _N_BLOCK:
        probe = (torch.arange(128, dtype=torch.int32) // 8)[:, None].expand(128, 64).contiguous()
        first = int(torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1).view(-1)[0])
        if 16 * (first >> 4) not in (32, 64) or first & 0xF:
            raise RuntimeError(f"quant_cpu: PyTorch's int4 CPU layout is not one this code knows (byte 0: {first})")
        _N_BLOCK.append(16 * (first >> 4))
    return _N_BLOCK[0]


def int4_fits(w: Packed) -> bool:
    """Whether w is repacked for PyTorch's int4 kernel (not when cpu_gemv takes the stored layout)."""
    return w.bits == 4 and w.group in INT4_GROUPS and not native_gemv(w)


def repack_int4(w: Packed) -> Int4Cpu:
    """A packed int4 weight (or stack of them) -> the CPU kernel's layout (int4_fits(w) must hold)."""
    lead, (n, half) = w.data.shape[:-2], w.data.shape[-2:]
    kp, groups = 2 * half, w.scale.shape[-1]
    nb = n_block()
    np_ = -(-n // nb) * nb
    data = torch.empty(*lead, np_, half, dtype=torch.uint8)
    so = torch.empty(*lead, groups, np_, 2, dtype=torch.bfloat16)
    flat_d, flat_so = data.view(-1, np_, half), so.view(-1, groups, np_, 2)
    src_d, src_s = w.data.reshape(-1, n, half), w.scale.reshape(-1, n, groups)
    src_z = None if w.zero is None else w.zero.reshape(-1, n, groups)
    for i in range(flat_d.shape[0]):
        q = F.pad(unpack_int4(src_d[i]).to(torch.int32), (0, 0, 0, np_ - n))
        flat_d[i] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1).view(np_, half)
        scale = F.pad(src_s[i].float(), (0, 0, 0, np_ - n))
        zero = SYMMETRIC_ZERO if src_z is None else F.pad(src_z[i].float(), (0, 0, 0, np_ - n))
        flat_so[i] = torch.stack((scale, (SYMMETRIC_ZERO - zero) * scale), dim=-1).transpose(0, 1)
    return Int4Cpu(data, so, n, w.in_features, w.group)


def dequantize_cpu(w: Packed | Int4Cpu, dtype=torch.float32) -> torch.Tensor:
    """The weight [N, in_features] the kernel computes with, in `dtype`."""
    if isinstance(w, Packed):
        if native_gemv(w) and w.data.dim() == 2 and w.bits != 6:
            return cpu_gemv.dequantize(w).to(dtype)
        return (w.data.to(dtype) * w.scale.to(dtype)[:, None]) if w.bits == 8 else dequantize(w).to(dtype)
    np_, half = w.data.shape
    kp = 2 * half
    nb = n_block()
    v = w.data.view(np_ // nb, kp, nb // 2)
    q = torch.stack((v & 0xF, v >> 4), dim=1).transpose(2, 3).reshape(np_, kp // w.group, w.group)
    so = w.scale_offset.float().transpose(0, 1)  # [Np, G, 2]
    out = (q.to(torch.float32) - SYMMETRIC_ZERO) * so[..., 0:1] + so[..., 1:2]
    return out.view(np_, kp)[: w.out_features, : w.in_features].to(dtype)


def kernel_rows(w: Packed | Int4Cpu) -> int:
    """Up to how many rows x goes through a packed kernel with int8 or bfloat16 activations rather than a float
    model of the dequantised weight (cpu_gemv's float GEMM, or dequantise + matmul): with cpu_gemv, int4 and
    (with its integer GEMM, `integer_gemm`) int8 any number, else int8 below its float GEMM's rows
    (CPU_KERNEL_MAX_ROWS = 0: none, the float model everywhere)."""
    if native_gemv(w):
        if not CPU_KERNEL_MAX_ROWS:
            return 0
        return 1 << 62 if integer_gemm(w.bits) else gemm_min_rows(w.bits) - 1
    return CPU_KERNEL_MAX_ROWS * (3 if isinstance(w, Int4Cpu) else 1)


def matmul_cpu(x: torch.Tensor, w: Packed | Int4Cpu) -> torch.Tensor:
    """x [..., K] -> [..., N] in x's dtype: a packed kernel for a few rows (kernel_rows), the float model of the
    dequantised weight for more (cpu_gemv's float GEMM, else dequantise + matmul)."""
    if native_gemv(w):
        if w.bits == 6:  # lm_head: decode's row, or speculation's few, through gemv (its blocked kernel for
            # more rows, the weight read once each 64); with the kernels off (tests) the float model exactly
            return cpu_gemv.gemv(x, w) if CPU_KERNEL_MAX_ROWS else F.linear(x, dequantize(w).to(x.dtype))
        if not CPU_KERNEL_MAX_ROWS:
            return cpu_gemv.gemm_f32(x, w)
        if x.numel() < gemm_min_rows(w.bits) * x.shape[-1]:
            return cpu_gemv.gemv(x, w)
        if not integer_gemm(w.bits):
            return cpu_gemv.gemm_f32(x, w)
        return cpu_gemv.igemm8(x, w) if w.bits == 8 else cpu_gemv.igemm4(x, w)
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] > kernel_rows(w) or (isinstance(w, Packed) and (w.bits != 8 or w.in_features % INT8_K_MULTIPLE)):
        return F.linear(x, dequantize_cpu(w, x.dtype))
    xb = rows.to(torch.bfloat16)
    if isinstance(w, Packed):
        xb, n = xb.contiguous(), w.data.shape[0]
        parts = [torch.ops.aten._weight_int8pack_mm(xb, w.data[i:i + INT8_N_CHUNK], _ones(min(INT8_N_CHUNK, n - i)))
                 for i in range(0, n, INT8_N_CHUNK)]
        y = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)).to(x.dtype) * w.scale.to(x.dtype)
    else:
        kp = 2 * w.data.shape[-1]
        if kp != w.in_features:
            xb = F.pad(xb, (0, kp - w.in_features))
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb.contiguous(), w.data, w.group, w.scale_offset)
        y = y[:, : w.out_features].to(x.dtype)
    return y.view(*x.shape[:-1], -1)


_ONES: dict[int, torch.Tensor] = {}


def _ones(n: int) -> torch.Tensor:
    """The int8 kernel's bfloat16 scales: ones (the float32 scales are applied after it)."""
    if n not in _ONES:
        _ONES[n] = torch.ones(n, dtype=torch.bfloat16)
    return _ONES[n]


# Up to this many tokens MLA's fold / unfold runs in cpu_gemv; more: dequantise once. Measured at V2-Lite's layer
# (16 heads, 128 + 128 rows of 512 a head; 1 thread, CPU time, load ~10), fold + unfold, cpu_gemv against
# dequantise + einsum: int8 8 tokens 3.0 / 4.2 ms, 16 tokens 5.9 / 5.3; int4 4.2 / 5.5, 8.6 / 7.0.
HEADS_NATIVE_MAX_TOKENS = 8


def heads_cpu(x: torch.Tensor, w: Packed | Int4Cpu, n: int, row0: int, head_rows: int,
              transposed: bool) -> torch.Tensor:
    """MLA's absorbed fold / unfold over a packed kv_b_proj w [N, K] (cpu_gemv.heads says what it computes):
    x [S, H, ·] -> [S, H, ·] in x's dtype. cpu_gemv for a few tokens (its packed bytes read once a token);
    for more, where it cannot run, or with the kernels off (CPU_KERNEL_MAX_ROWS 0), the weight dequantised
    once and multiplied exactly (the float model's numbers)."""
    S, H, _ = x.shape
    if S <= HEADS_NATIVE_MAX_TOKENS and CPU_KERNEL_MAX_ROWS and native_gemv(w) and x.device.type == "cpu":
        return cpu_gemv.heads(x, w, n, row0, head_rows, transposed)
    W = (dequantize(w).to(x.dtype) if x.device.type != "cpu" or isinstance(w, Packed) and w.data.dim() != 2
         else dequantize_cpu(w, x.dtype)).contiguous()  # (Int4Cpu's is a view of its padded rows)
    K = W.shape[-1]
    Wh = W.as_strided((H, n, K), (head_rows * K, K, 1), row0 * K)
    return torch.einsum("shn,hnk->shk", x, Wh) if transposed else torch.einsum("shk,hnk->shn", x, Wh)


def _stack_item(w: Packed | Int4Cpu, e: int) -> Packed | Int4Cpu:
    if isinstance(w, Int4Cpu):
        return w[e]
    return Packed(w.data[e], w.scale[e], None if w.zero is None else w.zero[e], w.bits, w.group, w.in_features)


def moe_experts_cpu(x: torch.Tensor, w13: Packed | Int4Cpu, w2: Packed | Int4Cpu, ids: torch.Tensor,
                    weights: torch.Tensor) -> torch.Tensor:
    """fused_moe.moe_experts's function over packed stacks w13 [E, 2I, H], w2 [E, H, I]: the experts are
    chosen on the host and each runs on its own tokens, reading only its own packed rows."""

    if ids.shape[0] == 1 and CPU_KERNEL_MAX_ROWS and native_gemv(w13) and x.dtype in (torch.float32,
                                                                                    torch.bfloat16):
        return cpu_gemv.experts(x, ids[0], weights[0], w13, w2)

    def expert(e, xs):
        gate, up = matmul_cpu(xs, _stack_item(w13, e)).chunk(2, dim=-1)
        return matmul_cpu(F.silu(gate) * up, _stack_item(w2, e))

    return routed_sum(x, ids, weights, w13.data.shape[0], expert)
