"""Rotary position embedding with YaRN's frequency correction, in DeepSeek's interleaved layout: the angles
(cos, sin) for positions; kernels/norm_rope.py rotates by them (apply_rope, and fused with the cache write)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig, yarn_mscale


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
