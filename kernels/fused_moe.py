"""The routed experts of a DeepSeekMoE layer over STACKED expert weights:

    y[t] = sum_j w[t, j] * down_e(silu(gate_e x[t]) * up_e x[t]),   e = ids[t, j]

w13 [E, 2I, H] holds every expert's gate_proj (rows 0..I-1) and up_proj (rows I..2I-1), w2 [E, H, I] its
down_proj. ids [T, k] (int64) are expert indices into this stack; an id outside 0..E-1 (an expert held by
another rank) contributes zero. The sum runs in float32 and comes back in x's dtype.

Three implementations of the same function:
  * `moe_experts_reference`: PyTorch, gathers each token's chosen experts (no host sync, so a CUDA graph
    can capture it); batches of more than GATHER_MAX_TOKENS tokens (prefill, training) go expert by expert
    instead, with one host sync, since gathering T*k experts would copy more weights than the model holds.
  * `moe_experts_triton`: two GEMV-shaped kernels that read only the chosen experts' rows in place (the
    batch-1 decode and 1+K verify shapes): gate/up + SiLU, then down with the routing weights. They read
    weights through expert_rows, so quant_moe runs the same kernels on packed int8/int4 stacks, and fp8_moe
    on block-scaled FP8 ones.
  * `moe_experts_loop`: the host picks the experts (`.tolist()`, free on the CPU) and runs each on views of
    the stack, copying no weights: the fastest on the CPU, and never used on CUDA.
`moe_experts` picks Triton for CUDA tensors and the loop on the CPU; bfloat16 stacks on the CPU run
cpu_bf16.py's kernels (`moe_experts_bf16_cpu`, the loop's function and roundings).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu_bf16
from .triton_support import tl, triton

if triton is not None:
    from .expert_rows import expert_rows

GATHER_MAX_TOKENS = 16
# The decode kernels' tiles: vLLM's tuned H100 configuration for E=64, N=1408, M=1 (BLOCK_M 16 / N 32 / K 64,
# 4 warps, 4 stages; these GEMV kernels have no M tile). The 4 stages do not pipeline them yet: Triton
# software-pipelines loads that feed tl.dot, and these reduce with tl.sum (no cp.async in their sm_90a PTX).
BLOCK_N, BLOCK_K, NUM_WARPS, NUM_STAGES = 32, 64, 4, 4


def _matvec(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x [..., n] through w: one matrix [m, n] for all rows, or one matrix per row [N, m, n]."""
    return F.linear(x, w) if w.dim() == 2 else torch.bmm(w, x[..., None])[..., 0]


def expert_ffn(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """down(silu(gate x) * up x): one expert on its tokens, or one gathered expert per token."""
    gate, up = _matvec(w13, x).chunk(2, dim=-1)
    return _matvec(w2, F.silu(gate) * up)


def _valid(ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    return (ids >= 0) & (ids < n_experts)


def moe_experts_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, ids: torch.Tensor,
                          weights: torch.Tensor) -> torch.Tensor:
    """x [T,H], w13 [E,2I,H], w2 [E,H,I], ids [T,k] int64, weights [T,k] float32 -> [T,H] in x's dtype."""
    T, k = ids.shape
    if T > GATHER_MAX_TOKENS:
        return _grouped(x, w13, w2, ids, weights)
    E = w13.shape[0]
    valid = _valid(ids, E)
    chosen = ids.clamp(0, E - 1).flatten()
    out = expert_ffn(x.repeat_interleave(k, dim=0), w13[chosen], w2[chosen])  # [T*k, H]
    w = torch.where(valid, weights, torch.zeros_like(weights)).flatten()
    return (out.float() * w[:, None]).view(T, k, -1).sum(dim=1).to(x.dtype)


def _grouped(x, w13, w2, ids, weights) -> torch.Tensor:
    return routed_sum(x, ids, weights, w13.shape[0], lambda e, xs: expert_ffn(xs, w13[e], w2[e]), one_by_one=False)


def routed_sum(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, n_experts: int, expert,
               one_by_one: bool = True) -> torch.Tensor:
    """sum_j weights[t, j] * expert(ids[t, j], x[t]) in float32, back in x's dtype, with the experts chosen on
    the host: `expert(e, rows)` runs expert e on the rows of x that chose it. At one token (one_by_one) each
    chosen expert runs on it in turn; otherwise expert by expert over the tokens that chose it (one host sync
    for the group sizes). Ids outside 0..n_experts-1 contribute nothing. The CPU's packed experts
    (quant_cpu.py) share it."""
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    if one_by_one and ids.shape[0] == 1:
        for e, w in zip(ids[0].tolist(), weights[0]):
            if 0 <= e < n_experts:
                y += expert(e, x).float() * w
        return y.to(x.dtype)
    k = ids.shape[1]
    flat = torch.where(_valid(ids, n_experts), ids, n_experts).flatten()  # out of range -> a skipped last group
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=n_experts + 1)[:n_experts].tolist()
    w = weights.flatten()
    start = 0
    for e, n in enumerate(counts):
        if n:
            rows = order[start:start + n]
            tok = rows // k
            y.index_add_(0, tok, expert(e, x[tok]).float() * w[rows, None])
            start += n
    return y.to(x.dtype)


def moe_experts_loop(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, ids: torch.Tensor,
                     weights: torch.Tensor) -> torch.Tensor:
    """The reference's function with the experts chosen on the host: at one token each expert runs on
    views of the stack (no weights copied); larger batches are grouped by expert."""
    return routed_sum(x, ids, weights, w13.shape[0], lambda e, xs: expert_ffn(xs, w13[e], w2[e]))


if triton is not None:

    @triton.jit
    def _gate_up_kernel(X, W, Scale, Zero, Ids, Act, H, I, E, k, stride_xt, stride_at, row_len, n_groups,
                        PACKED: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FP8: tl.constexpr = False,
                     ROUND: tl.constexpr = tl.float32):
        """act[t*k + j, n] = silu(gate_e[n] . x[t]) * (up_e[n] . x[t]) for a block of n, e = ids[t, j]."""
        row = tl.program_id(0)  # t * k + j
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
            xv = tl.load(X + t * stride_xt + h, mask=h < H, other=0.0).to(tl.float32)
            g = expert_rows(W, Scale, Zero, e, n, nmask, h0, H, 2 * I, row_len, n_groups, PACKED, BITS, GROUP,
                            HAS_ZERO, BLOCK_K, FP8, ROUND)
            u = expert_rows(W, Scale, Zero, e, n + I, nmask, h0, H, 2 * I, row_len, n_groups, PACKED, BITS, GROUP,
                            HAS_ZERO, BLOCK_K, FP8, ROUND)
            acc_g += tl.sum(g * xv[None, :], axis=1)
            acc_u += tl.sum(u * xv[None, :], axis=1)
        act = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
        tl.store(Act + row * stride_at + n, act, mask=n < I)

    @triton.jit
    def _down_kernel(Act, W, Scale, Zero, Ids, Wts, Y, H, I, E, k, stride_at, stride_yt, row_len, n_groups,
                     PACKED: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FP8: tl.constexpr = False,
                     ROUND: tl.constexpr = tl.float32):
        """y[t*k + j, n] = w[t, j] * (down_e[n] . act[t*k + j]) for a block of output features n: one program
        per (chosen expert, block of n), so a decode step runs its experts side by side, not one after
        another (the sum over j is the caller's)."""
        row = tl.program_id(0)  # t * k + j
        nb = tl.program_id(1)
        n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        e = tl.load(Ids + row)
        ok = (e >= 0) & (e < E)
        w = tl.where(ok, tl.load(Wts + row), 0.0)
        e = tl.where(ok, e, 0)
        nmask = n < tl.where(ok, H, 0)
        part = tl.zeros([BLOCK_N], tl.float32)
        for i0 in range(0, I, BLOCK_K):
            i = i0 + tl.arange(0, BLOCK_K)
            a = tl.load(Act + row * stride_at + i, mask=i < I, other=0.0)
            wv = expert_rows(W, Scale, Zero, e, n, nmask, i0, I, H, row_len, n_groups, PACKED, BITS, GROUP,
                             HAS_ZERO, BLOCK_K, FP8, ROUND)
            part += tl.sum(wv * a[None, :], axis=1)
        tl.store(Y + row * stride_yt + n, w * part, mask=n < H)


def plain_stack(w: torch.Tensor):
    """A plain stack [E, rows, row_len] as the kernels take it: (W, Scale, Zero), row_len, n_groups, constants
    (Scale and Zero are unused: W stands in)."""
    w = w.contiguous()
    return (w, w, w), w.shape[-1], 1, dict(PACKED=False, BITS=8, GROUP=1, HAS_ZERO=False)


def run_expert_kernels(x: torch.Tensor, w13, w2, ids: torch.Tensor, weights: torch.Tensor, E: int, I: int,
                       block_n: int, block_k: int) -> torch.Tensor:
    """Both kernels on stacks as `plain_stack` gives them (or quant_moe's packed ones): gate/up + SiLU into a
    float32 buffer [T*k, I], then down with the routing weights into [T*k, H], summed over each token's k
    experts as the reference sums them. Both grids are (chosen expert, block of features): at V2-Lite's
    decode shape 6 x 44 and 6 x 64 programs, at V3's 8 x 64 and 8 x 224, for an H100's 132 SMs."""
    T, k = ids.shape
    H = x.shape[1]
    x, ids, weights = x.contiguous(), ids.contiguous(), weights.float().contiguous()
    act = torch.empty(T * k, I, device=x.device, dtype=torch.float32)
    t13, len13, g13, c13 = w13
    _gate_up_kernel[(T * k, triton.cdiv(I, block_n))](
        x, *t13, ids, act, H, I, E, k, x.stride(0), act.stride(0), len13, g13, **c13,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    y = torch.empty(T * k, H, device=x.device, dtype=torch.float32)
    t2, len2, g2, c2 = w2
    _down_kernel[(T * k, triton.cdiv(H, block_n))](
        act, *t2, ids, weights, y, H, I, E, k, act.stride(0), y.stride(0), len2, g2, **c2,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return y.view(T, k, H).sum(dim=1).to(x.dtype)


def moe_experts_triton(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, ids: torch.Tensor,
                       weights: torch.Tensor, block_n: int = BLOCK_N, block_k: int = BLOCK_K) -> torch.Tensor:
    """Same contract as moe_experts_reference; the chosen experts' rows are read in place."""
    E, H, I = w2.shape
    return run_expert_kernels(x, plain_stack(w13), plain_stack(w2), ids, weights, E, I, block_n, block_k)


def moe_experts(x, w13, w2, ids, weights):
    """Triton on CUDA for decode-sized batches, the host-chosen loop on the CPU."""
    if triton is not None and x.is_cuda:
        if ids.shape[0] <= GATHER_MAX_TOKENS:
            return moe_experts_triton(x, w13, w2, ids, weights)
        return _grouped(x, w13, w2, ids, weights)
    if cpu_bf16.stacks_fit(x, w13, w2):  # bfloat16 on the CPU: dschat's kernel, not PyTorch's generic matmul
        return moe_experts_bf16_cpu(x, w13, w2, ids, weights)
    return moe_experts_loop(x, w13, w2, ids, weights)


def moe_experts_bf16_cpu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, ids: torch.Tensor,
                         weights: torch.Tensor) -> torch.Tensor:
    """moe_experts_loop's function over bfloat16 stacks through cpu_bf16.py's kernels: one token in one call
    (its chosen experts' rows only), more tokens expert by expert."""
    if ids.shape[0] == 1:
        return cpu_bf16.experts(x, ids[0], weights[0], w13, w2)

    def expert(e, xs):
        gate, up = cpu_bf16.linear(xs, w13[e]).chunk(2, dim=-1)
        return cpu_bf16.linear(F.silu(gate) * up, w2[e])

    return routed_sum(x, ids, weights, w13.shape[0], expert)
