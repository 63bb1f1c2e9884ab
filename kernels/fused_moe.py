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
    batch-1 decode and 1+K verify shapes): gate/up + SiLU, then down with the routing weights, each tile
    through tl.dot so that Triton pipelines the weight loads. They read weights through expert_rows, so
    quant_moe runs the same kernels on packed int8/int4 stacks, and fp8_moe on block-scaled FP8 ones.
Every implementation takes the layer's shared experts too (`shared`: their gate, up and down weights), summed
with weight 1 in float32 with the routed ones: the kernels run them as one more row a token in the same two
launches (`fuses_shared` says where engine/moe.py hands them over rather than running its shared MLP).
  * `moe_experts_loop`: the host picks the experts (`.tolist()`, free on the CPU) and runs each on views of
    the stack, copying no weights: the fastest on the CPU, and never used on CUDA.
`moe_experts` picks Triton for CUDA tensors and the loop on the CPU; bfloat16 stacks on the CPU run
cpu_bf16.py's kernels (`moe_experts_bf16_cpu`, the loop's function and roundings).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu_bf16
from .triton_support import INTERPRETED, tl, triton

if triton is not None:
    from .expert_rows import expert_rows

GATHER_MAX_TOKENS = 16
# The decode kernels' tiles: vLLM's tuned H100 configuration for E=64, N=1408, M=1 (BLOCK_M 16 / N 32 / K 64,
# 4 warps, 4 stages). The kernels multiply with tl.dot (the tensor cores), so Triton software-pipelines their
# weight loads over NUM_STAGES (cp.async into shared memory: benchmarks/check_kernels.py); DOT_M is the dot's
# third side, of which a decode row uses one or two columns (the rest are zeros).
BLOCK_N, BLOCK_K, NUM_WARPS, NUM_STAGES, DOT_M = 32, 64, 4, 4, 16


def _matvec(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x [..., n] through w: one matrix [m, n] for all rows, or one matrix per row [N, m, n]."""
    return F.linear(x, w) if w.dim() == 2 else torch.bmm(w, x[..., None])[..., 0]


def expert_ffn(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """down(silu(gate x) * up x): one expert on its tokens, or one gathered expert per token."""
    gate, up = _matvec(w13, x).chunk(2, dim=-1)
    return _matvec(w2, F.silu(gate) * up)


def shared_ffn(x: torch.Tensor, shared) -> torch.Tensor | None:
    """The shared experts' SwiGLU on x, shared = (gate [I_s, H], up [I_s, H], down [H, I_s]) (None: none)."""
    if shared is None:
        return None
    gate, up, down = shared
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def _valid(ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    return (ids >= 0) & (ids < n_experts)


def moe_experts_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, ids: torch.Tensor,
                          weights: torch.Tensor, shared=None) -> torch.Tensor:
    """x [T,H], w13 [E,2I,H], w2 [E,H,I], ids [T,k] int64, weights [T,k] float32 -> [T,H] in x's dtype.
    shared: the shared experts' (gate, up, down) weights, whose output joins the float32 sum (weight 1)."""
    T, k = ids.shape
    if T > GATHER_MAX_TOKENS:
        return _grouped(x, w13, w2, ids, weights, shared)
    E = w13.shape[0]
    valid = _valid(ids, E)
    chosen = ids.clamp(0, E - 1).flatten()
    out = expert_ffn(x.repeat_interleave(k, dim=0), w13[chosen], w2[chosen])  # [T*k, H]
    w = torch.where(valid, weights, torch.zeros_like(weights)).flatten()
    y = (out.float() * w[:, None]).view(T, k, -1).sum(dim=1)
    if shared is not None:
        y = y + shared_ffn(x, shared).float()
    return y.to(x.dtype)


def _grouped(x, w13, w2, ids, weights, shared=None) -> torch.Tensor:
    return routed_sum(x, ids, weights, w13.shape[0], lambda e, xs: expert_ffn(xs, w13[e], w2[e]), one_by_one=False,
                      shared_out=shared_ffn(x, shared))


def routed_sum(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, n_experts: int, expert,
               one_by_one: bool = True, shared_out: torch.Tensor | None = None) -> torch.Tensor:
    """sum_j weights[t, j] * expert(ids[t, j], x[t]) in float32, back in x's dtype, with the experts chosen on
    the host: `expert(e, rows)` runs expert e on the rows of x that chose it. At one token (one_by_one) each
    chosen expert runs on it in turn; otherwise expert by expert over the tokens that chose it (one host sync
    for the group sizes). Ids outside 0..n_experts-1 contribute nothing. `shared_out` (the shared experts'
    output) begins the sum. The CPU's packed experts (quant_cpu.py) share it."""
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device) if shared_out is None else shared_out.float()
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
                     weights: torch.Tensor, shared=None) -> torch.Tensor:
    """The reference's function with the experts chosen on the host: at one token each expert runs on
    views of the stack (no weights copied); larger batches are grouped by expert."""
    return routed_sum(x, ids, weights, w13.shape[0], lambda e, xs: expert_ffn(xs, w13[e], w2[e]),
                      shared_out=shared_ffn(x, shared))


if triton is not None:

    @triton.jit
    def _gate_up_kernel(X, W, Scale, Zero, SG, SGScale, SGZero, SU, SUScale, SUZero, Ids, Act, H, I, I_s, E, k, kk,
                        stride_xt, stride_at, row_len, n_groups,
                        PACKED: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FP8: tl.constexpr = False,
                        ROUND: tl.constexpr = tl.float32, OPERAND: tl.constexpr = tl.float32,
                        DOT: tl.constexpr = tl.float32, DOT_M: tl.constexpr = 16):
        """act[t*kk + j, n] = silu(gate[n] . x[t]) * (up[n] . x[t]) for a block of n: for j < k routed expert
        e = ids[t, j] (its rows of the stack W), for j = k (kk = k + 1) the shared experts (SG, SU: a stack of
        one, I_s rows). Each tile goes through tl.dot against x[t] as the first column of a [BLOCK_K, DOT_M]
        operand (the others zero), so Triton pipelines the weight loads."""
        row = tl.program_id(0)  # t * kk + j
        nb = tl.program_id(1)
        t = row // kk
        j = row % kk
        shared = j >= k
        width = tl.where(shared, I_s, I)
        if nb * BLOCK_N >= width:  # the shared experts may be wider than a routed one, or narrower
            return
        e = tl.load(Ids + t * k + j, mask=j < k, other=0)
        ok = shared | ((e >= 0) & (e < E))
        e = tl.where(ok & (j < k), e, 0)
        n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < tl.where(ok, width, 0)  # an expert of another rank reads nothing
        Wg = tl.where(shared, SG, W)
        Sg = tl.where(shared, SGScale, Scale)
        Zg = tl.where(shared, SGZero, Zero)
        Wu = tl.where(shared, SU, W)
        Su = tl.where(shared, SUScale, Scale)
        Zu = tl.where(shared, SUZero, Zero)
        up = tl.where(shared, n, n + I)  # a routed expert's up rows follow its gate rows
        c = tl.arange(0, DOT_M)
        acc_g = tl.zeros([BLOCK_N, DOT_M], tl.float32)
        acc_u = tl.zeros([BLOCK_N, DOT_M], tl.float32)
        for h0 in range(0, H, BLOCK_K):
            h = h0 + tl.arange(0, BLOCK_K)
            xt = tl.load(X + t * stride_xt + h[:, None] + 0 * c[None, :],
                         mask=(h[:, None] < H) & (c[None, :] == 0), other=0.0).to(OPERAND).to(DOT)
            g = expert_rows(Wg, Sg, Zg, e, n, nmask, h0, H, 2 * I, row_len, n_groups, PACKED, BITS, GROUP,
                            HAS_ZERO, BLOCK_K, FP8, ROUND)
            u = expert_rows(Wu, Su, Zu, e, up, nmask, h0, H, 2 * I, row_len, n_groups, PACKED, BITS, GROUP,
                            HAS_ZERO, BLOCK_K, FP8, ROUND)
            acc_g = tl.dot(g.to(OPERAND).to(DOT), xt, acc_g, input_precision="ieee")
            acc_u = tl.dot(u.to(OPERAND).to(DOT), xt, acc_u, input_precision="ieee")
        gate = tl.sum(acc_g, axis=1)  # the other columns are exact zeros
        act = gate / (1.0 + tl.exp(-gate)) * tl.sum(acc_u, axis=1)
        tl.store(Act + row * stride_at + n, act, mask=n < width)

    @triton.jit
    def _down_kernel(Act, W, Scale, Zero, SD, SDScale, SDZero, Ids, Wts, Y, Out, Count, H, I, I_s, E, k, kk,
                     stride_at, stride_yt, stride_ot, n_blocks, row_len, n_groups, row_len_s, n_groups_s,
                     PACKED: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FP8: tl.constexpr = False,
                     ROUND: tl.constexpr = tl.float32, OPERAND: tl.constexpr = tl.float32,
                     DOT: tl.constexpr = tl.float32, DOT_M: tl.constexpr = 16):
        """y[t*kk + j, n] = w[t, j] * (down_e[n] . act[t*kk + j]) for a block of output features n, and for
        j = k the shared experts' down (SD, I_s columns) with weight 1: one program per (chosen expert, block
        of n), so a decode step runs its experts side by side. The float32 activation enters tl.dot as two
        columns, its OPERAND rounding and the remainder (exact to ~2^-16). The token's kk rows of a block of n
        are summed by the last of their programs to finish (a counter a block, Count, back at 0 after it):
        in order j = 0..kk-1 in float32 from Y, rounded once into Out [T, H] (x's dtype), as the reference
        sums them, with no sum or cast launched after the kernel.
        OPERAND: the type tl.dot's operands are rounded to; DOT: the type they are given in (OPERAND, but
        float32 in Triton's interpreter)."""
        row = tl.program_id(0)  # t * kk + j
        nb = tl.program_id(1)
        t = row // kk
        j = row % kk
        shared = j >= k
        width = tl.where(shared, I_s, I)
        n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        e = tl.load(Ids + t * k + j, mask=j < k, other=0)
        ok = shared | ((e >= 0) & (e < E))
        w = tl.where(shared, 1.0, tl.where(ok, tl.load(Wts + t * k + j, mask=j < k, other=0.0), 0.0))
        e = tl.where(ok & (j < k), e, 0)
        nmask = n < tl.where(ok, H, 0)
        Wd = tl.where(shared, SD, W)
        Sd = tl.where(shared, SDScale, Scale)
        Zd = tl.where(shared, SDZero, Zero)
        rl = tl.where(shared, row_len_s, row_len)
        ng = tl.where(shared, n_groups_s, n_groups)
        c = tl.arange(0, DOT_M)
        acc = tl.zeros([BLOCK_N, DOT_M], tl.float32)
        for i0 in range(0, width, BLOCK_K):
            i = i0 + tl.arange(0, BLOCK_K)
            a = tl.load(Act + row * stride_at + i, mask=i < width, other=0.0)
            hi = a.to(OPERAND)
            lo = (a - hi.to(tl.float32)).to(OPERAND)
            b = tl.where(c[None, :] == 0, hi[:, None], tl.where(c[None, :] == 1, lo[:, None], 0.0))
            b = b.to(OPERAND).to(DOT)
            wv = expert_rows(Wd, Sd, Zd, e, n, nmask, i0, width, H, rl, ng, PACKED, BITS, GROUP,
                             HAS_ZERO, BLOCK_K, FP8, ROUND)
            acc = tl.dot(wv.to(OPERAND).to(DOT), b, acc, input_precision="ieee")
        tl.store(Y + row * stride_yt + n, w * tl.sum(acc, axis=1), mask=n < H)
        tl.debug_barrier()  # every thread's part stored before the block's arrival is counted (release)
        slot = Count + t * n_blocks + nb
        if tl.atomic_add(slot, 1, sem="acq_rel", scope="gpu") == kk - 1:  # the last of the token's rows
            total = tl.zeros([BLOCK_N], tl.float32)
            for jj in range(0, kk):
                total += tl.load(Y + (t * kk + jj) * stride_yt + n, mask=n < H, other=0.0, cache_modifier=".cg")
            tl.store(Out + t * stride_ot + n, total.to(Out.dtype.element_ty), mask=n < H)
            tl.atomic_xchg(slot, 0, sem="relaxed", scope="gpu")  # ready for the next launch


def plain_stack(w: torch.Tensor):
    """A plain stack [E, rows, row_len] (or one matrix [rows, row_len]) as the kernels take it: (W, Scale,
    Zero), row_len, n_groups, constants (Scale and Zero are unused: W stands in)."""
    w = w.contiguous()
    return (w, w, w), w.shape[-1], 1, dict(PACKED=False, BITS=8, GROUP=1, HAS_ZERO=False)


TL_DTYPES = {} if triton is None else {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16,
                                        torch.float16: tl.float16}


def _dot_dtype(x: torch.Tensor, stack) -> torch.dtype:
    """tl.dot's operand type: x's dtype (a bfloat16 model's products are exact in float32; packed and FP8 weights
    are rounded to it as their references round them), float32 where x or a plain stack is float32."""
    (w, _, _), _, _, c = stack
    if x.dtype == torch.float32 or (not c["PACKED"] and not c.get("FP8") and w.dtype == torch.float32):
        return torch.float32
    return x.dtype


_ARRIVALS: dict[tuple[str, int], torch.Tensor] = {}


def arrivals(device: torch.device, n: int) -> torch.Tensor:
    """The down kernel's counters (int32 zeros), one a (token, block of features): made once per device and
    size and kept (never freed nor regrown: a captured CUDA graph holds their address); the kernel leaves
    them at zero. One stream: two launches of the same size on different streams at once would share them
    (the engine decodes on one stream)."""
    key = (str(device), n)
    if key not in _ARRIVALS:
        _ARRIVALS[key] = torch.zeros(n, dtype=torch.int32, device=device)
    return _ARRIVALS[key]


def run_expert_kernels(x: torch.Tensor, w13, w2, ids: torch.Tensor, weights: torch.Tensor, E: int, I: int,
                       block_n: int, block_k: int, shared=None) -> torch.Tensor:
    """Both kernels on stacks as `plain_stack` gives them (or quant_moe's packed ones, fp8_moe's FP8 ones):
    gate/up + SiLU into a float32 buffer [T*kk, max(I, I_s)], then down with the routing weights into
    [T*kk, H], summed over each token's kk rows as the reference sums them, inside the down kernel (the
    last program of a block of features) into [T, H] in x's dtype: two launches, nothing after them.
    `shared`: (gate, up, down) stacks
    of the same kind, each one matrix, and their width I_s: the shared experts as one more row a token
    (kk = k + 1) with weight 1. Both grids are (chosen expert, block of features): at V2-Lite's decode shape
    7 x 88 and 7 x 64 programs (those past a row's width return at once), at V3's 9 x 64 and 9 x 224, for an
    H100's 132 SMs."""
    T, k = ids.shape
    H = x.shape[1]
    x, ids, weights = x.contiguous(), ids.contiguous(), weights.float().contiguous()
    t13, len13, g13, c13 = w13
    t2, len2, g2, c2 = w2
    if shared is None:
        kk, I_s, sg, su, sd, len_s, g_s = k, 0, t13, t13, t2, len2, g2
    else:
        (sg, lg, gg, cg), (su, lu, gu, cu), (sd, len_s, g_s, cd), I_s = shared
        assert cg == cu == c13 and cd == c2 and (lg, gg) == (lu, gu) == (len13, g13), \
            "the shared experts must be stored as the routed ones are"
        kk = k + 1
    operand = TL_DTYPES[_dot_dtype(x, w13)]
    dot = tl.float32 if INTERPRETED else operand
    act = torch.empty(T * kk, max(I, I_s), device=x.device, dtype=torch.float32)
    _gate_up_kernel[(T * kk, triton.cdiv(max(I, I_s), block_n))](
        x, *t13, *sg, *su, ids, act, H, I, I_s, E, k, kk, x.stride(0), act.stride(0), len13, g13, **c13,
        BLOCK_N=block_n, BLOCK_K=block_k, OPERAND=operand, DOT=dot, DOT_M=DOT_M, num_warps=NUM_WARPS,
        num_stages=NUM_STAGES)
    y = torch.empty(T * kk, H, device=x.device, dtype=torch.float32)
    out = torch.empty(T, H, device=x.device, dtype=x.dtype)
    n_blocks = triton.cdiv(H, block_n)
    _down_kernel[(T * kk, n_blocks)](
        act, *t2, *sd, ids, weights, y, out, arrivals(x.device, max(T, GATHER_MAX_TOKENS) * n_blocks), H, I, I_s,
        E, k, kk, act.stride(0), y.stride(0), out.stride(0), n_blocks, len2, g2, len_s, g_s, **c2,
        BLOCK_N=block_n, BLOCK_K=block_k, OPERAND=operand, DOT=dot, DOT_M=DOT_M, num_warps=NUM_WARPS,
        num_stages=NUM_STAGES)
    return out


def moe_experts_triton(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, ids: torch.Tensor,
                       weights: torch.Tensor, block_n: int = BLOCK_N, block_k: int = BLOCK_K,
                       shared=None) -> torch.Tensor:
    """Same contract as moe_experts_reference; the chosen experts' rows (and the shared experts') are read in
    place."""
    E, H, I = w2.shape
    sh = None if shared is None else (*map(plain_stack, shared), shared[0].shape[0])
    return run_expert_kernels(x, plain_stack(w13), plain_stack(w2), ids, weights, E, I, block_n, block_k, sh)


def fuses_shared(x: torch.Tensor, ids: torch.Tensor) -> bool:
    """Whether moe_experts (and the quantized and FP8 ones) run the shared experts inside their kernels here:
    the Triton decode path (CUDA, decode-sized batches). Elsewhere the caller runs them itself (engine/moe.py),
    on its own faster CPU kernels."""
    return triton is not None and x.is_cuda and ids.shape[0] <= GATHER_MAX_TOKENS


def moe_experts(x, w13, w2, ids, weights, shared=None):
    """Triton on CUDA for decode-sized batches, the host-chosen loop on the CPU. shared: the shared experts'
    (gate, up, down) weights, added with weight 1 (inside the kernels on the Triton path); None or []: none."""
    shared = shared or None
    if triton is not None and x.is_cuda:
        if ids.shape[0] <= GATHER_MAX_TOKENS:
            return moe_experts_triton(x, w13, w2, ids, weights, shared=shared)
        return _grouped(x, w13, w2, ids, weights, shared)
    if shared is None and cpu_bf16.stacks_fit(x, w13, w2):  # bf16 on the CPU: dschat's kernel, not PyTorch's
        return moe_experts_bf16_cpu(x, w13, w2, ids, weights)
    return moe_experts_loop(x, w13, w2, ids, weights, shared)


def moe_experts_bf16_cpu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, ids: torch.Tensor,
                         weights: torch.Tensor) -> torch.Tensor:
    """moe_experts_loop's function over bfloat16 stacks through cpu_bf16.py's kernels: one token in one call
    (its chosen experts' rows only), more tokens expert by expert (PyTorch's matmul for an expert's many tokens
    where cpu_bf16.torch_gemm says it is the faster)."""
    if ids.shape[0] == 1:
        return cpu_bf16.experts(x, ids[0], weights[0], w13, w2)

    def expert(e, xs):
        gate, up = cpu_bf16.linear_or_torch(xs, w13[e]).chunk(2, dim=-1)
        return cpu_bf16.linear_or_torch(F.silu(gate) * up, w2[e])

    return routed_sum(x, ids, weights, w13.shape[0], expert)
