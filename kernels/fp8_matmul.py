"""Block-scaled FP8 weights, as DeepSeek-V3 ships them: an e4m3 weight [out, in] and a float32
`weight_scale_inv` [ceil(out/128), ceil(in/128)]; the real weight is each 128x128 tile times its scale
(edge tiles may be partial).

`dequantize_fp8` is the reference: it turns a weight (or a stack of them, leading dimensions first) into
float32.
"""

from __future__ import annotations

import torch


def dequantize_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Blockwise FP8 [..., out, in] -> float32: each [block x block] tile times its scale [..., bo, bi]."""
    out_f, in_f = w.shape[-2:]
    bo, bi = block
    s = scale_inv.float().repeat_interleave(bo, dim=-2)[..., :out_f, :]
    s = s.repeat_interleave(bi, dim=-1)[..., :in_f]
    return w.float() * s
