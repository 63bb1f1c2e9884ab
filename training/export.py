"""Writing the model in the hub layout: config.json, bf16 safetensors shards with their index, the tokenizer
files, generation_config.json and SHA256SUMS. The directory is written beside its destination and then moved
into place, so an interrupted export never leaves a half-written model."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from dschat.engine.model import Transformer

from .tokens import tokenizer_config

MAX_SHARD_BYTES = 14 * 2**20
GENERATION = {"do_sample": True, "temperature": 0.3, "top_p": 0.95, "max_new_tokens": 256}


def hub_tensors(model: Transformer):
    """(hub name, tensor as stored): bf16, the router's bias in float32; without the MTP layer's embedding and
    head, which it shares with the main model (the loader links them)."""
    for name, p in model.hub_tensors().items():
        if name.startswith("model.layers.") and name.endswith(("shared_head.head.weight", "embed_tokens.weight")):
            continue
        yield name, p.detach().to(torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16)


def shipped_bytes(model: Transformer) -> int:
    return sum(t.numel() * t.element_size() for _, t in hub_tensors(model))


def shards(tensors: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    out, cur, size = [], {}, 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if cur and size + nbytes > MAX_SHARD_BYTES:
            out.append(cur)
            cur, size = {}, 0
        cur[name] = tensors[name]
        size += nbytes
    return out + [cur]


def write_json(path: Path, obj):
    """Atomically: a temporary file beside it, then renamed over it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_model(model: Transformer, tk, cfg_dict: dict, out: Path):
    """The hub layout in `out` (a new directory)."""
    tensors = {n: t.to("cpu").contiguous() for n, t in hub_tensors(model)}
    parts = shards(tensors)
    weight_map, sums = {}, []
    for k, part in enumerate(parts):
        fname = f"model-{k + 1:05d}-of-{len(parts):05d}.safetensors"
        save_file(part, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
        sums.append(f"{hashlib.sha256((out / fname).read_bytes()).hexdigest()}  {fname}\n")
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    write_json(out / "config.json", cfg_dict)
    tk.save(str(out / "tokenizer.json"))
    write_json(out / "tokenizer_config.json", tokenizer_config())
    write_json(out / "generation_config.json", {"bos_token_id": cfg_dict["bos_token_id"],
                                                "eos_token_id": cfg_dict["eos_token_id"], **GENERATION})
    (out / "SHA256SUMS").write_text("".join(sums))


def export(model: Transformer, tk, cfg_dict: dict, out: Path, report: dict):
    """Write everything to a sibling directory, then swap it in for `out`."""
    out = Path(out)
    tmp, old = out.with_name(out.name + ".new"), out.with_name(out.name + ".old")
    for d in (tmp, old):
        shutil.rmtree(d, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_model(model, tk, cfg_dict, tmp)
    write_json(tmp / "training_report.json", report)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
