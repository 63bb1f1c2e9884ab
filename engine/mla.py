"""Multi-head latent attention (MLA), DeepSeek-V2/V3's attention.

Attention has two paths that compute the same function:
  * materialised: expand every cached latent through kv_b_proj into per-head K/V, then attend
    (cheap per query; used for the plain path, training and long prefill chunks);
  * absorbed: fold kv_b_proj's key half into the query and its value half into the output, and attend
    directly over the cached latents (cheap per cached token; used for decode and short chunks).
The cache holds, per token per layer, only the normalised latent c_kv (kv_lora_rank values) and the
rotated k_pe (qk_rope_head_dim values): see engine/cache.py. The absorbed attention itself is
kernels/mla_decode.py (a Triton kernel on CUDA, cpu_bf16's kernels for bfloat16 on the CPU, its PyTorch
reference elsewhere; the CPU's lean float32 step: cpu_gemv.mla_attend).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import cpu_bf16, ops
from ..kernels.mla_decode import mla_decode, mla_decode_paged
from ..kernels.norm_rope import apply_rope, rope_latent_write

from . import dist
from .config import ModelConfig
from .layers.linear import Linear
from .layers.norm import RMSNorm
from .layers.quant_linear import QuantLinear
from .step import Positions, Step

# Up to this many new tokens per forward pass, attention runs absorbed over the latent cache;
# above it, materialising K/V costs less (expansion ~ T*r*H*256 vs absorbed ~ S*T*H*1088 flops).
ABSORB_MAX_TOKENS = 128


def attend_materialized(q, k, v, mask, scale):
    """q [B,S,H,dq], k [B,T,H,dq], v [B,T,H,dv], mask [S,T] bool (None: causal, S = T) -> [B,S,H,dv]."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=mask is None,
        scale=scale)
    return out.transpose(1, 2)


class MLA(nn.Module):
    """Multi-head latent attention, hub names: q_proj | q_a_proj, q_a_layernorm, q_b_proj;
    kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj; o_proj."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = dist.split(cfg.num_attention_heads, "num_attention_heads")
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank = cfg.kv_lora_rank
        qk = cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(cfg.hidden_size, cfg.num_attention_heads * qk, split="col")
        else:
            self.q_a_proj = Linear(cfg.hidden_size, cfg.q_lora_rank)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, 1e-6)
            self.q_b_proj = Linear(cfg.q_lora_rank, cfg.num_attention_heads * qk, split="col")
        self.kv_a_proj_with_mqa = Linear(cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, 1e-6)
        # the absorbed path reads kv_b_proj's weight whole (W_UK, W_UV), so it never stays FP8
        self.kv_b_proj = Linear(cfg.kv_lora_rank, cfg.num_attention_heads * (self.nope + self.v_dim), split="col",
                                may_stay_fp8=False)
        self.o_proj = Linear(cfg.num_attention_heads * self.v_dim, cfg.hidden_size, split="row")
        self.scale = cfg.softmax_scale

    def forward(self, x, pos: Positions, cache: torch.Tensor | None = None, step: Step | None = None):
        """x [B,S,hidden]. Without a cache: plain causal attention over these S tokens.
        With one (B = 1): write the new latents, attend over all T cached positions."""
        cos, sin = pos.cos, pos.sin
        B, S, _ = x.shape
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, S, self.n_heads, self.nope + self.rope)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        kv_a = self.kv_a_proj_with_mqa(x)

        if step is not None:
            # q's rope, the latent's norm and k_pe's rope, and the cache write: one kernel on CUDA
            norm = self.kv_a_layernorm
            q_pe = ops.fused(torch.ops.dschat.rope_latent_write, rope_latent_write, x)(
                q_pe[0], kv_a[0], norm.weight, norm.eps, cos, sin, cache,
                step.slots[-S:] if step.write_slots is None else step.write_slots)[None]
        else:
            q_pe = apply_rope(q_pe, cos[:, None], sin[:, None])  # cos/sin [S, dr/2], broadcast over heads
            kv, k_pe = kv_a.split([self.kv_rank, self.rope], dim=-1)
            latent = torch.cat([self.kv_a_layernorm(kv), apply_rope(k_pe, cos, sin)], dim=-1)  # [B,S,r+dr]

        kv_b, hr = self.kv_b_proj, self.nope + self.v_dim
        if step is not None and step.absorb:
            # fold W_UK into the query, attend over the latent rows in place, unfold W_UV from the output
            packed = isinstance(kv_b, QuantLinear)  # --quant on the CPU: per head from the packed bytes
            w = None if packed else kv_b.weight.view(self.n_heads, hr, self.kv_rank)
            fold = not packed and w.dtype == torch.bfloat16 and x.device.type == "cpu" \
                and not torch.compiler.is_compiling() \
                and cpu_bf16.available() and not cpu_bf16.torch_rows(S)
            # (PyTorch's bfloat16 bmm is slow at a few rows, and at any count on a CPU without bfloat16 arithmetic)
            if packed:
                q_lat = kv_b.heads(q_nope[0], self.nope, 0, hr, transposed=True)
            elif fold:
                q_lat = q_nope.new_empty(*q_nope.shape[1:3], self.kv_rank)
                cpu_bf16.bmm(q_nope[0].transpose(0, 1), w[:, : self.nope], False, out=q_lat.transpose(0, 1))
            else:
                q_lat = torch.einsum("shd,hdc->shc", q_nope[0], w[:, : self.nope])
            if step.table_slots is not None:  # the static step: its length is in the positions
                o_lat = ops.traced(torch.ops.dschat.mla_decode_paged, mla_decode_paged)(
                    q_lat, q_pe[0].to(q_lat.dtype), cache, step.table_slots, step.positions, self.scale)
            else:
                o_lat = mla_decode(q_lat, q_pe[0].to(q_lat.dtype), cache, step.slots, step.positions, self.scale)
            if packed:
                out = kv_b.heads(o_lat, self.v_dim, self.nope, hr, transposed=False).unsqueeze(0)
            elif fold and o_lat.dtype == torch.bfloat16 and o_lat.stride(-1) == 1:
                out = o_lat.new_empty(*o_lat.shape[:2], self.v_dim)
                cpu_bf16.bmm(o_lat.transpose(0, 1), w[:, self.nope :], True, out=out.transpose(0, 1))
                out = out.unsqueeze(0)
            else:
                out = torch.einsum("shc,hdc->shd", o_lat, w[:, self.nope :]).unsqueeze(0)
        else:
            all_latent = latent if step is None else cache[step.slots].unsqueeze(0)  # [B,T,r+dr]
            c_kv, pe = all_latent.split([self.kv_rank, self.rope], dim=-1)
            T = c_kv.shape[1]
            kv = self.kv_b_proj(c_kv).view(B, T, self.n_heads, self.nope + self.v_dim)
            k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
            k = torch.cat([k_nope, pe.unsqueeze(2).expand(B, T, self.n_heads, self.rope)], dim=-1)
            q = torch.cat([q_nope, q_pe], dim=-1)
            out = attend_materialized(q, k, v, pos.mask, self.scale)
        return dist.all_reduce(self.o_proj(out.flatten(2)))
