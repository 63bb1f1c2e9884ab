"""Speculative decoding: drafters propose tokens, one forward pass of the main model checks them all.

* MTP: DeepSeek-V3's multi-token-prediction module drafts t_{i+2} from the main model's final hidden
  state h_i (after the final norm, as vLLM and SGLang feed it) and the token t_{i+1}; chained K times.
* n-gram (prompt lookup): the continuation of the most recent earlier occurrence of the last n tokens,
  for models without MTP weights. Code edits and FIM copy their input, so this pays off there.

Verification keeps the output distribution exactly: greedy accepts the longest prefix of drafts that
match the main model's argmax; sampling uses speculative rejection sampling.
"""

from __future__ import annotations

import torch

from .sampling import Sampler, probabilities


def verify(drafts: list[int], draft_probs: list[torch.Tensor | None], logits: torch.Tensor,
           sampler: Sampler) -> tuple[int, int]:
    """logits [len(drafts) + 1, V]: the main model's logits after the last accepted token and after each
    draft. Returns (number of drafts accepted, the token that follows them).
    draft_probs[j] is the distribution d_j was drawn from, or None for a deterministic draft (n-gram)."""
    params = sampler.params
    for j, d in enumerate(drafts):
        if params.greedy:
            best = int(logits[j].argmax())
            if best != d:
                return j, best
            continue
        p = probabilities(logits[j], params)
        q = draft_probs[j]
        q_d = 1.0 if q is None else float(q[d])
        if sampler.uniform() * q_d < float(p[d]):  # accept with probability min(1, p/q)
            continue
        if q is None:
            residual = p.clone()
            residual[d] = 0.0
        else:
            residual = (p - q).clamp(min=0.0)
        if float(residual.sum()) <= 0:  # p == q: nothing to correct, any draw from p will do
            residual = p
        return j, sampler.draw(residual / residual.sum())
    return len(drafts), sampler(logits[len(drafts)])


class NgramDrafter:
    """Prompt lookup: index every n-gram (n = 1..max_n) of the context by the position that follows its
    most recent occurrence; propose the k tokens after the longest n-gram (at least min_n) that ends the
    context."""

    def __init__(self, k: int, max_n: int = 3, min_n: int = 2):
        self.k, self.max_n, self.min_n = k, max_n, min_n
        self.ctx: list[int] = []
        self.index: dict[tuple[int, ...], int] = {}

    def extend(self, tokens: list[int]):
        for t in tokens:
            j = len(self.ctx)  # t lands at position j: the n-grams ending at j-1 are followed by it
            for n in range(1, self.max_n + 1):
                if j - n >= 0:
                    self.index[tuple(self.ctx[j - n:j])] = j
            self.ctx.append(t)

    def propose(self) -> list[int]:
        L = len(self.ctx)
        for n in range(min(self.max_n, L), self.min_n - 1, -1):
            p = self.index.get(tuple(self.ctx[L - n:]))
            if p is not None:
                return self.ctx[p:p + self.k]
        return []
