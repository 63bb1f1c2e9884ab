"""How the MoE kernels read an expert's weights: rows of a plain stack [E, rows, row_len] (bf16/fp32) as
they are, or rows of a packed stack (quant_format.Packed: int8 per output channel, or int4 in groups, two
values a byte, low nibble first) dequantised in registers. fused_moe's two kernels call `expert_rows`, so the
plain and the quantized MoE are one kernel body; PACKED is a compile-time constant."""

from __future__ import annotations

from .triton_support import tl, triton

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
    def expert_rows(W, Scale, Zero, e, rows, cols, mask, n_rows, row_len, n_groups, PACKED: tl.constexpr,
                    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr):
        """Weights [len(rows), len(cols)] of expert e in float32 (row_len: elements, or bytes when packed)."""
        if PACKED:
            return _unpacked(W, Scale, Zero, e, rows, cols, mask, n_rows, row_len, n_groups, BITS, GROUP, HAS_ZERO)
        return tl.load(W + (e * n_rows + rows[:, None]) * row_len + cols[None, :], mask=mask,
                       other=0.0).to(tl.float32)
