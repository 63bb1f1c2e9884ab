"""Sampling parameters and the choice of the next token: greedy, or temperature / top-k / top-p."""

from __future__ import annotations

import torch

from .dist import same_everywhere
from .params import MIN_TEMPERATURE, MIN_TOP_P, SamplingParams  # noqa: F401  (torch-free, see params.py)


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution the sampler draws from: softmax(logits / T) restricted to top-k and top-p,
    renormalised. logits [..., V] float32 -> probs [..., V] float32."""
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of the tokens ranked above each one
        sorted_p = sorted_p.masked_fill(before >= params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


class Sampler:
    """Chooses tokens for one generation; seeded, so the same seed gives the same tokens."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.gen = torch.Generator(device="cpu")
        # the given seed, else a fresh one (under tensor parallelism rank 0's, so every rank draws the same tokens)
        self.seed = params.seed if params.seed is not None else same_everywhere(self.gen.seed() % 2**63)
        self.gen.manual_seed(self.seed)

    def __call__(self, logits: torch.Tensor) -> int:
        """logits [V] -> token id."""
        if self.params.greedy:
            return int(logits.argmax())
        return self.draw(probabilities(logits, self.params))

    def draw(self, probs: torch.Tensor) -> int:
        return int(torch.multinomial(probs.detach().float().cpu(), 1, generator=self.gen))

    def uniform(self) -> float:
        return float(torch.rand((), generator=self.gen))
