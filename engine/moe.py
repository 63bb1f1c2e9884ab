"""DeepSeekMoE: the router (Gate), a rank's routed experts stacked (Experts; FP8-kept or int8/int4-packed:
QuantExperts), the shared experts, and the layer that sums them (MoE)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import ops
from ..kernels.fp8_matmul import dequantize_fp8
from ..kernels.fp8_moe import fp8_triton_fits, moe_experts_fp8
from ..kernels.fused_moe import fuses_shared, moe_experts
from ..kernels.quant_cpu import Int4Cpu, int4_fits, moe_experts_cpu, repack_int4
from ..kernels.quant_format import Packed
from ..kernels.quant_moe import moe_experts_quant
from ..kernels.router import route

from . import dist
from .config import ModelConfig
from .layers.linear import Linear
from .layers.mlp import MLP
from .errors import ModelError
from .layers.quant_linear import QuantLinear, QuantSpec, check_packed, packed_of, quantize, register_packed
from .layers.weights import LoadContext, Target, check_shape, default_weight_loader


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

    def weight_loader(self, target: Target, t: torch.Tensor, scale, ctx: LoadContext, where: str):
        """Whole on every rank; the correction bias stays float32 (it only ranks experts, by small margins)."""
        fp32 = target.name == "e_score_correction_bias"
        default_weight_loader(target, t, scale, ctx, where, dtype=torch.float32 if fp32 else None)

    def forward(self, x: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T,k] float32, chosen experts [T,k] minus `offset`): kernels/router.py, one kernel on CUDA
        after the linear."""
        logits = F.linear(x.float(), self.weight.float())
        return ops.fused(torch.ops.dschat.route, route, x)(logits, self.e_score_correction_bias,
                                                           *self.route_args(offset))

    def route_args(self, offset: int = 0) -> tuple:
        """kernels/router.py route's arguments after (logits, bias): (k, n_group, topk_group, top2, softmax,
        normalise, scale, offset), from the config (the lean CPU steps pass them to their routers too)."""
        cfg = self.cfg
        grouped = cfg.n_group > 1 and cfg.topk_method in ("group_limited_greedy", "noaux_tc")
        normalise = cfg.num_experts_per_tok > 1 and cfg.norm_topk_prob
        return (cfg.num_experts_per_tok, cfg.n_group if grouped else 1, cfg.topk_group, cfg.topk_method == "noaux_tc",
                cfg.scoring_func == "softmax", normalise,
                cfg.routed_scaling_factor if cfg.v3_gate or not normalise else None, offset)


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
        self.loaded: set[tuple[int, str]] = set()  # (expert, projection) filled so far

    def weight_loader(self, target: Target, t: torch.Tensor, scale: torch.Tensor | None, ctx: LoadContext,
                      where: str):
        """Expert target.expert's gate, up or down projection (target.name) into its stack. The first one
        allocates the stack, FP8 (with block scales) if it arrives FP8; all of a stack's experts must agree."""
        e, proj = target.expert, target.name
        attr = "w2" if proj == "down" else "w13"
        stack = getattr(self, attr)
        E, rows, cols = stack.shape
        rows //= 1 if proj == "down" else 2
        check_shape(t, (rows, cols), where)
        if stack.is_meta:
            stack = torch.empty(stack.shape, device=ctx.device, dtype=ctx.dtype if scale is None else t.dtype)
            self._parameters[attr] = nn.Parameter(stack, requires_grad=False)
            if scale is not None:
                blocks = (scale.shape[0] * (1 if proj == "down" else 2), scale.shape[1])
                setattr(self, attr + "_scale", torch.empty(E, *blocks, device=ctx.device))
                self.block = ctx.block
        scales = getattr(self, attr + "_scale")
        if (scales is None) != (scale is None) or stack.dtype != (ctx.dtype if scale is None else t.dtype):
            raise ModelError(f"{where}: the routed experts of one layer mix FP8 and unquantised weights")
        half = 1 if proj == "up" else 0
        stack[e, half * rows:(half + 1) * rows] = t.to(device=ctx.device, dtype=stack.dtype)
        if scale is not None:
            n = scale.shape[0]
            scales[e, half * n:(half + 1) * n] = scale.to(device=ctx.device, dtype=torch.float32)
        self.loaded.add((e, proj))

    def missing(self) -> tuple[int, str] | None:
        """(expert, projection) of a weight of this stack that never arrived, if any."""
        return _missing(self.loaded, self.w13.shape[0])

    def shared_weights(self, shared: MLP) -> list[torch.Tensor] | None:
        """The shared experts' weights as this stack's kernels take them beside it (gate, up, down; FP8: each
        followed by its scales), or None where they are stored otherwise (then they run on their own)."""
        lin = (shared.gate_proj, shared.up_proj, shared.down_proj)
        if not all(type(m) is Linear and m.weight.dtype == self.w13.dtype for m in lin):
            return None
        if self.w13_scale is None:
            return None if any(m.scale is not None for m in lin) else [m.weight for m in lin]
        if any(m.scale is None or m.block != self.block for m in lin):
            return None
        weights = [t for m in lin for t in (m.weight, m.scale)]
        return weights if fp8_triton_fits(self.w2, self.block, shared=weights) else None

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                shared: list[torch.Tensor] | None = None) -> torch.Tensor:
        """x [T,H], ids [T,k] indices into this stack (others contribute zero), weights [T,k] -> [T,H];
        `shared` (shared_weights) adds the shared experts inside the same kernels."""
        if self.w13_scale is None:
            return ops.traced(torch.ops.dschat.moe_experts, moe_experts)(x, self.w13, self.w2, ids, weights,
                                                                         shared or [])
        return ops.traced(torch.ops.dschat.moe_experts_fp8, moe_experts_fp8)(
            x, self.w13, self.w13_scale, self.w2, self.w2_scale, ids, weights, list(self.block), shared or [])


class QuantExperts(nn.Module):
    """A rank's routed experts, stacked as Experts stacks them (w13: gate rows then up rows, w2: down),
    each stack packed; the chosen experts run through kernels/quant_moe.py."""

    def __init__(self, n: int, dim: int, inter: int, s: QuantSpec):
        super().__init__()
        self.spec, self.dim, self.inter = s, dim, inter
        register_packed(self, "w13", s, (n,), 2 * inter, dim)
        register_packed(self, "w2", s, (n,), dim, inter)
        for name in ("cpu_w13", "cpu_w13_so", "cpu_w2", "cpu_w2_so"):  # int4 on the CPU (repack_for_cpu)
            self.register_buffer(name, None)
        self.loaded: set[tuple[int, str]] = set()

    def put(self, e: int, proj: str, p: Packed, device, where: str):
        """Expert e's gate_proj, up_proj or down_proj, packed, into its stack."""
        n, k = (self.dim, self.inter) if proj == "down" else (self.inter, self.dim)
        check_packed(p, self.spec, n, k, where)
        prefix = "w2" if proj == "down" else "w13"
        rows = slice(n, 2 * n) if proj == "up" else slice(0, n)
        for suffix, t in p.tensors().items():
            stack = getattr(self, prefix + suffix)
            if stack.is_meta:  # the first expert of this stack allocates it
                stack = torch.empty(stack.shape, dtype=stack.dtype, device=device)
                setattr(self, prefix + suffix, stack)
            stack[e, rows] = t.to(device)
        self.loaded.add((e, proj))

    def weight_loader(self, target: Target, t: torch.Tensor | Packed, scale: torch.Tensor | None,
                      ctx: LoadContext, where: str):
        """Expert target.expert's projection: quantized here from a float tensor, or already packed."""
        if scale is not None:
            t = dequantize_fp8(t, scale, ctx.block)
        self.put(target.expert, target.name, t if isinstance(t, Packed) else quantize(t, self.spec), ctx.device,
                 where)

    def missing(self) -> tuple[int, str] | None:
        """(expert, projection) of a weight of this stack that never arrived, if any."""
        return _missing(self.loaded, self.w13.shape[0])

    def repack_for_cpu(self):
        if self.w13 is not None and int4_fits(packed_of(self, "w13", self.spec, self.dim)) \
                and self.w13.device.type == "cpu":
            for prefix, k in (("w13", self.dim), ("w2", self.inter)):
                r = repack_int4(packed_of(self, prefix, self.spec, k))
                setattr(self, "cpu_" + prefix, r.data)
                setattr(self, f"cpu_{prefix}_so", r.scale_offset)
                for suffix in ("", "_scale", "_zero"):
                    setattr(self, prefix + suffix, None)

    def shared_weights(self, shared: MLP) -> list[Packed] | None:
        """The shared experts' packed weights (gate, up, down) where they are packed as this stack is (the
        CUDA kernels read them beside it), else None."""
        lin = (shared.gate_proj, shared.up_proj, shared.down_proj)
        if self.w13 is None or not all(isinstance(m, QuantLinear) and m.spec == self.spec and m.weight is not None
                                       for m in lin):
            return None
        return [packed_of(m, "weight", m.spec, m.in_features) for m in lin]

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                shared: list[Packed] | None = None) -> torch.Tensor:
        if shared is not None:  # the CUDA decode path only (MoE.forward)
            w13, w2 = packed_of(self, "w13", self.spec, self.dim), packed_of(self, "w2", self.spec, self.inter)
            return moe_experts_quant(x, w13, w2, ids, weights, shared)
        if self.cpu_w13 is not None:
            if torch.compiler.is_compiling():
                return torch.ops.dschat.moe_experts_int4_cpu(x, self.cpu_w13, self.cpu_w13_so, self.cpu_w2,
                                                             self.cpu_w2_so, ids, weights, self.dim, self.inter,
                                                             self.spec.group)
            w13 = Int4Cpu(self.cpu_w13, self.cpu_w13_so, 2 * self.inter, self.dim, self.spec.group)
            w2 = Int4Cpu(self.cpu_w2, self.cpu_w2_so, self.dim, self.inter, self.spec.group)
            return moe_experts_cpu(x, w13, w2, ids, weights)
        w13, w2 = packed_of(self, "w13", self.spec, self.dim), packed_of(self, "w2", self.spec, self.inter)
        if x.device.type == "cpu":
            if torch.compiler.is_compiling():
                return torch.ops.dschat.moe_experts_packed_cpu(x, w13.data, w13.scale, w13.zero, w2.data, w2.scale,
                                                               w2.zero, ids, weights, self.spec.bits, w13.group)
            return moe_experts_cpu(x, w13, w2, ids, weights)
        return moe_experts_quant(x, w13, w2, ids, weights)


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

    def expert_target(self, expert: int, proj: str) -> Target | None:
        """Where the hub's tensor of routed expert `expert` (its number in the whole model), projection
        "gate", "up" or "down", goes on this rank (None: another rank holds it)."""
        e = expert - self.first
        return Target(self.experts, proj, e) if 0 <= e < self.experts.w13.shape[0] else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """On the CUDA decode path the shared experts run inside the routed experts' kernels (one more row a
        token, weight 1: kernels/fused_moe.py), where both are stored alike; elsewhere on their own."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, ids = self.gate(x, self.first)
        shared = None
        if self.shared_experts is not None and fuses_shared(x, ids):
            shared = self.experts.shared_weights(self.shared_experts)
        y = self.experts(x, ids, weights, shared)
        if self.shared_experts is not None and shared is None:
            y = y + self.shared_experts(x)
        return dist.all_reduce(y).view(shape)


def _missing(loaded: set[tuple[int, str]], n: int) -> tuple[int, str] | None:
    return next(((e, proj) for e in range(n) for proj in ("gate", "up", "down") if (e, proj) not in loaded), None)
