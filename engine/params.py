"""How one reply is sampled and when it stops: plain data, importable without torch (a client of a running
`dschat serve` builds them without loading PyTorch)."""

from __future__ import annotations

from dataclasses import dataclass


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
