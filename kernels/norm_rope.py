"""RMSNorm fused with the residual add, and RoPE fused with the latent-cache write: the elementwise work of a
decoder layer in two kernels instead of ~35 PyTorch operations (issue 21: a batch-1 decode step on a GPU is
bound by its launches).

    add_rms_norm(x, residual, w, eps) -> (x + residual, w * rmsnorm(x + residual))   one launch
    rms_norm(x, w, eps)               -> w * rmsnorm(x)                               one launch
    rope_latent_write(q_pe, kv, w, eps, cos, sin, cache, slots) -> rope(q_pe)          one launch
        and, as a side effect, cache[slots] = [rmsnorm(kv[:, :r]) * w | rope(kv[:, r:])]
    silu_mul(gate, up)                -> silu(gate) * up (the SwiGLU MLPs' middle)       one launch

RMSNorm is DeepSeek's: the mean of squares in float32, the normalised row cast back to x's dtype, then
multiplied by the weight (w * h.to(x.dtype)). RoPE rotates interleaved pairs (x0, x1) of the last dimension
in float32: (x0 cos - x1 sin, x1 cos + x0 sin). The `*_reference` functions are the engine's own code for
them (the CPU runs them, in the order of operations transformers uses, so greedy tokens stay equal); the
Triton kernels compute the same in one pass. The dispatchers pick Triton for CUDA tensors that need no
gradient (training runs the references, which autograd differentiates).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .triton_support import tl, triton


# -- references -------------------------------------------------------------------------------------------
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps), the mean taken in float32, the row cast back before the weight."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual, rms_norm(x + residual))."""
    x = x + residual
    return x, rms_norm_reference(x, weight, eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... of the last dimension by the angles whose cos/sin are
    given (shaped to broadcast against x's pairs), in float32, back in x's dtype."""
    dtype = x.dtype
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)
    return out.flatten(-2).to(dtype)


def rope_latent_write_reference(q_pe: torch.Tensor, kv: torch.Tensor, weight: torch.Tensor, eps: float,
                                cos: torch.Tensor, sin: torch.Tensor, cache: torch.Tensor,
                                slots: torch.Tensor) -> torch.Tensor:
    """q_pe [S,H,dr] (a view is fine), kv [S, r+dr] (kv_a_proj's output: latent, then k_pe), weight [r]
    (kv_a_layernorm's), cos/sin [S, dr/2], cache [N, r+dr], slots [S] -> q_pe rotated [S,H,dr]; writes the S
    latent rows [rms_norm(latent) | rope(k_pe)] at cache[slots] in the cache's dtype."""
    r = weight.shape[0]
    q_rot = apply_rope(q_pe, cos[:, None], sin[:, None])
    latent, k_pe = kv.split([r, kv.shape[-1] - r], dim=-1)
    cache[slots] = torch.cat([rms_norm_reference(latent, weight, eps), apply_rope(k_pe, cos, sin)],
                             dim=-1).to(cache.dtype)
    return q_rot


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


# -- Triton -----------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _add_rms_norm_kernel(X, Res, W, Sum, Y, D, eps, stride_x, stride_r, stride_s, stride_y,
                             HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
        """One row: (x + res) stored in Sum (x's dtype), then w * rmsnorm(x + res) in Y."""
        row = tl.program_id(0)
        d = tl.arange(0, BLOCK)
        mask = d < D
        x = tl.load(X + row * stride_x + d, mask=mask, other=0.0)
        if HAS_RES:
            res = tl.load(Res + row * stride_r + d, mask=mask, other=0.0)
            x = (x.to(tl.float32) + res.to(tl.float32)).to(X.dtype.element_ty)  # as torch adds: round once
            tl.store(Sum + row * stride_s + d, x, mask=mask)
        h = x.to(tl.float32)
        var = tl.sum(h * h, axis=0) / D
        h = (h * tl.rsqrt(var + eps)).to(X.dtype.element_ty).to(tl.float32)
        w = tl.load(W + d, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * stride_y + d, (w * h).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_latent_kernel(Q, QO, KV, W, Cos, Sin, Cache, Slots, H, R, HALF, eps,
                            stride_qs, stride_qh, stride_os, stride_oh, stride_kv, stride_cs, stride_c,
                            BLOCK_R: tl.constexpr, BLOCK_HALF: tl.constexpr):
        """Programs (s, 0..H-1): rotate query head h of token s into QO. Program (s, H): token s's latent row,
        normalised and its k_pe rotated, written at cache row Slots[s]."""
        s = tl.program_id(0)
        h = tl.program_id(1)
        i = tl.arange(0, BLOCK_HALF)
        imask = i < HALF
        c = tl.load(Cos + s * stride_cs + i, mask=imask, other=0.0).to(tl.float32)
        sn = tl.load(Sin + s * stride_cs + i, mask=imask, other=0.0).to(tl.float32)
        if h < H:
            src = Q + s * stride_qs + h * stride_qh + 2 * i
            x0 = tl.load(src, mask=imask, other=0.0).to(tl.float32)
            x1 = tl.load(src + 1, mask=imask, other=0.0).to(tl.float32)
            dst = QO + s * stride_os + h * stride_oh + 2 * i
            tl.store(dst, (x0 * c - x1 * sn).to(QO.dtype.element_ty), mask=imask)
            tl.store(dst + 1, (x1 * c + x0 * sn).to(QO.dtype.element_ty), mask=imask)
        else:
            slot = tl.load(Slots + s)
            row = Cache + slot * stride_c
            d = tl.arange(0, BLOCK_R)
            dmask = d < R
            x = tl.load(KV + s * stride_kv + d, mask=dmask, other=0.0)
            v = x.to(tl.float32)
            var = tl.sum(v * v, axis=0) / R
            v = (v * tl.rsqrt(var + eps)).to(KV.dtype.element_ty).to(tl.float32)
            w = tl.load(W + d, mask=dmask, other=0.0).to(tl.float32)
            # the normalised latent in kv's dtype (w * h.to(kv.dtype)), then the cache's
            tl.store(row + d, (w * v).to(KV.dtype.element_ty).to(Cache.dtype.element_ty), mask=dmask)
            src = KV + s * stride_kv + R + 2 * i
            x0 = tl.load(src, mask=imask, other=0.0).to(tl.float32)
            x1 = tl.load(src + 1, mask=imask, other=0.0).to(tl.float32)
            tl.store(row + R + 2 * i, (x0 * c - x1 * sn).to(KV.dtype.element_ty).to(Cache.dtype.element_ty),
                     mask=imask)
            tl.store(row + R + 2 * i + 1,
                     (x1 * c + x0 * sn).to(KV.dtype.element_ty).to(Cache.dtype.element_ty), mask=imask)


def out_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The norm's result dtype, weight * x's (torch.promote_types only where they differ: it is a dispatched
    operator of its own)."""
    return x.dtype if x.dtype == weight.dtype else torch.promote_types(x.dtype, weight.dtype)


if triton is not None:

    @triton.jit
    def _silu_mul_kernel(G, U, Out, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n
        g = tl.load(G + i, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + i, mask=mask, other=0.0).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(Out.dtype.element_ty).to(tl.float32)  # silu rounds, then the product
        tl.store(Out + i, (s * u).to(Out.dtype.element_ty), mask=mask)


SILU_BLOCK = 1024


def silu_mul_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    n = gate.numel()
    _silu_mul_kernel[(triton.cdiv(n, SILU_BLOCK),)](gate, up, out, n, BLOCK=SILU_BLOCK, num_warps=4)
    return out


def _rows(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def _norm_warps(D: int) -> int:
    return 4 if D <= 2048 else 8


def add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(x + residual or None without one, rms_norm of it) in one launch, one program a row."""
    D = x.shape[-1]
    xs = _rows(x)
    rs = _rows(residual) if residual is not None else xs
    out_sum = torch.empty(xs.shape, dtype=x.dtype, device=x.device) if residual is not None else xs
    y = torch.empty(xs.shape, dtype=out_dtype(x, weight), device=x.device)
    _add_rms_norm_kernel[(xs.shape[0],)](
        xs, rs, weight, out_sum, y, D, eps, xs.stride(0), rs.stride(0), out_sum.stride(0), y.stride(0),
        HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(D), num_warps=_norm_warps(D))
    return (out_sum.view(x.shape) if residual is not None else None), y.view(x.shape)


def rope_latent_write_triton(q_pe, kv, weight, eps, cos, sin, cache, slots):
    """Same contract as rope_latent_write_reference, in one launch: S x (H + 1) programs."""
    S, H, P = q_pe.shape
    R = weight.shape[0]
    assert q_pe.stride(-1) == 1 and kv.stride(-1) == 1 and cache.stride(-1) == 1
    cos, sin = cos.contiguous(), sin.contiguous()
    q_rot = torch.empty(S, H, P, dtype=q_pe.dtype, device=q_pe.device)
    _rope_latent_kernel[(S, H + 1)](
        q_pe, q_rot, kv, weight, cos, sin, cache, slots, H, R, P // 2, eps,
        q_pe.stride(0), q_pe.stride(1), q_rot.stride(0), q_rot.stride(1), kv.stride(0), cos.stride(0),
        cache.stride(0), BLOCK_R=triton.next_power_of_2(R), BLOCK_HALF=triton.next_power_of_2(P // 2),
        num_warps=4)
    return q_rot


# -- dispatchers --------------------------------------------------------------------------------------------
def _use_triton(*ts) -> bool:
    return triton is not None and ts[0].is_cuda and not (
        torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts))


def rms_norm(x, weight, eps: float):
    """Triton on CUDA (inference), the reference elsewhere."""
    if _use_triton(x, weight):
        return add_rms_norm_triton(x, None, weight, eps)[1]
    return rms_norm_reference(x, weight, eps)


def add_rms_norm(x, residual, weight, eps: float):
    """Triton on CUDA (inference), the reference elsewhere."""
    if _use_triton(x, residual, weight):
        return add_rms_norm_triton(x, residual, weight, eps)
    return add_rms_norm_reference(x, residual, weight, eps)


def rope_latent_write(q_pe, kv, weight, eps: float, cos, sin, cache, slots):
    """Triton on CUDA (inference), the reference elsewhere."""
    if _use_triton(q_pe, kv, weight):
        return rope_latent_write_triton(q_pe, kv, weight, eps, cos, sin, cache, slots)
    return rope_latent_write_reference(q_pe, kv, weight, eps, cos, sin, cache, slots)


def silu_mul(gate, up):
    """Triton on CUDA (inference), the reference elsewhere."""
    if _use_triton(gate, up) and gate.dtype == up.dtype and gate.shape == up.shape:
        return silu_mul_triton(gate, up)
    return silu_mul_reference(gate, up)
