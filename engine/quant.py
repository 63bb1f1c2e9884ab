"""Weight-only int8 / int4 quantization: which weights are packed, the model converted to hold them (before
loading), a packed directory's tensors checked. How a weight is quantized and the Linear that runs it:
engine/layers/quant_linear.py; the packed expert stacks: engine/moe.py.

* int8: symmetric, one scale per output channel.
* int4: groups of 128 input features, each with a scale and a zero point (asymmetric: measured against
  symmetric on the demo model by benchmarks/bench_quant.py, asymmetric keeps more quality). Input features
  that are not a multiple of the group size are padded with zeros.
* Quantized: the attention projections (kv_b_proj on the CPU only, see below), the dense MLPs and the routed
  and shared experts, in the main layers and the MTP layer. Embeddings, norms, the router and the MTP
  module's own projections stay in the model's dtype; so does lm_head, except on the CPU, where it is
  quantized as it loads (`head_spec`: int8 under int8, six bits in groups of 64 under int4 where dschat's
  kernels run: it is the largest single weight a decode step reads, 0.84 GB of V2-Lite's in float32;
  llama.cpp keeps it at 6 bits). `dschat quantize` stores it as is.
* MLA's kv_b_proj is quantized as it loads on the CPU where dschat's CPU kernels run (`kv_b_spec`: int8 under
  --quant int8, int4 under int4 where its groups fit the kernel): the absorbed attention folds and unfolds it per
  head straight from the packed bytes (kernels/cpu_gemv.cpp `dschat_heads_gemv`, `_t`), the materialised path
  (prefill) runs it as any packed Linear. `dschat quantize` stores it as is (float), so a saved directory is the
  same either way and loads anywhere; the GPU, and a CPU without the kernels, keep it in the model's dtype.
* On the CPU the weights run through dschat's own kernels (kernels/cpu_gemv.py) where they are built, else
  PyTorch's packed kernels (kernels/quant_cpu.py), for which int4 is repacked once, after loading
  (`repack_for_cpu`).
* Weights are quantized one tensor at a time as the loader reads them (engine/loader.py), or once by
  `dschat quantize` into a directory that says how (`quantization_config` with quant_method "dschat").
The packed format and the kernels live in kernels/ (quant_format.py, quant_matmul.py).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..kernels import cpu_gemv, quant_cpu
from ..kernels.quant_format import Packed

from .errors import ModelError
from .layers.linear import Linear
from .layers.quant_linear import GROUP, QuantLinear, QuantSpec, packed_layout
from .layers.quant_linear import quantize  # noqa: F401 (the quantization API: tests, benchmarks, quantize)
from .layers.weights import Target
from .moe import Experts, QuantExperts

QUANTS = ("int8", "int4")
# Module paths (hub names without ".weight") of the linear layers that are quantized.
_QUANTIZED = re.compile(r"\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|o_proj)"
                        r"|mlp\.(experts\.\d+\.|shared_experts\.)?(gate_proj|up_proj|down_proj))$")
COMPANIONS = ("weight_scale", "weight_zero")  # tensors stored beside a packed "weight"
MAX_SCALE = 1e4  # a stored scale above this (weights past 1e5 or 1e6 in size) is damage, not a model


HEAD = QuantSpec(bits=8)  # lm_head on the CPU under --quant int8 (and int4 where dschat's kernels do not run)
HEAD_INT6 = QuantSpec(bits=6, group=64, symmetric=True)  # lm_head on the CPU under --quant int4, with them


def head_spec(s: QuantSpec | None) -> QuantSpec | None:
    """How lm_head is packed on the CPU under `s`: int8 under int8; under int4 six bits where dschat's CPU kernel
    runs (llama.cpp's Q4_0 keeps it at 6 bits too: 170 MB of V2-Lite's instead of 210; quality measured by
    bench_quant in docs/benchmarks.md), else int8. None: no quantization."""
    if s is None:
        return None
    return HEAD_INT6 if s.bits == 4 and quant_cpu.native_gemv() else HEAD
KV_B = re.compile(r"\.self_attn\.kv_b_proj$")  # MLA's kv_b_proj (main layers and MTP): packed on the CPU


def kv_b_spec(s: QuantSpec | None) -> QuantSpec | None:
    """How kv_b_proj is packed under `s` (bench_quant.py measured the quality of each): as `s` under int4 where
    the CPU kernel takes its groups (cpu_gemv.fits's rule), else int8. None: no quantization."""
    if s is None:
        return None
    return s if s.bits == 4 and s.group % (2 * cpu_gemv.QK) == 0 else QuantSpec(bits=8)


def spec(name: str | None) -> QuantSpec | None:
    """"int8" / "int4" (None: no quantization)."""
    if name is None:
        return None
    if name not in QUANTS:
        raise ValueError(f"unknown quantization {name!r} (use {' or '.join(QUANTS)})")
    return QuantSpec(bits=8) if name == "int8" else QuantSpec(bits=4)


def saved_spec(qc: dict, where) -> QuantSpec:
    """The spec a quantized directory's `quantization_config` describes."""
    bits, group = qc.get("bits"), qc.get("group_size", 0)
    if bits not in (4, 8) or not isinstance(group, int) or (bits == 4 and (group <= 0 or group % 2)):
        raise ModelError(f"{where}: quantization_config has bits {bits!r} and group_size {group!r}; "
                         "expected bits 8, or bits 4 with an even group_size")
    return QuantSpec(bits=bits, group=group if bits == 4 else GROUP, symmetric=bool(qc.get("symmetric")))


def is_quantized(module_path: str) -> bool:
    """Whether the linear layer at this module path (hub or local name, no ".weight") is quantized."""
    return bool(_QUANTIZED.search("." + module_path))


def convert(model: nn.Module, s: QuantSpec, head: QuantSpec | None = None, kv_b: QuantSpec | None = None):
    """Replace the model's quantized Linear layers and routed expert stacks by empty packed ones (before
    loading); `head`: lm_head too, `kv_b`: MLA's kv_b_proj too, each quantized this way as it loads."""
    for n, m in list(model.named_modules()):
        parent, _, attr = n.rpartition(".")
        if isinstance(m, Linear) and is_quantized(n):
            setattr(model.get_submodule(parent), attr, QuantLinear(m, s))
        elif isinstance(m, Linear) and ((n == "lm_head" and head is not None)
                                        or (KV_B.search("." + n) and kv_b is not None)):
            q = QuantLinear(m, head if n == "lm_head" else kv_b)
            q.quantize_on_load = True  # float in a saved directory too (`dschat quantize` stores it as is)
            setattr(model.get_submodule(parent) if parent else model, attr, q)
        elif isinstance(m, Experts):
            E, I2, H = m.w13.shape
            setattr(model.get_submodule(parent), attr, QuantExperts(E, H, I2 // 2, s))


def repack_for_cpu(model: nn.Module):
    """After loading: int4 weights held on the CPU into the CPU kernel's layout (kernels/quant_cpu.py), one
    module at a time (host memory holds one module's weights twice at most)."""
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantExperts)):
            m.repack_for_cpu()


def packing(target: Target) -> QuantLinear | QuantExperts | None:
    """The module that packs the weight the loader's `target` names, if any."""
    m = target.module
    return m if isinstance(m, QuantExperts) or (isinstance(m, QuantLinear) and target.name == "weight") else None


def read_packed(name: str, data: torch.Tensor, get, into: QuantLinear | QuantExperts, target: Target,
                where: str) -> Packed:
    """A packed weight as `dschat quantize` stored it (`name` and its companions, read with get(name) ->
    tensor or None), checked against what the config promises: bits, group size, shapes."""
    s = into.spec
    if isinstance(into, QuantExperts):
        n, k = (into.dim, into.inter) if target.name == "down" else (into.inter, into.dim)
    else:
        n, k = into.full_shape
    tensors = {"": data, "_scale": get(name + "_scale"), "_zero": get(name + "_zero")}
    for suffix, want in packed_layout(s, n, k).items():
        t = tensors[suffix]
        if (want is None and t is None) or (t is not None and (t.dtype, tuple(t.shape)) == want):
            continue
        what = "missing" if t is None else f"{t.dtype} {list(t.shape)}"
        expect = "absent" if want is None else f"{want[0]} {list(want[1])}"
        raise ModelError(f"{where}: tensor {name + suffix!r} is {what}, but config.json's quantization "
                         f"(int{s.bits}{'' if s.bits == 8 else f', group {s.group}'}) needs {expect}")
    scale, zero = tensors["_scale"], tensors["_zero"]
    if not (torch.isfinite(scale).all() and (scale > 0).all() and (scale <= MAX_SCALE).all()):
        bad = scale[~(torch.isfinite(scale) & (scale > 0) & (scale <= MAX_SCALE))].flatten()[0].item()
        raise ModelError(f"{where}: tensor {name + '_scale'!r} holds {bad}; scales must be finite, above 0 and at "
                         f"most {MAX_SCALE:g}")
    if zero is not None and (zero > 15).any():
        raise ModelError(f"{where}: tensor {name + '_zero'!r} holds {int(zero.max())}; int4 zero points are 0 to 15")
    return Packed(data, tensors["_scale"], tensors["_zero"], s.bits, s.group if s.bits != 8 else 0, k)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (packed weights at their packed size)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights one decoded token reads: every weight of the main model, the routed experts at
    k/E of their stacks, one row of the embeddings (MTP layers left out; the latent cache too)."""
    cfg = model.cfg
    total = 0
    for name, m in model.named_modules():
        if name.startswith("mtp"):
            continue
        own = [t for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)) if t is not None]
        b = sum(t.numel() * t.element_size() for t in own)
        if isinstance(m, (Experts, QuantExperts)) and cfg.n_routed_experts:
            b = b * cfg.num_experts_per_tok // cfg.n_routed_experts
        elif name.endswith("embed_tokens") and own:
            b = b // own[0].shape[0]
        total += b
    return total
