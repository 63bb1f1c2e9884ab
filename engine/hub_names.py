"""The hub's tensor names against the model's parameter names. They are equal (`model.layers.3.self_attn.
kv_b_proj.weight`) except that V3's MTP layers, which the hub stores as `model.layers.{num_hidden_layers + i}`,
live in the model's `mtp.{i}`; and routed experts, one tensor per expert and projection on the hub, are
stacked per layer in the model (engine/moe.py's Experts: w13 = gate then up rows, w2 = down)."""

from __future__ import annotations

import torch
from torch import nn


def local_name(num_hidden_layers: int, hub_name: str) -> str:
    """Hub tensor name -> the model's parameter name."""
    if hub_name.startswith("model.layers."):
        layer, _, rest = hub_name[len("model.layers."):].partition(".")
        if layer.isdigit() and int(layer) >= num_hidden_layers:
            return f"mtp.{int(layer) - num_hidden_layers}.{rest}"
    return hub_name


def hub_name(num_hidden_layers: int, local: str) -> str:
    """The model's parameter name -> the hub's (the inverse of local_name)."""
    if local.startswith("mtp."):
        i, _, rest = local[4:].partition(".")
        return f"model.layers.{num_hidden_layers + int(i)}.{rest}"
    return local


def hub_tensors(model: nn.Module, num_hidden_layers: int) -> dict[str, torch.Tensor]:
    """Every weight of `model` under its hub name, routed experts one tensor per expert and projection, as a
    checkpoint holds them (the inverse of the loader; for training's checkpoints)."""
    out = {}
    for name, t in model.state_dict().items():
        prefix, _, attr = name.rpartition(".experts.")
        if attr not in ("w13", "w2"):
            out[hub_name(num_hidden_layers, name)] = t
            continue
        first = model.get_submodule(prefix).first
        for e, w in enumerate(t):
            stem = hub_name(num_hidden_layers, f"{prefix}.experts.{first + e}")
            if attr == "w2":
                out[f"{stem}.down_proj.weight"] = w
            else:
                gate, up = w.chunk(2)
                out[f"{stem}.gate_proj.weight"], out[f"{stem}.up_proj.weight"] = gate, up
    return out
