"""Tensor parallelism in a few functions: which rank am I, how many are we, sum (or gather) across us.

Attention heads, dense/shared MLP columns and routed experts are split over ranks; the partial outputs of
`o_proj`, the MLPs and the MoE are summed with `all_reduce`. With one process these are no-ops.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        dist.all_reduce(x)
    return x


def all_gather_last(x: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's slice of the last dimension (the vocabulary of lm_head)."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


def same_everywhere(value: int) -> int:
    """Rank 0's value on every rank (a random sampling seed, so that all ranks choose the same tokens)."""
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(t, src=0)
    return int(t.item())


def split(n: int, what: str) -> int:
    """This rank's share of n (heads, columns, experts, vocabulary)."""
    ws = world_size()
    if n % ws:
        raise ValueError(f"{what} ({n}) is not divisible by the number of ranks ({ws})")
    return n // ws
