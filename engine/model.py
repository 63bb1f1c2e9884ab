"""The DeepSeek-V2 / V3 transformer as a list of blocks: embedding, decoder blocks (MLA attention, then a
dense MLP or DeepSeekMoE), final norm and lm_head, and V3's MTP module. The parts: engine/layers/ (linear,
norm, embedding, rotary, MLP), engine/mla.py, engine/moe.py; the hub-name mapping: engine/hub_names.py.

Parameter names are the hub's (`model.layers.3.self_attn.kv_b_proj.weight`), so a checkpoint loads 1:1.
"""

from __future__ import annotations

import torch
from torch import nn

from . import dist, hub_names
from .config import ModelConfig
from .layers.embedding import Embedding
from .layers.linear import Linear
from .layers.mlp import DenseMLP
from .layers.norm import RMSNorm
from .layers.rotary import Rotary
from .mla import MLA
from .moe import MoE
from .step import Positions, Step, causal_mask


class Block(nn.Module):
    """One decoder layer: h + attention(norm(h)), then + MLP or MoE (by cfg.is_moe_layer) of norm(h)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = MLA(cfg)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer) else DenseMLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, pos: Positions, cache=None, step=None):
        h, out = self.run(h, None, pos, cache, step)
        return h + out

    def run(self, h, pending, pos: Positions, cache=None, step=None):
        """The block with the residual add left pending: (h + pending, what this block adds to that). The
        next block adds it inside its first norm (one kernel on CUDA: kernels/norm_rope.py); the additions
        and their order are forward's."""
        h, x = self.input_layernorm.add(h, pending)
        h, x = self.post_attention_layernorm.add(h, self.self_attn(x, pos, cache, step))
        return h, self.mlp(x)


class SharedHead(nn.Module):
    """The MTP module's own final norm and lm_head (the hub's `shared_head`)."""

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
    (hub: model.layers.{num_hidden_layers + i}); see engine/hub_names.py."""

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
        return hub_names.local_name(self.cfg.num_hidden_layers, hub_name)

    def hub_name(self, local: str) -> str:
        """This module's parameter name -> the hub's (the inverse of local_name)."""
        return hub_names.hub_name(self.cfg.num_hidden_layers, local)

    def hub_tensors(self) -> dict[str, torch.Tensor]:
        """Every weight under its hub name, as a checkpoint holds them (for training's checkpoints)."""
        return hub_names.hub_tensors(self, self.cfg.num_hidden_layers)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, step: Step | None = None) -> torch.Tensor:
        """ids [B,S] -> final hidden states before the last norm, [B,S,hidden]."""
        h = self.model.embed_tokens(ids)
        pos = self.positions(positions, step)
        pending = None
        for i, block in enumerate(self.model.layers):
            h, pending = block.run(h, pending, pos, step.cache[i] if step else None, step)
        return h + pending

    def positions(self, positions: torch.Tensor, step: Step | None) -> Positions:
        cos, sin = self.rotary(positions)
        mask = causal_mask(positions, step.slots.numel()) if step is not None and not step.absorb else None
        return Positions(cos, sin, mask)  # absorbed attention masks by position inside its kernel

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
