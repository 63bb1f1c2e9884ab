"""Sampling parameters and the choice of the next token: greedy, or temperature / top-k / top-p."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .dist import same_everywhere


# Below these, sampling is greedy: a temperature of 1e-40 divides logits into infinities, and a top_p under
# float32's smallest number keeps no token at all; both mean "the most likely token" anyway.
MIN_TEMPERATURE = 1e-4
MIN_TOP_P = 1e-6


@dataclass
class SamplingParams:
    """How one reply is sampled and when it stops (checked on construction)."""

    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no limit
    max_tokens: int = 256
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False  # run to max_tokens even past the model's end-of-sentence token

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")

    @property
    def greedy(self) -> bool:
        """Whether the most likely token is chosen: temperature 0, or a temperature or top_p below its floor."""
        return self.temperature < MIN_TEMPERATURE or self.top_p < MIN_TOP_P


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
