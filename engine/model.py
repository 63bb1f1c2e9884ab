"""The DeepSeek-V2 / V3 transformer: MLA attention, DeepSeekMoE, YaRN RoPE, and V3's MTP module.

Parameter names are the hub's (`model.layers.3.self_attn.kv_b_proj.weight`), so a checkpoint loads 1:1.

Attention has two paths that compute the same function:
  * materialised: expand every cached latent through kv_b_proj into per-head K/V, then attend
    (cheap per query; used for the plain path, training and long prefill chunks);
  * absorbed: fold kv_b_proj's key half into the query and its value half into the output, and attend
    directly over the cached latents (cheap per cached token; used for decode and short chunks).
The cache holds, per token per layer, only the normalised latent c_kv (kv_lora_rank values) and the
rotated k_pe (qk_rope_head_dim values): see engine/cache.py. The absorbed attention itself is
kernels/mla_decode.py (a Triton kernel on CUDA, its PyTorch reference elsewhere).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.fp8_matmul import dequantize_fp8, fp8_linear
from ..kernels.fused_moe import moe_experts
from ..kernels.mla_decode import mla_decode

from . import dist
from .config import ModelConfig, yarn_mscale

# Up to this many new tokens per forward pass, attention runs absorbed over the latent cache;
# above it, materialising K/V costs less (expansion ~ T*r*H*256 vs absorbed ~ S*T*H*1088 flops).
ABSORB_MAX_TOKENS = 128


# -- building blocks ---------------------------------------------------------------------------------
class Linear(nn.Module):
    """y = x W^T with an uninitialised weight (the checkpoint fills it). `split` says how tensor
    parallelism cuts it: "col" splits the output features, "row" the input features. The weight may stay
    in FP8 with its block scales (`scale`, `block`): then it is read as FP8 (kernels/fp8_matmul.py: a Triton
    kernel that dequantises in registers on CUDA, dequantise-then-matmul elsewhere)."""

    def __init__(self, n_in: int, n_out: int, split: str | None = None):
        super().__init__()
        if split == "col":
            n_out = dist.split(n_out, "output features")
        elif split == "row":
            n_in = dist.split(n_in, "input features")
        self.split = split
        self.weight = nn.Parameter(torch.empty(n_out, n_in))
        self.register_buffer("scale", None)
        self.block: tuple[int, int] = (128, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            return fp8_linear(x, self.weight, self.scale, self.block)
        return F.linear(x, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Embedding(nn.Module):
    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


# -- rotary embedding (YaRN), DeepSeek's interleaved layout --------------------------------------------
class Rotary(nn.Module):
    """cos/sin for positions, computed on the fly from inv_freq (YaRN-corrected when configured)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        r, dim = cfg.rope, cfg.qk_rope_head_dim
        exps = torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim
        inv_freq = 1.0 / (r.theta ** exps)
        self.attention_factor = 1.0
        if r.kind == "yarn":
            # The hub code applies the correction at every length (DeepSeek's demo gates it on
            # max_seq_len > original length; the released weights are served the hub way).
            def corr_dim(rot):
                return dim * math.log(r.original_max_position_embeddings / (rot * 2 * math.pi)) / (
                    2 * math.log(r.theta)
                )

            low = max(math.floor(corr_dim(r.beta_fast)), 0)
            high = min(math.ceil(corr_dim(r.beta_slow)), dim - 1)
            if low == high:
                high += 0.001
            ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
            extrapolate = 1.0 - ramp  # 1 where the original frequency is kept
            inv_freq = inv_freq / r.factor * (1 - extrapolate) + inv_freq * extrapolate
            self.attention_factor = yarn_mscale(r.factor, r.mscale) / yarn_mscale(r.factor, r.mscale_all_dim)
        self.inv_freq = {inv_freq.device: inv_freq}  # a plain dict: not a parameter, not moved by .to()

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dev = positions.device
        if dev not in self.inv_freq:
            self.inv_freq[dev] = next(iter(self.inv_freq.values())).to(dev)
        angles = positions.float()[..., None] * self.inv_freq[dev]
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... of the last dimension by the angles whose
    cos/sin are given (shaped to broadcast against x's pairs)."""
    dtype = x.dtype
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)
    return out.flatten(-2).to(dtype)


# -- attention -------------------------------------------------------------------------------------------
@dataclass
class Step:
    """Where one cached forward pass (one sequence) reads and writes the latent cache.

    positions: [S] positions of the new tokens, contiguous, ending at T-1.
    slots:     [T] flat cache slot of every position 0..T-1 (pages need not be contiguous).
    cache:     per-layer latent buffers [num_slots, kv_lora_rank + qk_rope_head_dim].
    """

    positions: torch.Tensor
    slots: torch.Tensor
    cache: list[torch.Tensor]
    absorb: bool = True


def causal_mask(q_pos: torch.Tensor, n_keys: int) -> torch.Tensor:
    """[S, T] boolean: query at position p sees keys 0..p."""
    return torch.arange(n_keys, device=q_pos.device)[None, :] <= q_pos[:, None]


@dataclass
class Positions:
    """What every layer needs to know about the positions of one forward pass, computed once:
    rotary cos/sin [S, dr/2] and the causal mask [S, T] (None: plain causal attention, S = T)."""

    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None


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
        self.kv_b_proj = Linear(cfg.kv_lora_rank, cfg.num_attention_heads * (self.nope + self.v_dim), split="col")
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
        q_pe = apply_rope(q_pe, cos[:, None], sin[:, None])  # cos/sin [S, dr/2], broadcast over heads

        kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope], dim=-1)
        latent = torch.cat([self.kv_a_layernorm(kv), apply_rope(k_pe, cos, sin)], dim=-1)  # [B,S,r+dr]

        if step is not None:
            cache[step.slots[-S:]] = latent[0].to(cache.dtype)

        w = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.kv_rank)
        if step is not None and step.absorb:
            # fold W_UK into the query, attend over the latent rows in place, unfold W_UV from the output
            w_uk, w_uv = w[:, : self.nope], w[:, self.nope :]
            q_lat = torch.einsum("shd,hdc->shc", q_nope[0], w_uk)
            o_lat = mla_decode(q_lat, q_pe[0].to(q_lat.dtype), cache, step.slots, step.positions, self.scale)
            out = torch.einsum("shc,hdc->shd", o_lat, w_uv).unsqueeze(0)
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


# -- feed-forward ------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). `parallel` splits its columns over ranks (dense layers and
    shared experts); routed experts are whole on one rank."""

    def __init__(self, dim: int, inter: int, parallel: bool = True):
        super().__init__()
        self.gate_proj = Linear(dim, inter, split="col" if parallel else None)
        self.up_proj = Linear(dim, inter, split="col" if parallel else None)
        self.down_proj = Linear(inter, dim, split="row" if parallel else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DenseMLP(MLP):
    """A dense layer's MLP: its column-split partial outputs are summed across ranks (inside an MoE the
    shared experts' partial sum joins the routed experts' before one all-reduce)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dist.all_reduce(super().forward(x))


class Gate(nn.Module):
    """Router: scores in float32 (softmax or sigmoid); V3's e_score_correction_bias only chooses experts;
    group-limited choice (V2: max per group, V3: sum of the top two); weights from the unbiased scores."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        if cfg.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.softmax(dim=-1) if cfg.scoring_func == "softmax" else logits.sigmoid()
        choice = scores
        if self.e_score_correction_bias is not None:
            choice = scores + self.e_score_correction_bias.float()
        if cfg.n_group > 1 and cfg.topk_method in ("group_limited_greedy", "noaux_tc"):
            groups = choice.view(-1, cfg.n_group, cfg.n_routed_experts // cfg.n_group)
            if cfg.topk_method == "noaux_tc":
                group_scores = groups.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_scores = groups.amax(dim=-1)
            keep = group_scores.topk(cfg.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = groups.masked_fill(~group_mask[..., None], float("-inf")).flatten(1)
        idx = choice.topk(cfg.num_experts_per_tok, dim=-1).indices
        weights = scores.gather(1, idx)
        normalise = cfg.num_experts_per_tok > 1 and cfg.norm_topk_prob
        if normalise:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        if cfg.v3_gate or not normalise:
            weights = weights * cfg.routed_scaling_factor
        return weights, idx


class Experts(nn.Module):
    """A rank's routed experts, stacked (kernels/fused_moe.py): w13 [E, 2I, H] = gate_proj rows then up_proj
    rows, w2 [E, H, I] = down_proj; the loader fills them from the hub's per-expert tensors. Under
    `--fp8 keep` they stay FP8 with their block scales (w13_scale: gate's blocks, then up's) and only the
    experts chosen in a forward pass are dequantised."""

    def __init__(self, n: int, dim: int, inter: int):
        super().__init__()
        self.w13 = nn.Parameter(torch.empty(n, 2 * inter, dim))
        self.w2 = nn.Parameter(torch.empty(n, dim, inter))
        self.register_buffer("w13_scale", None)
        self.register_buffer("w2_scale", None)
        self.block: tuple[int, int] = (128, 128)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T,H], ids [T,k] indices into this stack (others contribute zero), weights [T,k] -> [T,H]."""
        if self.w13_scale is None:
            return moe_experts(x, self.w13, self.w2, ids, weights)
        E, I = self.w13.shape[0], self.w2.shape[-1]
        valid = (ids >= 0) & (ids < E)
        used, local = torch.unique(torch.where(valid, ids, 0), return_inverse=True)
        n_gate = self.w13_scale.shape[1] // 2
        w13, s13 = self.w13[used], self.w13_scale[used]
        gate = dequantize_fp8(w13[:, :I], s13[:, :n_gate], self.block)
        up = dequantize_fp8(w13[:, I:], s13[:, n_gate:], self.block)
        w2 = dequantize_fp8(self.w2[used], self.w2_scale[used], self.block)
        return moe_experts(x, torch.cat([gate, up], dim=1).to(x.dtype), w2.to(x.dtype),
                           torch.where(valid, local, -1), weights)


class MoE(nn.Module):
    """Shared experts (always on) plus the top-k routed experts. With several ranks each holds a contiguous
    block of the routed experts; partial sums are added across ranks."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        per_rank = dist.split(cfg.n_routed_experts, "n_routed_experts")
        self.first = dist.rank() * per_rank
        self.gate = Gate(cfg)
        self.experts = Experts(per_rank, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = None
        if cfg.n_shared_experts:
            self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, idx = self.gate(x)
        y = self.experts(x, idx - self.first, weights)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return dist.all_reduce(y).view(shape)


# -- blocks and the model ------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = MLA(cfg)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer) else DenseMLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, pos: Positions, cache=None, step=None):
        h = h + self.self_attn(self.input_layernorm(h), pos, cache, step)
        return h + self.mlp(self.post_attention_layernorm(h))


class SharedHead(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = Linear(cfg.hidden_size, cfg.vocab_size, split="col")


class MTPLayer(Block):
    """V3's multi-token prediction module, stored as layer `num_hidden_layers` (+i):
    h' = Block(eh_proj([enorm(embed(t_{i+1})); hnorm(h_i)])), logits = shared_head.head(shared_head.norm(h'))."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__(cfg, layer)
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = Linear(2 * cfg.hidden_size, cfg.hidden_size)
        self.shared_head = SharedHead(cfg)


class Transformer(nn.Module):
    """DeepseekV2/V3ForCausalLM. State-dict names equal the hub's, except that MTP layers live in `mtp`
    (hub: model.layers.{num_hidden_layers + i}); see `local_name`."""

    def __init__(self, cfg: ModelConfig, with_mtp: bool = True):
        super().__init__()
        self.cfg = cfg
        self.model = nn.Module()
        self.model.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, split="col")
        n_mtp = cfg.num_nextn_predict_layers if with_mtp else 0
        self.mtp = nn.ModuleList(MTPLayer(cfg, cfg.num_hidden_layers + i) for i in range(n_mtp))
        self.rotary = Rotary(cfg)

    @property
    def n_cached_layers(self) -> int:
        """Layers with a latent cache: the main ones, then the MTP ones."""
        return self.cfg.num_hidden_layers + len(self.mtp)

    def local_name(self, hub_name: str) -> str:
        """Hub tensor name -> this module's parameter name."""
        L = self.cfg.num_hidden_layers
        if hub_name.startswith("model.layers."):
            layer, _, rest = hub_name[len("model.layers."):].partition(".")
            if layer.isdigit() and int(layer) >= L:
                return f"mtp.{int(layer) - L}.{rest}"
        return hub_name

    def hub_name(self, local: str) -> str:
        """This module's parameter name -> the hub's (the inverse of local_name)."""
        if local.startswith("mtp."):
            i, _, rest = local[4:].partition(".")
            return f"model.layers.{self.cfg.num_hidden_layers + int(i)}.{rest}"
        return local

    def hub_tensors(self) -> dict[str, torch.Tensor]:
        """Every weight under its hub name, routed experts one tensor per expert and projection, as a
        checkpoint holds them (the inverse of the loader; for training's checkpoints)."""
        out = {}
        for name, t in self.state_dict().items():
            prefix, _, attr = name.rpartition(".experts.")
            if attr not in ("w13", "w2"):
                out[self.hub_name(name)] = t
                continue
            first = self.get_submodule(prefix).first
            for e, w in enumerate(t):
                stem = self.hub_name(f"{prefix}.experts.{first + e}")
                if attr == "w2":
                    out[f"{stem}.down_proj.weight"] = w
                else:
                    gate, up = w.chunk(2)
                    out[f"{stem}.gate_proj.weight"], out[f"{stem}.up_proj.weight"] = gate, up
        return out

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, step: Step | None = None) -> torch.Tensor:
        """ids [B,S] -> final hidden states before the last norm, [B,S,hidden]."""
        h = self.model.embed_tokens(ids)
        pos = self.positions(positions, step)
        for i, block in enumerate(self.model.layers):
            h = block(h, pos, step.cache[i] if step else None, step)
        return h

    def positions(self, positions: torch.Tensor, step: Step | None) -> Positions:
        cos, sin = self.rotary(positions)
        return Positions(cos, sin, causal_mask(positions, step.slots.numel()) if step else None)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and lm_head -> float32 logits over the whole vocabulary."""
        return dist.all_gather_last(self.lm_head(self.model.norm(h))).float()

    def mtp_forward(self, k: int, h_prev: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor,
                    step: Step | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP module k: from the previous depth's hidden states h_prev [B,S,hidden] at positions i and the
        tokens t_{i+1} [B,S], the hidden states of depth k+1 and their logits (float32)."""
        m = self.mtp[k]
        e = m.embed_tokens(next_ids)
        e = e.masked_fill((positions == 0)[:, None], 0.0)  # as vLLM runs the released weights
        e = m.enorm(e)
        h = m.eh_proj(torch.cat([e, m.hnorm(h_prev)], dim=-1))
        cache = step.cache[self.cfg.num_hidden_layers + k] if step else None
        h = m(h, self.positions(positions, step), cache, step)
        logits = dist.all_gather_last(m.shared_head.head(m.shared_head.norm(h))).float()
        return h, logits
