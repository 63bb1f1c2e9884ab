"""config.json against the checkpoint's own tensor table, before anything is built or allocated from it.

A config whose sizes disagree with the weights (a hand-edited `num_hidden_layers`, the config of another
model beside these shards) would otherwise build a model of the wrong size, reserve a cache for it, read
every shard and only then fail on a missing or misshapen tensor. The shapes come from the shards' headers,
which the loader reads anyway; each disagreement is one line naming the field.
"""

from __future__ import annotations

import re

from .errors import ModelError

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.(\d+)\.")


def check_config(cfg, shapes: dict[str, list[int]], where: str):
    """shapes: hub tensor name -> shape, for every tensor of the checkpoint."""
    embed = shapes.get("model.embed_tokens.weight")
    if embed is not None and list(embed) != [cfg.vocab_size, cfg.hidden_size]:
        raise ModelError(f"{where}: config.json gives vocab_size {cfg.vocab_size} and hidden_size "
                         f"{cfg.hidden_size}, but model.embed_tokens.weight is {list(embed)}")
    layers = 1 + max((int(m[1]) for m in map(_LAYER.match, shapes) if m), default=-1)
    mtp = cfg.num_nextn_predict_layers
    if layers not in (cfg.num_hidden_layers, cfg.num_hidden_layers + mtp):
        said = f"{cfg.num_hidden_layers}" + (f" (+ {mtp} MTP)" if mtp else "")
        raise ModelError(f"{where}: config.json gives num_hidden_layers {said}, but the checkpoint holds "
                         f"{layers} layers")
    experts = 1 + max((int(m[1]) for m in map(_EXPERT.match, shapes) if m), default=-1)
    if experts != (cfg.n_routed_experts or 0):
        raise ModelError(f"{where}: config.json gives n_routed_experts {cfg.n_routed_experts}, but the "
                         f"checkpoint holds {experts} routed experts per layer")
