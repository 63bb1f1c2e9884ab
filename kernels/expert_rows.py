"""How the MoE kernels read an expert's weights: rows of a plain stack [E, rows, row_len] (bf16/fp32) as
they are, or rows of a packed stack (quant_format.Packed: int8 per output channel, or int4 in groups, two
values a byte, low nibble first) dequantised in registers. fused_moe's two kernels call `expert_rows`, so the
plain and the quantized MoE are one kernel body; PACKED is a compile-time constant. Block-scaled FP8 stacks
(`--fp8 keep`, fp8_moe.py) are read the same way, FP8 a compile-time constant too.

A tile is BLOCK_K consecutive columns from a multiple of BLOCK_K: int4 bytes are read once each (not once a
nibble) and, when the tile lies in one group, the scales are one a row: the element-wise gathers of scales
made the int4 kernels spill (2.5 KB a thread at sm_90a, benchmarks/check_kernels.py)."""

from __future__ import annotations

from .triton_support import tl, triton

if triton is not None:

    @triton.jit
    def _unpacked(Data, Scale, Zero, e, rows, rmask, col0, n_cols, n_rows, row_bytes, n_groups,
                  BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_K: tl.constexpr):
        """Dequantised weights [len(rows), BLOCK_K] of expert e, columns col0.., read from its packed stack."""
        base = (e * n_rows + rows) * row_bytes  # [rows], int64: e is
        if BITS == 8:
            cols = col0 + tl.arange(0, BLOCK_K)
            q = tl.load(Data + base[:, None] + cols[None, :], mask=rmask[:, None] & (cols[None, :] < n_cols),
                        other=0)
            s = tl.load(Scale + e * n_rows + rows, mask=rmask, other=0.0)
            return q.to(tl.float32) * s[:, None]
        # int4: each byte read once (BLOCK_K / 2 of them a row), its two nibbles put back in column order
        half = col0 // 2 + tl.arange(0, BLOCK_K // 2)
        byte = tl.load(Data + base[:, None] + half[None, :], mask=rmask[:, None] & (half[None, :] < row_bytes),
                       other=0)
        nib = tl.interleave(byte & 0xF, byte >> 4).to(tl.float32)
        if GROUP % BLOCK_K == 0:  # the tile lies in one group: one scale (and zero) a row, not one an element
            g = (e * n_rows + rows) * n_groups + col0 // GROUP
            s = tl.load(Scale + g, mask=rmask, other=0.0)
            if HAS_ZERO:
                z = tl.load(Zero + g, mask=rmask, other=0).to(tl.float32)
            else:
                z = tl.zeros_like(s) + 8.0
            return (nib - z[:, None]) * s[:, None]
        cols = col0 + tl.arange(0, BLOCK_K)
        mask = rmask[:, None] & (cols[None, :] < n_groups * GROUP)
        gi = (e * n_rows + rows[:, None]) * n_groups + cols[None, :] // GROUP
        s = tl.load(Scale + gi, mask=mask, other=0.0)
        if HAS_ZERO:
            z = tl.load(Zero + gi, mask=mask, other=0).to(tl.float32)
        else:
            z = 8.0
        return (nib - z) * s

    @triton.jit
    def expert_rows(W, Scale, Zero, e, rows, rmask, col0, n_cols, n_rows, row_len, n_groups,
                    PACKED: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                    BLOCK_K: tl.constexpr, FP8: tl.constexpr = False, ROUND: tl.constexpr = tl.float32):
        """Weights [len(rows), BLOCK_K] of expert e, columns col0..col0+BLOCK_K-1 (col0 a multiple of BLOCK_K;
        columns from n_cols on read 0; row_len: elements, or bytes when packed): a plain stack's in its own
        dtype, packed ones dequantised in float32. FP8: e4m3 rows times the scale of their GROUP x GROUP tile
        (n_groups tiles a row; BLOCK_K divides GROUP), rounded to ROUND as the dequantised weight is
        (fp8_moe.py). The caller converts the tile to its tl.dot operand type (fused_moe.py)."""
        cols = col0 + tl.arange(0, BLOCK_K)
        if PACKED:
            out = _unpacked(W, Scale, Zero, e, rows, rmask, col0, n_cols, n_rows, row_len, n_groups, BITS, GROUP,
                            HAS_ZERO, BLOCK_K)
        elif FP8:
            q = tl.load(W + (e * n_rows + rows[:, None]) * row_len + cols[None, :],
                        mask=rmask[:, None] & (cols[None, :] < n_cols), other=0.0).to(tl.float32)
            tiles = (n_rows + GROUP - 1) // GROUP
            s = tl.load(Scale + (e * tiles + rows // GROUP) * n_groups + col0 // GROUP, mask=rmask, other=0.0)
            out = (q * s[:, None]).to(ROUND)
        else:
            out = tl.load(W + (e * n_rows + rows[:, None]) * row_len + cols[None, :],
                          mask=rmask[:, None] & (cols[None, :] < n_cols), other=0.0)
        return out
