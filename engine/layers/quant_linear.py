"""The linear layer whose weight is packed int8 or int4 (lm_head on the CPU: int6; the format:
kernels/quant_format.py): how a float
weight is quantized and sliced for a rank, the layout of a packed weight's stored tensors, and QuantLinear.
engine/quant.py decides which layers are packed."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...kernels import ops  # noqa: F401 (registers torch.ops.dschat.matmul_packed_cpu)
from ...kernels.quant_cpu import Int4Cpu, heads_cpu, int4_fits, matmul_cpu, repack_int4
from ...kernels.fp8_matmul import dequantize_fp8
from ...kernels.quant_format import INT6_ZERO, Packed, pack_int4, pack_int6
from ...kernels.quant_matmul import quant_matmul

from .. import dist
from ..errors import ModelError
from .linear import Linear
from .weights import LoadContext, Target

GROUP = 128
METHOD = "dschat"  # quantization_config.quant_method of a directory `dschat quantize` wrote


@dataclass(frozen=True)
class QuantSpec:
    """How weights are packed: int8 (one scale per output row), int4 (groups of `group` input features, each
    with a scale, and a zero point unless symmetric) or int6 (lm_head on the CPU: groups of `group`, a multiple
    of 64, each with a scale; symmetric)."""

    bits: int
    group: int = GROUP
    symmetric: bool = False

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    def config(self) -> dict:
        """The `quantization_config` of a directory quantized this way."""
        return {"quant_method": METHOD, "bits": self.bits, "group_size": self.group if self.bits == 4 else 0,
                "symmetric": self.symmetric or self.bits == 8}



# -- quantizing and slicing -----------------------------------------------------------------------------
CHUNK = 2**20  # elements a quantization works on at once (4 MB of float32; its temporaries a few times that)


def quantize(w: torch.Tensor, s: QuantSpec) -> Packed:
    """A float weight [N, K] -> its packed form (see kernels/quant_format.py). Every row is quantized on its
    own, so the rows are taken a block at a time (CHUNK elements): a large weight (V2-Lite's lm_head, 0.84 GB
    in float32) is never held in float32 whole, nor its temporaries."""
    n, k = w.shape
    rows = max(1, CHUNK // max(k, 1))
    if n <= rows:
        return _quantize_rows(w, s)
    out = None
    for i in range(0, n, rows):
        p = _quantize_rows(w[i:i + rows], s)
        if out is None:  # the packed tensors, allocated once and filled a block at a time
            out = [None if t is None else t.new_empty((n, *t.shape[1:])) for t in (p.data, p.scale, p.zero)]
        for o, t in zip(out, (p.data, p.scale, p.zero)):
            if o is not None:
                o[i:i + rows] = t
    return Packed(*out, s.bits, p.group, k)


def _quantize_rows(w: torch.Tensor, s: QuantSpec) -> Packed:
    w = w.float()
    if s.bits == 8:
        scale = (w.abs().amax(dim=-1) / 127).clamp(min=1e-12)
        data = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return Packed(data, scale, None, 8, 0, w.shape[-1])
    n, k = w.shape
    padded = -(-k // s.group) * s.group
    g = torch.nn.functional.pad(w, (0, padded - k)).view(n, padded // s.group, s.group)
    if s.bits == 6:  # symmetric: value - 32 in -31..31 (quality against int8: docs/benchmarks.md)
        scale = (g.abs().amax(dim=-1) / 31).clamp(min=1e-12)
        q = torch.round(g / scale[..., None]).clamp(-31, 31) + INT6_ZERO
        return Packed(pack_int6(q.flatten(1)), scale, None, 6, s.group, k)
    if s.symmetric:
        scale = (g.abs().amax(dim=-1) / 7).clamp(min=1e-12)
        q = torch.round(g / scale[..., None]).clamp(-8, 7) + 8
        zero = None
    else:
        lo, hi = g.amin(dim=-1).clamp(max=0), g.amax(dim=-1).clamp(min=0)
        scale = ((hi - lo) / 15).clamp(min=1e-12)
        zero = torch.round(-lo / scale).clamp(0, 15)
        q = (torch.round(g / scale[..., None]) + zero[..., None]).clamp(0, 15)
        zero = zero.to(torch.uint8)
    return Packed(pack_int4(q.flatten(1)), scale, zero, 4, s.group, k)


def shard(p: Packed, split: str | None, name: str) -> Packed:
    """This rank's slice of a packed weight [N, K]: output rows ("col"), or input features ("row"), whose
    cut must fall on a group boundary for int4 (int8 rows keep their one scale)."""
    ws, r = dist.world_size(), dist.rank()
    if ws == 1 or not split:
        return p
    if split == "col":
        n = p.out_features // ws
        rows = [None if t is None else t.narrow(0, r * n, n).clone() for t in (p.data, p.scale, p.zero)]
        return Packed(*rows, p.bits, p.group, p.in_features)
    k = p.in_features // ws
    if p.bits == 8:
        return Packed(p.data.narrow(1, r * k, k).contiguous(), p.scale, None, 8, 0, k)
    if p.bits == 6:
        raise ModelError(f"{name}: an int6 weight is split by its output rows only")
    if p.padded_in != p.in_features or k % p.group:
        raise ModelError(f"{name}: its {p.in_features} input features do not split into {ws} whole groups "
                         f"of {p.group}; load the unquantized checkpoint with `quant=\"int4\"` instead")
    g = k // p.group
    data, scale, zero = (None if t is None else t.narrow(1, r * n, n).contiguous()
                         for t, n in ((p.data, k // 2), (p.scale, g), (p.zero, g)))
    return Packed(data, scale, zero, 4, p.group, k)


def quantize_for_rank(w: torch.Tensor, split: str | None, s: QuantSpec, name: str) -> Packed:
    """A whole float weight -> this rank's packed slice. int4 slices before quantizing, so that no group
    straddles two ranks; int8 quantizes whole rows first, so that each row keeps its one scale."""
    ws, r = dist.world_size(), dist.rank()
    if ws == 1 or not split or s.bits == 8:
        return shard(quantize(w, s), split, name)
    dim = 0 if split == "col" else 1
    return quantize(w.chunk(ws, dim=dim)[r], s)


def packed_layout(s: QuantSpec, n: int, k: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]] | None]:
    """dtype and shape of each stored tensor of a packed [n, k] weight, by suffix (None: not stored)."""
    if s.bits == 8:
        return {"": (torch.int8, (n, k)), "_scale": (torch.float32, (n,)), "_zero": None}
    g = -(-k // s.group)
    if s.bits == 6:
        return {"": (torch.uint8, (n, g * s.group // 4 * 3)), "_scale": (torch.float32, (n, g)), "_zero": None}
    return {"": (torch.uint8, (n, g * s.group // 2)), "_scale": (torch.float32, (n, g)),
            "_zero": None if s.symmetric else (torch.uint8, (n, g))}


def register_packed(module: nn.Module, prefix: str, s: QuantSpec, lead: tuple[int, ...], n: int, k: int):
    """Empty (meta) buffers for a packed weight [*lead, n, k]: `prefix`, `prefix_scale`, `prefix_zero`."""
    for suffix, layout in packed_layout(s, n, k).items():
        t = None if layout is None else torch.empty(*lead, *layout[1], dtype=layout[0], device="meta")
        module.register_buffer(prefix + suffix, t)


def packed_of(module: nn.Module, prefix: str, s: QuantSpec, k: int) -> Packed:
    return Packed(getattr(module, prefix), getattr(module, prefix + "_scale"), getattr(module, prefix + "_zero"),
                  s.bits, s.group if s.bits != 8 else 0, k)


def check_packed(p: Packed, s: QuantSpec, n: int, k: int, where: str):
    if (p.out_features, p.in_features, p.bits) != (n, k, s.bits) or (p.zero is None) != (
            s.bits == 8 or s.symmetric):
        raise ModelError(f"{where}: packed int{p.bits} weight of {p.out_features} x {p.in_features}, expected "
                         f"int{s.bits} of {n} x {k}")


class QuantLinear(nn.Module):
    """y = x W^T with W packed (int8 or int4; lm_head on the CPU under int4: int6), dequantised inside the matmul
    (kernels/quant_matmul.py). Buffers `weight`, `weight_scale` and (asymmetric int4) `weight_zero` hold it,
    under the hub's names."""

    def __init__(self, linear: Linear, s: QuantSpec):
        super().__init__()
        self.split, self.spec = linear.split, s
        self.out_features, self.in_features = linear.weight.shape
        ws = dist.world_size()
        self.full_shape = (self.out_features * (ws if self.split == "col" else 1),
                           self.in_features * (ws if self.split == "row" else 1))  # before the rank's cut
        register_packed(self, "weight", s, (), self.out_features, self.in_features)
        self.register_buffer("cpu_weight", None)  # int4 on the CPU: the kernel's layout (repack_for_cpu)
        self.register_buffer("cpu_scale_offset", None)
        self.quantize_on_load = False  # lm_head: float in a quantized directory too, quantized here

    def set(self, p: Packed, device, where: str):
        check_packed(p, self.spec, self.out_features, self.in_features, where)
        self.weight, self.weight_scale, self.weight_zero = (
            None if t is None else t.to(device) for t in (p.data, p.scale, p.zero))

    def repack_for_cpu(self):
        p = None if self.weight is None else packed_of(self, "weight", self.spec, self.in_features)
        if p is not None and int4_fits(p) and p.data.device.type == "cpu":
            r = repack_int4(p)
            self.cpu_weight, self.cpu_scale_offset = r.data, r.scale_offset
            self.weight = self.weight_scale = self.weight_zero = None

    def packed(self) -> Packed | Int4Cpu:
        """The weight as the kernels read it."""
        if self.cpu_weight is not None:
            return Int4Cpu(self.cpu_weight, self.cpu_scale_offset, self.out_features, self.in_features,
                           self.spec.group)
        return packed_of(self, "weight", self.spec, self.in_features)

    def heads(self, x: torch.Tensor, n: int, row0: int, head_rows: int, transposed: bool) -> torch.Tensor:
        """MLA's absorbed fold (transposed: x [S, H, n] -> x W_h [S, H, in]) or unfold (x [S, H, in] -> W_h x
        [S, H, n]) over this weight's rows per head, W_h = rows row0 + h * head_rows + [0, n)
        (kernels/quant_cpu.py heads_cpu)."""
        w = self.packed()
        if torch.compiler.is_compiling() and isinstance(w, Packed) and x.device.type == "cpu":
            return torch.ops.dschat.heads_packed_cpu(x, w.data, w.scale, w.zero, w.bits, w.group, w.in_features, n,
                                                     row0, head_rows, transposed)
        return heads_cpu(x, w, n, row0, head_rows, transposed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpu_weight is not None:
            return matmul_cpu(x, self.packed())
        w = packed_of(self, "weight", self.spec, self.in_features)
        if x.device.type == "cpu":
            if torch.compiler.is_compiling():  # the kernel as an operator (kernels/ops.py): opaque to the tracer
                return torch.ops.dschat.matmul_packed_cpu(x, w.data, w.scale, w.zero, w.bits, w.group,
                                                          w.in_features)
            return matmul_cpu(x, w)
        return quant_matmul(x, w)

    def weight_loader(self, target: Target, t: torch.Tensor | Packed, scale: torch.Tensor | None,
                      ctx: LoadContext, where: str):
        """A whole float weight, quantized here (this rank's slice), or one already packed (read from a
        directory `dschat quantize` wrote), sliced for this rank."""
        if isinstance(t, Packed):
            self.set(shard(t, self.split, where), ctx.device, where)
            return
        if scale is not None:
            t = dequantize_fp8(t, scale, ctx.block)
        if tuple(t.shape) != self.full_shape:
            raise ModelError(f"{where} has shape {list(t.shape)}, expected {list(self.full_shape)}")
        self.set(quantize_for_rank(t, self.split, self.spec, where), ctx.device, where)
