"""One generation: the token ids it streams and its own statistics."""

from __future__ import annotations

from typing import Iterator

from .stats import GenerationStats


class Generation:
    """What `Engine.generate` returns: iterate it for the generated token ids as they come. `stats` is this
    generation's own GenerationStats, kept current while it streams (prompt and cached tokens are known once the
    first token is asked for) and complete once it has ended. `close()` ends it early, in the calling thread;
    the cache keeps the prompt and the tokens generated so far, as at the end."""

    def __init__(self, tokens: Iterator[int], stats: GenerationStats):
        self._tokens, self.stats = tokens, stats
        self.token_ids: list[int] = []  # generated so far

    def __iter__(self) -> "Generation":
        return self

    def __next__(self) -> int:
        token = next(self._tokens)
        self.token_ids.append(token)
        return token

    def close(self):
        self._tokens.close()

    @property
    def done(self) -> bool:
        """It ended at a stop token or at max_tokens (a generation closed early is not done)."""
        return self.stats.stop_reason is not None
