"""What one generation did: the one record the engine keeps current while it streams and the app reads."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class GenerationStats:
    """The figures of one generation, kept current while it streams (Generation.stats)."""

    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose latents came from the cache
    prefilled_tokens: int = 0  # prompt tokens run through the model so far (prompt - cached once prefilled)
    generated_tokens: int = 0
    forwards: int = 0  # forward passes of the main model after the prefill
    draft_tokens: int = 0
    accepted_tokens: int = 0
    prefill_s: float = 0.0  # prompt in, first token out
    decode_s: float = 0.0  # the rest, kept current while the reply streams
    drafter: str = "none"  # "mtp", "ngram" or "none": what drafted (engine.speculative)
    stop_reason: str | None = None  # "stop", "length", or None while running
    seed: int | None = None  # the sampler's seed (drawn when none was given): the same seed samples the same reply
    load: dict = field(default_factory=dict)  # the engine's load figures: weight_bytes, peak_host_bytes, ...

    @property
    def ttft_s(self) -> float:
        return self.prefill_s

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first per second of decoding."""
        return (self.generated_tokens - 1) / self.decode_s if self.generated_tokens > 1 and self.decode_s > 0 else 0.0

    @property
    def tokens_per_forward(self) -> float:
        """Tokens after the first per forward pass: 1 without speculation, more when drafts are accepted."""
        return (self.generated_tokens - 1) / self.forwards if self.forwards else 0.0

    def as_dict(self) -> dict:
        """Every figure (the fields, the load figures and the derived rates), floats rounded: the `--stats`
        line, saved timings."""
        d = asdict(self)
        d.update(d.pop("load"))
        d.update(ttft_s=self.ttft_s, decode_tokens_per_s=self.decode_tokens_per_s,
                 tokens_per_forward=self.tokens_per_forward)
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}
