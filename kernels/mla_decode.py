"""Absorbed MLA attention over a paged latent cache: the decode step of DeepSeek's attention.

    o_lat[s, h] = softmax_t(scale * (q_lat[s, h] . c_kv[t] + q_pe[s, h] . k_pe[t])) . c_kv[t]

over the keys t = 0..q_pos[s] of one sequence, whose cache rows ([c_kv | k_pe], kv_lora_rank +
qk_rope_head_dim values each) live at flat slots `slots[t]` of a paged buffer. Implementations of the same
function: `mla_decode_reference` (PyTorch: gather the rows, then attend), `mla_decode_triton` (reads the rows
in place, flash-decoding: the keys are split over programs, each keeps a running max and sum, and a second
kernel merges the splits) and `mla_decode_bf16_cpu` (the reference's gather, its products through
cpu_bf16's kernel). `mla_decode` picks Triton for CUDA tensors, the bf16 one for bfloat16 on the CPU at a few
queries (`bf16_cpu_takes`: from 5, where the CPU multiplies bfloat16, PyTorch's products are faster). (The
CPU's lean float32 step has its own: cpu_gemv.mla_attend, the rows read in place.)
"""

from __future__ import annotations

import torch

from . import cpu_bf16
from .triton_support import sm_count, tl, triton

BLOCK_H = 16  # heads a program: tl.dot's smallest tile; at 64 V3's 128 heads spilled 7.5 KB a thread
BLOCK_T = 32  # keys a step
MERGE_SPLITS = 8  # splits the merge kernel reads a step (8 x kv_lora_rank 512 floats in registers)


def mla_decode_reference(q_lat: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor,
                         q_pos: torch.Tensor, scale: float) -> torch.Tensor:
    """q_lat [S,H,R], q_pe [S,H,P], cache [N, R+P], slots [T], q_pos [S] -> o_lat [S,H,R] (q_lat's dtype).
    Scores and softmax in float32."""
    R = q_lat.shape[-1]
    rows = cache[slots]  # [T, R+P]
    kv, pe = rows[:, :R], rows[:, R:]
    scores = torch.einsum("shc,tc->sht", q_lat, kv) + torch.einsum("shd,td->sht", q_pe, pe)
    p = attention_probs(scores, q_pos, scale, kv.dtype)
    return torch.einsum("sht,tc->shc", p, kv).to(q_lat.dtype)


def attention_probs(scores: torch.Tensor, q_pos: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """scores [S, H, T] -> softmax over the keys each query sees (t <= q_pos[s]), in float32, as `dtype`."""
    scores = scores.float() * scale
    visible = torch.arange(scores.shape[-1], device=scores.device)[None, :] <= q_pos[:, None]
    scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    return scores.softmax(dim=-1).to(dtype)


def mla_decode_bf16_cpu(q_lat: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor,
                        q_pos: torch.Tensor, scale: float) -> torch.Tensor:
    """mla_decode_reference's function for bfloat16 on the CPU (`bf16_cpu_takes`): the same gather of the rows,
    then its three products through cpu_bf16's batched kernel, one batch entry a head (the gathered rows shared
    by every head, not copied for each), the softmax as the reference's (`attention_probs`). Each product is
    rounded to bfloat16 once, as PyTorch's bfloat16 einsum rounds its float32 sums, so this is the reference up
    to float32 summation order; PyTorch's bfloat16 bmm for these shapes (one query, ~100-1000 keys) ran at ~4
    GFLOP/s, a twelfth of a decode step's time."""
    S, H, R = q_lat.shape
    P = q_pe.shape[-1]
    rows = cache[slots]  # [T, R+P]
    T = rows.shape[0]
    kv, pe = rows[:, :R], rows[:, R:]
    scores = q_lat.new_empty(H, S, T)
    cpu_bf16.bmm(q_lat.transpose(0, 1), kv.expand(H, T, R), True, out=scores)
    scores_pe = q_lat.new_empty(H, S, T)
    cpu_bf16.bmm(q_pe.transpose(0, 1), pe.expand(H, T, P), True, out=scores_pe)
    p = attention_probs((scores + scores_pe).transpose(0, 1), q_pos, scale, kv.dtype)  # [S, H, T]
    out = q_lat.new_empty(S, H, R)
    cpu_bf16.bmm(p.transpose(0, 1), kv.expand(H, T, R), False, out=out.transpose(0, 1))
    return out


def bf16_cpu_takes(q_lat: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor) -> bool:
    """Whether mla_decode_bf16_cpu runs: bfloat16 on the CPU where cpu_bf16's kernels are built, the last
    dimension of each contiguous, not inside torch.compile's tracing (a ctypes call is no operator), and a few
    queries where the CPU multiplies bfloat16 itself (from cpu_bf16.TORCH_MIN_ROWS, a follow-up turn's prefill,
    PyTorch's own products run the reference: `cpu_bf16.torch_rows`)."""
    return (q_lat.dtype == q_pe.dtype == cache.dtype == torch.bfloat16 and q_lat.device.type == "cpu"
            and q_lat.stride(-1) == 1 and q_pe.stride(-1) == 1 and cache.stride(-1) == 1
            and not torch.compiler.is_compiling() and cpu_bf16.available()
            and not cpu_bf16.torch_rows(q_lat.shape[0]))


if triton is not None:

    @triton.jit
    def _mla_split_kernel(Q_lat, Q_pe, Cache, Slots, Q_pos, O, M, L,
                          T, H, R, P, keys_per_split, scale,
                          stride_qs, stride_qh, stride_ps, stride_ph, stride_cn,
                          stride_os, stride_osplit, stride_oh, stride_ms, stride_msplit,
                          BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_P: tl.constexpr, PRECISION: tl.constexpr):
        s = tl.program_id(0)
        hb = tl.program_id(1)
        split = tl.program_id(2)
        heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        hmask = heads < H
        r = tl.arange(0, BLOCK_R)
        p = tl.arange(0, BLOCK_P)
        q = tl.load(Q_lat + s * stride_qs + heads[:, None] * stride_qh + r[None, :],
                    mask=hmask[:, None] & (r[None, :] < R), other=0.0)
        qp = tl.load(Q_pe + s * stride_ps + heads[:, None] * stride_ph + p[None, :],
                     mask=hmask[:, None] & (p[None, :] < P), other=0.0)
        last = tl.load(Q_pos + s)  # keys 0..last are visible
        start = split * keys_per_split
        end = tl.minimum(tl.minimum(start + keys_per_split, T), last + 1)
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)
        for t0 in range(start, end, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            tmask = t < end
            slot = tl.load(Slots + t, mask=tmask, other=0)
            kv = tl.load(Cache + slot[:, None] * stride_cn + r[None, :],
                         mask=tmask[:, None] & (r[None, :] < R), other=0.0)
            pe = tl.load(Cache + slot[:, None] * stride_cn + R + p[None, :],
                         mask=tmask[:, None] & (p[None, :] < P), other=0.0)
            scores = tl.dot(q, tl.trans(kv), input_precision=PRECISION) + \
                tl.dot(qp, tl.trans(pe), input_precision=PRECISION)
            scores = scores * scale
            scores = tl.where(tmask[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            alpha = tl.exp(m_i - m_new)
            probs = tl.exp(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(probs, axis=1)
            acc = acc * alpha[:, None] + tl.dot(probs.to(kv.dtype), kv, input_precision=PRECISION)
            m_i = m_new
        out = O + s * stride_os + split * stride_osplit + heads[:, None] * stride_oh + r[None, :]
        tl.store(out, acc, mask=hmask[:, None] & (r[None, :] < R))
        tl.store(M + s * stride_ms + split * stride_msplit + heads, m_i, mask=hmask)
        tl.store(L + s * stride_ms + split * stride_msplit + heads, l_i, mask=hmask)


    @triton.jit
    def _mla_merge_kernel(O, M, L, Out, n_split, R, stride_os, stride_osplit, stride_oh, stride_ms, stride_msplit,
                          stride_outs, stride_outh, BLOCK_SPLIT: tl.constexpr, BLOCK_R: tl.constexpr):
        """Merge the splits of one (query, head): each holds an unnormalised sum with its own running max and
        sum; a split with no visible keys (max -inf) weighs 0."""
        s = tl.program_id(0)
        h = tl.program_id(1)
        base_m = M + s * stride_ms + h
        m_all = float("-inf")
        for c in range(0, n_split, BLOCK_SPLIT):
            sp = c + tl.arange(0, BLOCK_SPLIT)
            m = tl.load(base_m + sp * stride_msplit, mask=sp < n_split, other=float("-inf"))
            m_all = tl.maximum(m_all, tl.max(m, axis=0))
        r = tl.arange(0, BLOCK_R)
        num = tl.zeros([BLOCK_R], tl.float32)
        den = tl.zeros([BLOCK_SPLIT], tl.float32)
        for c in range(0, n_split, BLOCK_SPLIT):
            sp = c + tl.arange(0, BLOCK_SPLIT)
            ok = sp < n_split
            m = tl.load(base_m + sp * stride_msplit, mask=ok, other=float("-inf"))
            lse = tl.load(L + s * stride_ms + h + sp * stride_msplit, mask=ok, other=0.0)
            w = tl.where(m > float("-inf"), tl.exp(m - m_all), 0.0)
            o = tl.load(O + s * stride_os + sp[:, None] * stride_osplit + h * stride_oh + r[None, :],
                        mask=ok[:, None] & (r[None, :] < R), other=0.0)
            num += tl.sum(o * w[:, None], axis=0)
            den += lse * w
        out = num / tl.sum(den, axis=0)
        tl.store(Out + s * stride_outs + h * stride_outh + r, out.to(Out.dtype.element_ty), mask=r < R)


def mla_decode_triton(q_lat: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor,
                      q_pos: torch.Tensor, scale: float, keys_per_split: int | None = None) -> torch.Tensor:
    """Same contract as mla_decode_reference; the cache rows are read through `slots` in place."""
    S, H, R = q_lat.shape
    P = q_pe.shape[-1]
    T = slots.numel()
    q_lat, q_pe = q_lat.contiguous(), q_pe.contiguous()
    head_blocks = triton.cdiv(H, BLOCK_H)
    if keys_per_split is None:  # splits enough for a program per SM (a step of keys each at least)
        want = triton.cdiv(sm_count(q_lat.device), S * head_blocks)
        keys_per_split = max(BLOCK_T, triton.cdiv(T, want) // BLOCK_T * BLOCK_T)
    n_split = triton.cdiv(T, keys_per_split)
    o = torch.empty(S, n_split, H, R, device=q_lat.device, dtype=torch.float32)
    m = torch.empty(S, n_split, H, device=q_lat.device, dtype=torch.float32)
    lse = torch.empty_like(m)
    grid = (S, head_blocks, n_split)
    _mla_split_kernel[grid](
        q_lat, q_pe, cache, slots, q_pos, o, m, lse, T, H, R, P, keys_per_split, scale,
        q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1), cache.stride(0),
        o.stride(0), o.stride(1), o.stride(2), m.stride(0), m.stride(1),
        BLOCK_H=BLOCK_H, BLOCK_T=BLOCK_T, BLOCK_R=triton.next_power_of_2(R), BLOCK_P=triton.next_power_of_2(P),
        # float32 stays float32 (no TF32 rounding): the exactness tests run the engine in float32
        PRECISION="ieee" if cache.dtype == torch.float32 else "tf32")
    out = torch.empty(S, H, R, device=q_lat.device, dtype=q_lat.dtype)
    _mla_merge_kernel[(S, H)](o, m, lse, out, n_split, R, o.stride(0), o.stride(1), o.stride(2), m.stride(0),
                              m.stride(1), out.stride(0), out.stride(1), BLOCK_SPLIT=MERGE_SPLITS,
                              BLOCK_R=triton.next_power_of_2(R), num_warps=4)
    return out


def paged_slots(page_table: torch.Tensor, page_size: int, n: int | None = None) -> torch.Tensor:
    """Flat cache slots of positions 0..n-1 (every position the table can hold when n is None)."""
    pages = page_table if n is None else page_table[: -(-n // page_size)]
    slots = (pages[:, None] * page_size + torch.arange(page_size, device=pages.device)[None, :]).flatten()
    return slots if n is None else slots[:n]


def mla_decode_paged(q_lat, q_pe, cache, table_slots, q_pos, scale: float):
    """The static decode step's attention: mla_decode over the keys 0..max(q_pos) of a sequence whose rows lie
    at `table_slots` (`paged_slots` of its fixed-size page table: slots past its length are never read).
    Every shape is the same at every token: on CUDA the Triton kernel's grid covers the whole table (its
    programs stop at q_pos); on the CPU the length is read on the host (free there) and only its keys are
    gathered."""
    if triton is not None and q_lat.is_cuda:
        return mla_decode_triton(q_lat, q_pe, cache, table_slots, q_pos, scale)
    n = int(q_pos.max()) + 1
    return mla_decode(q_lat, q_pe, cache, table_slots[:n], q_pos, scale)


def mla_decode(q_lat, q_pe, cache, slots, q_pos, scale):
    """Triton on CUDA, cpu_bf16's kernels for bfloat16 on the CPU where `bf16_cpu_takes`, the PyTorch reference
    elsewhere."""
    if triton is not None and q_lat.is_cuda:
        return mla_decode_triton(q_lat, q_pe, cache, slots, q_pos, scale)
    if bf16_cpu_takes(q_lat, q_pe, cache):
        return mla_decode_bf16_cpu(q_lat, q_pe, cache, slots, q_pos, scale)
    return mla_decode_reference(q_lat, q_pe, cache, slots, q_pos, scale)
