"""The kernels as PyTorch custom operators (`torch.library`), each with a fake (meta) implementation, so that
`torch.compile(fullgraph=True)` traces a whole decode step as one graph: inside an operator the CPU paths may
read small tensors on the host (the MoE's chosen experts, the attention's length), which is free on the CPU
and, the operator being opaque to the compiler, breaks no graph; on CUDA they run the Triton kernels.

    torch.ops.dschat.mla_decode_paged      mla_decode.mla_decode_paged (the static step's attention)
    torch.ops.dschat.moe_experts           fused_moe.moe_experts (`shared`: the shared experts' weights, or [])
    torch.ops.dschat.moe_experts_fp8       fp8_moe.moe_experts_fp8 (`--fp8 keep` experts, and the shared ones)
    torch.ops.dschat.moe_experts_int4_cpu  quant_cpu.moe_experts_cpu over int4 stacks (PyTorch's int4 layout)
    torch.ops.dschat.moe_experts_packed_cpu  quant_cpu.moe_experts_cpu over stacks as stored (cpu_gemv's)
    torch.ops.dschat.matmul_packed_cpu     quant_cpu.matmul_cpu over a weight as stored (cpu_gemv's)
    torch.ops.dschat.heads_packed_cpu      quant_cpu.heads_cpu (MLA's fold / unfold over a packed kv_b_proj)
    torch.ops.dschat.linear_bf16_cpu       cpu_bf16.linear_or_torch (a bfloat16 Linear on the CPU)
    torch.ops.dschat.rms_norm              norm_rope.rms_norm
    torch.ops.dschat.add_rms_norm          norm_rope.add_rms_norm (the residual add and the norm)
    torch.ops.dschat.rope_latent_write     norm_rope.rope_latent_write (mutates the cache layer)
    torch.ops.dschat.silu_mul              norm_rope.silu_mul (the SwiGLU's silu(gate) * up)
    torch.ops.dschat.route                 router.route (the MoE router after its linear)

The engine calls the plain Python functions when it runs eagerly (an operator's dispatch costs ~10 us) and
the operators while it is being traced (`traced`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import cpu_bf16, fp8_moe, fused_moe, mla_decode, norm_rope, quant_cpu, router
from .quant_format import Packed


def traced(op, fn):
    """The custom operator while torch.compile traces, else the plain function."""
    return op if torch.compiler.is_compiling() else fn


def fused(op, fn, t: Tensor):
    """For the elementwise fusions (norm_rope, router): the custom operator while torch.compile traces a CUDA
    step (its Triton kernel inside), else the plain function: on the CPU the compiler traces the reference's
    operations and fuses them itself, better than it could around an opaque call."""
    return op if torch.compiler.is_compiling() and t.is_cuda else fn


@torch.library.custom_op("dschat::mla_decode_paged", mutates_args=())
def mla_decode_paged(q_lat: Tensor, q_pe: Tensor, cache: Tensor, table_slots: Tensor, q_pos: Tensor,
                     scale: float) -> Tensor:
    return mla_decode.mla_decode_paged(q_lat, q_pe, cache, table_slots, q_pos, scale)


@mla_decode_paged.register_fake
def _(q_lat, q_pe, cache, table_slots, q_pos, scale):
    return torch.empty_like(q_lat)


@torch.library.custom_op("dschat::moe_experts", mutates_args=())
def moe_experts(x: Tensor, w13: Tensor, w2: Tensor, ids: Tensor, weights: Tensor, shared: list[Tensor]) -> Tensor:
    return fused_moe.moe_experts(x, w13, w2, ids, weights, shared)


@moe_experts.register_fake
def _(x, w13, w2, ids, weights, shared):
    return torch.empty_like(x)


@torch.library.custom_op("dschat::moe_experts_fp8", mutates_args=())
def moe_experts_fp8(x: Tensor, w13: Tensor, s13: Tensor, w2: Tensor, s2: Tensor, ids: Tensor, weights: Tensor,
                    block: list[int], shared: list[Tensor]) -> Tensor:
    return fp8_moe.moe_experts_fp8(x, w13, s13, w2, s2, ids, weights, tuple(block), shared)


@moe_experts_fp8.register_fake
def _(x, w13, s13, w2, s2, ids, weights, block, shared):
    return torch.empty_like(x)


@torch.library.custom_op("dschat::moe_experts_int4_cpu", mutates_args=())
def moe_experts_int4_cpu(x: Tensor, w13: Tensor, w13_so: Tensor, w2: Tensor, w2_so: Tensor, ids: Tensor,
                         weights: Tensor, hidden: int, inter: int, group: int) -> Tensor:
    return quant_cpu.moe_experts_cpu(x, quant_cpu.Int4Cpu(w13, w13_so, 2 * inter, hidden, group),
                                     quant_cpu.Int4Cpu(w2, w2_so, hidden, inter, group), ids, weights)


@moe_experts_int4_cpu.register_fake
def _(x, w13, w13_so, w2, w2_so, ids, weights, hidden, inter, group):
    return torch.empty_like(x)


@torch.library.custom_op("dschat::moe_experts_packed_cpu", mutates_args=())
def moe_experts_packed_cpu(x: Tensor, w13: Tensor, w13_scale: Tensor, w13_zero: Tensor | None, w2: Tensor,
                           w2_scale: Tensor, w2_zero: Tensor | None, ids: Tensor, weights: Tensor, bits: int,
                           group: int) -> Tensor:
    p13 = Packed(w13, w13_scale, w13_zero, bits, group, x.shape[-1])
    p2 = Packed(w2, w2_scale, w2_zero, bits, group, w13.shape[-2] // 2)
    return quant_cpu.moe_experts_cpu(x, p13, p2, ids, weights)


@moe_experts_packed_cpu.register_fake
def _(x, w13, w13_scale, w13_zero, w2, w2_scale, w2_zero, ids, weights, bits, group):
    return torch.empty_like(x)


@torch.library.custom_op("dschat::matmul_packed_cpu", mutates_args=())
def matmul_packed_cpu(x: Tensor, w: Tensor, scale: Tensor, zero: Tensor | None, bits: int, group: int,
                      in_features: int) -> Tensor:
    return quant_cpu.matmul_cpu(x, Packed(w, scale, zero, bits, group, in_features))


@matmul_packed_cpu.register_fake
def _(x, w, scale, zero, bits, group, in_features):
    return x.new_empty(*x.shape[:-1], w.shape[-2])


@torch.library.custom_op("dschat::heads_packed_cpu", mutates_args=())
def heads_packed_cpu(x: Tensor, w: Tensor, scale: Tensor, zero: Tensor | None, bits: int, group: int,
                     in_features: int, n: int, row0: int, head_rows: int, transposed: bool) -> Tensor:
    return quant_cpu.heads_cpu(x, Packed(w, scale, zero, bits, group, in_features), n, row0, head_rows, transposed)


@heads_packed_cpu.register_fake
def _(x, w, scale, zero, bits, group, in_features, n, row0, head_rows, transposed):
    return x.new_empty(*x.shape[:-1], in_features if transposed else n)


@torch.library.custom_op("dschat::rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return norm_rope.rms_norm(x, weight, eps)


@rms_norm.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape, dtype=norm_rope.out_dtype(x, weight))


@torch.library.custom_op("dschat::add_rms_norm", mutates_args=())
def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return norm_rope.add_rms_norm(x, residual, weight, eps)


@add_rms_norm.register_fake
def _(x, residual, weight, eps):
    return torch.empty_like(x), x.new_empty(x.shape, dtype=norm_rope.out_dtype(x, weight))


@torch.library.custom_op("dschat::rope_latent_write", mutates_args=("cache",))
def rope_latent_write(q_pe: Tensor, kv: Tensor, weight: Tensor, eps: float, cos: Tensor, sin: Tensor,
                      cache: Tensor, slots: Tensor) -> Tensor:
    return norm_rope.rope_latent_write(q_pe, kv, weight, eps, cos, sin, cache, slots)


@rope_latent_write.register_fake
def _(q_pe, kv, weight, eps, cos, sin, cache, slots):
    return q_pe.new_empty(q_pe.shape)


@torch.library.custom_op("dschat::route", mutates_args=())
def route(logits: Tensor, bias: Tensor | None, k: int, n_group: int, topk_group: int, top2: bool, softmax: bool,
          normalise: bool, scale: float | None, offset: int) -> tuple[Tensor, Tensor]:
    w, ids = router.route(logits, bias, k, n_group, topk_group, top2, softmax, normalise, scale, offset)
    return w.contiguous(), ids.contiguous()


@route.register_fake
def _(logits, bias, k, n_group, topk_group, top2, softmax, normalise, scale, offset):
    T = logits.shape[0]
    return logits.new_empty(T, k, dtype=torch.float32), logits.new_empty(T, k, dtype=torch.int64)


@torch.library.custom_op("dschat::silu_mul", mutates_args=())
def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    return norm_rope.silu_mul(gate, up)


@silu_mul.register_fake
def _(gate, up):
    return torch.empty_like(gate)


@torch.library.custom_op("dschat::linear_bf16_cpu", mutates_args=())
def linear_bf16_cpu(x: Tensor, w: Tensor) -> Tensor:
    return cpu_bf16.linear_or_torch(x, w)


@linear_bf16_cpu.register_fake
def _(x, w):
    return x.new_empty(*x.shape[:-1], w.shape[0])
