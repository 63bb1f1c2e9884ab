"""Load a checkpoint into the model, in named phases (as gpt-fast's _load_model):

1. `open_checkpoint`   the shards' headers checked, config.json checked against the tensors' shapes;
2. `build_on_meta`     the model built on the meta device: nothing allocated yet;
3. `swap_quantized`    under int8 / int4, the packed modules in place of the Linear layers and expert stacks;
4. `load_weights`      each tensor read from its memory-mapped shard and handed to the weight loader of the
                       module that holds it (engine/layers/weights.py): that loader takes this rank's slice
                       (tensor parallelism), keeps FP8 or dequantises it, quantizes, and puts it on the device
                       in the model's dtype; host memory holds one tensor beyond the model (read, not mapped:
                       engine/checkpoint.py), a large one quantized in blocks of rows;
5. `tie_weights`       weights the checkpoint leaves out because they are shared (lm_head, the MTP module's
                       embedding and head);
6. `check_complete`    a tensor that never arrived is named;
7. `place_for_device`  packed int4 weights on the CPU repacked into the CPU kernel's layout, and a CPU model's
                       weights moved into transparent huge pages (engine/hugepages.py).

Progress is reported through a callback, (bytes done, bytes total); the engine draws nothing.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..kernels import quant_cpu
from ..kernels.fp8_matmul import dequantize_fp8

from . import hugepages, quant
from .checkpoint import Checkpoint
from .config import ModelConfig
from .config_check import check_config
from .errors import ModelError
from .layers.weights import LoadContext, Target, set_tensor
from .model import Transformer
from .moe import MoE

Progress = Callable[[int, int], None]  # (bytes done, bytes total)

_EXPERT = re.compile(r"^(.+)\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")


class Placer:
    """Finds where each checkpoint tensor goes in a model built on the meta device (`target`) and hands it to
    that module's weight loader (`put`), dequantising FP8 first unless the load keeps FP8."""

    def __init__(self, model: Transformer, device: torch.device, dtype: torch.dtype, block: tuple[int, int],
                 keep_fp8: bool):
        self.model = model
        self.ctx = LoadContext(device, dtype, block, keep_fp8)
        self.wanted = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}

    def target(self, local: str) -> Target | None:
        """Where the tensor of this local name goes: the module and the name it loads under (for a routed
        expert, its stack, index and projection). None for a tensor this model or this rank does not hold."""
        m = _EXPERT.match(local)
        if m is None:
            if local not in self.wanted:
                return None
            module, _, name = local.rpartition(".")
            return Target(self.model.get_submodule(module), name)
        try:
            moe = self.model.get_submodule(m[1])
        except AttributeError:  # a layer this model does not build (MTP when it is off)
            return None
        return moe.expert_target(int(m[2]), m[3]) if isinstance(moe, MoE) else None

    def put(self, target: Target, t: torch.Tensor | quant.Packed, scale: torch.Tensor | None, where: str):
        if scale is not None and not self.ctx.keep_fp8:
            t, scale = dequantize_fp8(t, scale, self.ctx.block), None
        target.load(t, scale, self.ctx, where)

    def missing(self) -> str | None:
        """The local name of a tensor that never arrived, if any."""
        for name, mod in self.model.named_modules():
            gone = mod.missing() if hasattr(mod, "missing") else None
            if gone is not None:
                first = self.model.get_submodule(name.rpartition(".")[0]).first
                return f"{name}.{first + gone[0]}.{gone[1]}_proj.weight"
        return next(iter(_still_meta(self.model)), None)


# -- the phases ---------------------------------------------------------------------------------------------
def open_checkpoint(root: Path, cfg: ModelConfig) -> Checkpoint:
    ckpt = Checkpoint(root)
    check_config(cfg, ckpt.shapes, str(root))
    return ckpt


def build_on_meta(cfg: ModelConfig, with_mtp: bool) -> Transformer:
    with torch.device("meta"):
        return Transformer(cfg, with_mtp=with_mtp)


def swap_quantized(model: Transformer, spec: quant.QuantSpec | None, device: torch.device):
    """The packed modules where `spec` quantizes; on the CPU lm_head too (quant.head_spec) unless it is tied,
    and MLA's kv_b_proj where dschat's CPU kernels run (quant.kv_b_spec: the absorbed attention reads it packed
    only through them)."""
    if spec is not None:
        cpu = device.type == "cpu"
        head = quant.head_spec(spec) if cpu and not model.cfg.tie_word_embeddings else None
        kv_b = quant.kv_b_spec(spec) if cpu and quant_cpu.native_gemv() else None
        quant.convert(model, spec, head, kv_b)


def load_weights(model: Transformer, ckpt: Checkpoint, placer: Placer, progress: Progress):
    """Every tensor this rank holds, shard by shard, through its module's weight loader."""
    cfg, total, done = model.cfg, ckpt.total_bytes(), 0
    for shard, names in ckpt.by_file().items():
        for name in names:
            skip = name.endswith(("_scale_inv",) + quant.COMPANIONS)
            target = None if skip else placer.target(model.local_name(name))
            if target is None:
                continue
            t = ckpt.get(name)
            done += t.numel() * t.element_size()
            scale = None
            where = f"{shard}: tensor {name!r}"
            if t.dtype == torch.float8_e4m3fn:
                if name + "_scale_inv" not in ckpt:
                    raise ModelError(f"{shard}: FP8 tensor {name!r} has no {name + '_scale_inv'!r}")
                scale = ckpt.get(name + "_scale_inv")
            elif cfg.weight_quant is not None or not t.is_floating_point():
                t = _packed(ckpt, name, t, target, cfg, where)
            placer.put(target, t, scale, where)
            progress(min(done, total), total)
        ckpt.close()  # the shard just read


def tie_weights(model: Transformer):
    """Tied or shared weights the checkpoint leaves out: lm_head = the embedding (tie_word_embeddings), and
    the MTP module's embedding and head = the main model's."""
    if "lm_head.weight" in _still_meta(model) and model.cfg.tie_word_embeddings:
        set_tensor(model.lm_head, "weight", model.model.embed_tokens.weight)
    for m in model.mtp:
        if m.embed_tokens.weight.is_meta:
            set_tensor(m.embed_tokens, "weight", model.model.embed_tokens.weight)
        if isinstance(model.lm_head, quant.QuantLinear) and not isinstance(m.shared_head.head, quant.QuantLinear) \
                and m.shared_head.head.weight.is_meta:
            m.shared_head.head = model.lm_head
        elif m.shared_head.head.weight.is_meta:
            set_tensor(m.shared_head.head, "weight", model.lm_head.weight)


def check_complete(model: Transformer, placer: Placer, root: Path):
    missing = placer.missing()
    if missing:
        raise ModelError(f"{root}: tensor {model.hub_name(missing)!r} is missing from the checkpoint")


def place_for_device(model: Transformer, device: torch.device):
    quant.repack_for_cpu(model)
    model.huge_page_bytes = hugepages.move(model) if device.type == "cpu" else 0


def load_model(root: Path, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, with_mtp: bool = True,
               progress: Progress | None = None, fp8: str = "dequant",
               quantize: quant.QuantSpec | None = None) -> Transformer:
    """The model of the checkpoint in `root`, loaded. fp8: "dequant" turns FP8 block weights into `dtype` on
    load; "keep" stores them as FP8 with their scales (half the memory of bf16) and dequantises each one when
    it is used. quantize: int8 / int4 the weights engine/quant.py names, one tensor at a time as they are read
    (a directory written by `dschat quantize` says so in its config and loads packed). progress: called with
    (bytes done, bytes total) as tensors arrive."""
    progress = progress or (lambda done, total: None)
    ckpt = open_checkpoint(root, cfg)
    model = build_on_meta(cfg, with_mtp)
    swap_quantized(model, quantize, device)
    placer = Placer(model, device, dtype, tuple(cfg.fp8_block_size or (128, 128)), fp8 == "keep")
    try:
        load_weights(model, ckpt, placer, progress)
        tie_weights(model)
        check_complete(model, placer, root)
        place_for_device(model, device)
        total = ckpt.total_bytes()
        progress(total, total)
    finally:
        ckpt.close()
    return model.eval()


def _packed(ckpt: Checkpoint, name: str, t: torch.Tensor, target: Target, cfg: ModelConfig, where: str):
    """In a directory `dschat quantize` wrote, the packed form of a weight that runs packed (checked against
    its config); integers anywhere else are an error."""
    packs = quant.packing(target) if cfg.weight_quant is not None else None
    if packs is not None and not (t.is_floating_point() and getattr(packs, "quantize_on_load", False)):
        return quant.read_packed(name, t, lambda n: ckpt.get(n) if n in ckpt else None, packs, target, where)
    if not t.is_floating_point():
        raise ModelError(f"{where} holds {t.dtype} values, but config.json says nothing of a quantization")
    return t


def _still_meta(model: nn.Module) -> list[str]:
    return [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
