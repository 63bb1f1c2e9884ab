"""What one forward pass knows besides its tokens: where it reads and writes the latent cache (Step) and its
positions' rotary angles and mask (Positions), computed once and handed to every layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Step:
    """Where one cached forward pass (one sequence) reads and writes the latent cache.

    positions: [S] positions of the new tokens, contiguous, ending at T-1.
    slots:     [T] flat cache slot of every position 0..T-1 (pages need not be contiguous).
    cache:     per-layer latent buffers [num_slots, kv_lora_rank + qk_rope_head_dim].
    absorb:    attend absorbed over the latent rows (short chunks) rather than materialising K/V.

    The static decode step (engine/static.py) gives no `slots`: its sequence is a fixed-size page table,
    whose every slot is `table_slots` [max_pages * page_size] (computed on the device once a step); the new
    rows go to `write_slots` [S], and attention reads the keys 0..positions[-1] of the table.
    """

    positions: torch.Tensor
    slots: torch.Tensor | None
    cache: list[torch.Tensor]
    absorb: bool = True
    table_slots: torch.Tensor | None = None
    write_slots: torch.Tensor | None = None


@dataclass
class Positions:
    """What every layer needs to know about the positions of one forward pass, computed once:
    rotary cos/sin [S, dr/2] and the causal mask [S, T] (None: plain causal attention, S = T)."""

    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None


def causal_mask(q_pos: torch.Tensor, n_keys: int) -> torch.Tensor:
    """[S, T] boolean: query at position p sees keys 0..p."""
    return torch.arange(n_keys, device=q_pos.device)[None, :] <= q_pos[:, None]
