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
    """Chooses tokens for one generation; seeded, so the same seed gives the same tokens. Its generator lives on
    `device` (the logits' device), so that a token is drawn where the logits are: on the CPU the draws are
    exactly those of a CPU generator, as before."""

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu"):
        self.params = params
        self.gen = torch.Generator(device="cpu")
        # the given seed, else a fresh one (under tensor parallelism rank 0's, so every rank draws the same tokens)
        self.seed = params.seed if params.seed is not None else same_everywhere(self.gen.seed() % 2**63)
        if torch.device(device).type != "cpu":
            self.gen = torch.Generator(device=device)
        self.gen.manual_seed(self.seed)

    def __call__(self, logits: torch.Tensor) -> int:
        """logits [V] -> token id."""
        return int(self.sample(logits))

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [V] -> the token id as a device tensor [] (int64): nothing is read on the host."""
        if self.params.greedy:
            return logits.argmax()
        return self._multinomial(probabilities(logits, self.params))

    def _multinomial(self, probs: torch.Tensor) -> torch.Tensor:
        probs = probs.detach().float()
        if probs.device != self.gen.device:
            probs = probs.to(self.gen.device)
        return torch.multinomial(probs, 1, generator=self.gen)[0]

    def draw(self, probs: torch.Tensor) -> int:
        return int(self._multinomial(probs))

    def draw_tensor(self, probs: torch.Tensor) -> torch.Tensor:
        """A draw from probs, as a tensor [] on probs' device (nothing read on the host)."""
        return self._multinomial(probs).to(probs.device)
