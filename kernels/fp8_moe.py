"""The routed experts of a DeepSeekMoE layer over STACKED block-scaled FP8 weights (`--fp8 keep`, as
DeepSeek-V3 and R1 ship them): the same function and call shape as fused_moe.moe_experts, with w13 [E, 2I, H]
and w2 [E, H, I] in e4m3 and their `weight_scale_inv` stacks s13 [E, 2*ceil(I/b), ceil(H/b)] (gate's blocks,
then up's) and s2 [E, ceil(H/b), ceil(I/b)], b x b tiles (fp8_matmul.py has one weight's layout).

Each chosen expert's weight is its FP8 tile times the tile's scale, rounded to x's dtype (as the engine's
float path rounds the whole weight), then fused_moe's function. Three implementations:
  * `moe_experts_fp8_reference`: every expert of the stack dequantised, then fused_moe's reference;
  * `moe_experts_fp8_triton`: fused_moe's two decode kernels reading the chosen experts' FP8 rows in place and
    dequantising them in registers (expert_rows.py): no float copy of any expert, no host sync, so the static
    decode step captures it (decode and 1+K verify batches on CUDA);
  * `moe_experts_fp8_loop`: the host picks the experts (fused_moe.routed_sum) and dequantises each chosen one
    as it runs: no `torch.unique`, no float copy of the experts nobody chose (the CPU, and CUDA prefill).
`moe_experts_fp8` picks between the last two. Each takes the shared experts too (`shared`: their gate, up and
down FP8 weights, each followed by its scales), added with weight 1: inside the kernels on the Triton path.
"""

from __future__ import annotations

import torch

from .fp8_matmul import dequantize_fp8
from .fused_moe import BLOCK_K, BLOCK_N, GATHER_MAX_TOKENS, TL_DTYPES, expert_ffn, moe_experts_reference, \
    routed_sum, run_expert_kernels, shared_ffn
from .triton_support import triton


def _expert(w13, s13, w2, s2, e: int, block: tuple[int, int], dtype):
    """Expert e's gate/up stack [2I, H] and down [H, I], dequantised and rounded to `dtype`."""
    I, n_gate = w2.shape[-1], s13.shape[1] // 2
    gate = dequantize_fp8(w13[e, :I], s13[e, :n_gate], block)
    up = dequantize_fp8(w13[e, I:], s13[e, n_gate:], block)
    return torch.cat([gate, up]).to(dtype), dequantize_fp8(w2[e], s2[e], block).to(dtype)


def _shared(x, shared, block):
    """The shared experts (gate, gate scales, up, up scales, down, down scales) dequantised to x's dtype."""
    if shared is None:
        return None
    return tuple(dequantize_fp8(w, s, block).to(x.dtype) for w, s in zip(shared[::2], shared[1::2]))


def moe_experts_fp8_reference(x, w13, s13, w2, s2, ids, weights, block: tuple[int, int],
                              shared=None) -> torch.Tensor:
    """x [T,H], FP8 stacks and their scales, ids [T,k] int64, weights [T,k] float32 -> [T,H]."""
    experts = [_expert(w13, s13, w2, s2, e, block, x.dtype) for e in range(w13.shape[0])]
    return moe_experts_reference(x, torch.stack([a for a, _ in experts]), torch.stack([b for _, b in experts]),
                                 ids, weights, _shared(x, shared, block))


def moe_experts_fp8_loop(x, w13, s13, w2, s2, ids, weights, block: tuple[int, int], shared=None) -> torch.Tensor:
    """Same contract; each chosen expert dequantised when it runs, one at a time."""
    return routed_sum(x, ids, weights, w13.shape[0],
                      lambda e, xs: expert_ffn(xs, *_expert(w13, s13, w2, s2, e, block, x.dtype)),
                      one_by_one=ids.shape[0] == 1, shared_out=shared_ffn(x, _shared(x, shared, block)))


def fp8_stack(w: torch.Tensor, scale: torch.Tensor, block: int, dtype: torch.dtype):
    """An FP8 stack as fused_moe's kernels take it (the twin of fused_moe.plain_stack): rows dequantised in
    registers with their tile's scale (GROUP: the tile's side) and rounded to `dtype`."""
    w, scale = w.contiguous(), scale.float().contiguous()
    return (w, scale, scale), w.shape[-1], scale.shape[-1], dict(
        PACKED=False, BITS=8, GROUP=block, HAS_ZERO=False, FP8=True, ROUND=TL_DTYPES[dtype])


def fp8_triton_fits(w2: torch.Tensor, block: tuple[int, int], block_k: int = BLOCK_K, shared=None) -> bool:
    """The kernels' tiles stay inside one scale tile: square tiles that BLOCK_K divides, and an expert's gate
    rows fill whole tiles (so its up rows start a new row of tiles: I a multiple of the tile; the shared
    experts' width too)."""
    b = block[0]
    return block[0] == block[1] and b % block_k == 0 and w2.shape[-1] % b == 0 and (
        shared is None or shared[0].shape[0] % b == 0)


def moe_experts_fp8_triton(x, w13, s13, w2, s2, ids, weights, block: tuple[int, int],
                           block_n: int = BLOCK_N, block_k: int = BLOCK_K, shared=None) -> torch.Tensor:
    """Same contract as moe_experts_fp8_reference; the chosen experts' FP8 rows are read in place."""
    assert fp8_triton_fits(w2, block, block_k, shared), "FP8 tiles must not straddle scale tiles"
    E, I = w2.shape[0], w2.shape[-1]
    sh = None if shared is None else (*(fp8_stack(w, s, block[0], x.dtype) for w, s in zip(shared[::2], shared[1::2])),
                                       shared[0].shape[0])
    return run_expert_kernels(x, fp8_stack(w13, s13, block[0], x.dtype), fp8_stack(w2, s2, block[0], x.dtype),
                              ids, weights, E, I, block_n, block_k, sh)


def moe_experts_fp8(x, w13, s13, w2, s2, ids, weights, block: tuple[int, int], shared=None) -> torch.Tensor:
    """Triton on CUDA for decode-sized batches (where the tiles fit); elsewhere the host-chosen loop."""
    shared = shared or None
    if triton is not None and x.is_cuda and ids.shape[0] <= GATHER_MAX_TOKENS and fp8_triton_fits(
            w2, block, shared=shared):
        return moe_experts_fp8_triton(x, w13, s13, w2, s2, ids, weights, block, shared=shared)
    return moe_experts_fp8_loop(x, w13, s13, w2, s2, ids, weights, block, shared)
