"""A stand-in for the Engine with no weights, for tests of the app (ChatSession, pipe mode, line mode, the TUI)
that run in milliseconds: it answers what was enqueued, as llm's MockModel does.

    engine = FakeEngine()                    # the demo model's real tokenizer; or FakeEngine(model_dir)
    engine.enqueue("Hello there")            # the next reply: its text's tokens, then end-of-sentence
    engine.enqueue("Cut", end=False)         # a reply without an end (it runs to max_tokens, or stops there)
    gen = engine.generate(prompt_ids, params)   # a real Generation: token ids, and its own GenerationStats
    engine.prompts, engine.params            # what each generate() was asked

A reply with nothing enqueued is the end-of-sentence token alone. The product never uses this."""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path

from dschat.engine import ContextLengthError, Generation, GenerationStats, SamplingParams, Tokenizer

DEMO_DIR = Path(__file__).resolve().parents[1] / "demo_model"


class FakeEngine:
    def __init__(self, model_dir: str | Path = DEMO_DIR, context_length: int = 4096, generation_config=None):
        self.path = Path(model_dir)
        self.tokenizer = Tokenizer.from_dir(self.path)
        self.context_length = context_length
        self.generation_config = dict(generation_config or {})
        self.eos_token_ids = (self.tokenizer.eos_token_id,)
        self.fingerprint, self.device, self.speculative, self.quant = "fake", "cpu", "none", None
        self.load_stats: dict = {}
        self.stats: GenerationStats | None = None
        self.prompts: list[list[int]] = []
        self.params: list[SamplingParams] = []
        self.delay = 0.0  # seconds before each token (a reply that streams slowly enough to stop)
        self._replies: deque[list[int]] = deque()

    def enqueue(self, reply: str | list[int], end: bool = True):
        """The next reply: a text (tokenized as plain text) or token ids, followed by end-of-sentence if `end`."""
        ids = self.tokenizer.encode_plain(reply) if isinstance(reply, str) else list(reply)
        self._replies.append(ids + (list(self.eos_token_ids[:1]) if end else []))

    def generate(self, ids: list[int], params: SamplingParams | None = None, reuse_cache: bool = True,
                 stop=None) -> Generation:
        params = params or SamplingParams()
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError("ids is empty")
        if len(ids) + params.max_tokens > self.context_length:
            raise ContextLengthError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                                     f"context window of {self.context_length} tokens")
        self.prompts.append(ids)
        self.params.append(params)
        reply = self._replies.popleft() if self._replies else list(self.eos_token_ids[:1])
        stats = GenerationStats(prompt_tokens=len(ids))
        return Generation(self._stream(reply, params, stats, stop), stats)

    def _stream(self, reply: list[int], params: SamplingParams, stats: GenerationStats, stop=None):
        self.stats = stats
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
        t0 = time.perf_counter()
        for n, token in enumerate(reply[: params.max_tokens], start=1):
            if self.delay:
                time.sleep(self.delay)
            if stop is not None and stop.is_set():  # as the engine: ended before its next forward pass
                return
            stats.generated_tokens, stats.forwards = n, n - 1
            stats.decode_s = time.perf_counter() - t0
            yield token
            if token in stops:
                stats.stop_reason = "stop"
                return
        if len(reply) >= params.max_tokens:
            stats.stop_reason = "length"

    def load_prefix(self, ids, directory=None, secret_file=None) -> int:
        return 0

    def save_prefix(self, ids, directory=None, cap_gb: float = 4.0, secret_file=None) -> int:
        return 0
