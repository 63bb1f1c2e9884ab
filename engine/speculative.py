"""Speculative decoding: drafters propose tokens, one forward pass of the main model checks them all.

* MTP: DeepSeek-V3's multi-token-prediction module drafts t_{i+2} from the main model's final hidden
  state h_i (after the final norm, as vLLM and SGLang feed it) and the token t_{i+1}; chained K times.
* n-gram (prompt lookup): the continuation of the most recent earlier occurrence of the last n tokens,
  for models without MTP weights. Code edits and FIM copy their input, so this pays off there.

Verification keeps the output distribution exactly: greedy accepts the longest prefix of drafts that
match the main model's argmax; sampling uses speculative rejection sampling.

Every drafter has one interface, which Engine._generate drives:
    start(prompt, h)            after the prefill (h: the main model's states of the prompt's new positions)
    propose(token, room)        -> (drafts, draft_probs): up to `room` tokens to follow `token` (a host list,
                                   or MTP's device tensor, read with the verification: verify_on_device)
    accept(drafts_ok, h)        after verification: the drafts kept, h the states of token + drafts_ok
    finish(last)                after the last token, before the sequence is cached
    whole(length)               how many cached positions hold every row the drafter needs
"""

from __future__ import annotations

from typing import Callable

import torch

from .sampling import Sampler, probabilities


def verify(drafts: list[int], draft_probs: list[torch.Tensor | None], logits: torch.Tensor,
           sampler: Sampler, argmax: torch.Tensor | None = None) -> tuple[int, int]:
    """logits [len(drafts) + 1, V]: the main model's logits after the last accepted token and after each
    draft. Returns (number of drafts accepted, the token that follows them).
    draft_probs[j] is the distribution d_j was drawn from, or None for a deterministic draft (n-gram).
    argmax: the logits' argmax per row where the step computed it (greedy reads it once, not row by row).
    Sampling decides every draft on the device and the host reads the outcome once (`verify_sampled`)."""
    params = sampler.params
    if params.greedy:
        best = (argmax if argmax is not None else logits[: len(drafts) + 1].argmax(dim=-1)).tolist()
        n = next((j for j, d in enumerate(drafts) if best[j] != d), len(drafts))
        return n, best[n]
    n_ok, token = verify_sampled(drafts, draft_probs, logits, sampler).tolist()
    return n_ok, token


def verify_on_device(drafts: torch.Tensor, draft_probs: list[torch.Tensor | None], logits: torch.Tensor,
                     sampler: Sampler, argmax: torch.Tensor | None = None) -> tuple[int, int, list[int]]:
    """`verify` for drafts that are still on the device (MTP's, drafts [n] int64): every draft is decided there
    and the host reads the drafts with the outcome in one read. Returns (drafts accepted, the token that
    follows them, the drafts)."""
    n = drafts.numel()
    if sampler.params.greedy:
        best = argmax if argmax is not None else logits[: n + 1].argmax(dim=-1)
        kept = (best[:n] == drafts).long().cumprod(0).sum()  # drafts up to the first the model disagrees with
        outcome = torch.cat([kept.view(1), best.index_select(0, kept.view(1))])  # (best[kept] would read kept)
    else:
        outcome = verify_sampled(drafts, draft_probs, logits, sampler)
    read = torch.cat([drafts.to(outcome.device), outcome]).tolist()
    return read[n], read[n + 1], read[:n]


def verify_sampled(drafts: list[int] | torch.Tensor, draft_probs: list[torch.Tensor | None], logits: torch.Tensor,
                   sampler: Sampler) -> torch.Tensor:
    """Speculative rejection sampling of all drafts at once, on the logits' device: [drafts kept, next token].

    Draft j is kept with probability min(1, p_j(d_j) / q_j(d_j)) (q = 1 at d_j for a deterministic draft), by
    its own uniform u_j; the first draft rejected ends the run, and the token that follows is drawn from
    the residual max(p_j - q_j, 0) renormalised there (p_j without d_j for a deterministic draft; p_j itself
    where the residual is empty), or from the last row's p after every draft was kept. Each u_j and the
    final draw are independent, so drawing all the uniforms up front (the ones after a rejection unused)
    keeps the distribution of the one-draft-at-a-time loop; nothing is read on the host meanwhile."""
    n, dev = len(drafts), logits.device
    if n == 0:
        return torch.stack([torch.zeros((), dtype=torch.long, device=dev), sampler.sample(logits[0]).to(dev)])
    p = probabilities(logits[: n + 1], sampler.params)  # [n+1, V]
    d = drafts.to(dev) if isinstance(drafts, torch.Tensor) else \
        torch.tensor(drafts, dtype=torch.long).to(dev, non_blocking=True)
    rows = torch.arange(n, device=dev)
    p_d = p[rows, d]
    if all(q is None for q in draft_probs):
        q_d = torch.ones_like(p_d)
        residual = p[:n].index_put((rows, d), torch.zeros((), device=dev))
    else:  # a sampled drafter gives every q (a deterministic one none)
        q = torch.stack([x.to(dev, torch.float32) if x is not None
                         else torch.zeros_like(p[0]).index_fill_(0, d[j:j + 1], 1.0)
                         for j, x in enumerate(draft_probs)])
        q_d = q[rows, d]
        residual = (p[:n] - q).clamp(min=0.0)
    u = torch.rand(n, generator=sampler.gen, device=sampler.gen.device).to(dev)
    kept = (u * q_d < p_d).long().cumprod(0).sum()  # drafts up to the first rejection
    mass = residual.sum(dim=-1, keepdim=True)
    residual = torch.where(mass > 0, residual, p[:n])  # p == q there: any draw from p will do
    row = torch.cat([residual, p[n:]]).index_select(0, kept.view(1))[0]  # ([kept] would read kept on the host)
    token = sampler.draw_tensor(row / row.sum())
    return torch.stack([kept, token])


class NoDrafter:
    """No speculation: every step is one token."""

    name = "none"

    def start(self, prompt: list[int], h: torch.Tensor):
        pass

    def propose(self, token: int, room: int) -> tuple[list[int], list[torch.Tensor | None]]:
        return [], []

    def accept(self, drafts_ok: list[int], h: torch.Tensor):
        pass

    def finish(self, last: int):
        pass

    def whole(self, length: int) -> int:
        return length


class NgramDrafter(NoDrafter):
    """Prompt lookup: index every n-gram (n = 1..max_n) of the context by the position that follows its
    most recent occurrence; propose the k tokens after the longest n-gram (at least min_n) that ends the
    context."""

    name = "ngram"

    def __init__(self, k: int, max_n: int = 3, min_n: int = 2):
        self.k, self.max_n, self.min_n = k, max_n, min_n
        self.ctx: list[int] = []
        self.index: dict[tuple[int, ...], int] = {}

    def start(self, prompt: list[int], h: torch.Tensor):
        self.extend(prompt)

    def propose(self, token: int, room: int) -> tuple[list[int], list[torch.Tensor | None]]:
        self.extend([token])
        drafts = self.lookup()[:max(room, 0)]
        return drafts, [None] * len(drafts)

    def accept(self, drafts_ok: list[int], h: torch.Tensor):
        self.extend(drafts_ok)

    def extend(self, tokens: list[int]):
        for t in tokens:
            j = len(self.ctx)  # t lands at position j: the n-grams ending at j-1 are followed by it
            for n in range(1, self.max_n + 1):
                if j - n >= 0:
                    self.index[tuple(self.ctx[j - n:j])] = j
            self.ctx.append(t)

    def lookup(self) -> list[int]:
        L = len(self.ctx)
        for n in range(min(self.max_n, L), self.min_n - 1, -1):
            p = self.index.get(tuple(self.ctx[L - n:]))
            if p is not None:
                return self.ctx[p:p + self.k]
        return []


MTPStep = Callable[[int, torch.Tensor, "list[int] | torch.Tensor"], tuple[torch.Tensor, torch.Tensor]]


class MTPDrafter(NoDrafter):
    """V3's MTP module, chained K times. Its cache rows trail the main model's by one position (row i needs
    t_{i+1}): `pending` holds the main model's normed states of positions done..len(seq.ids)-1, whose MTP
    rows are written by the next proposal (or by finish).

    mtp(start, h, next_ids) runs the module over the sequence's positions start..start+S-1 (h [S, hidden] the
    depth-0 states there, next_ids the tokens that follow each), writes its cache rows and returns its states
    and logits; norm is the main model's final norm."""

    name = "mtp"

    def __init__(self, mtp: MTPStep, norm: Callable[[torch.Tensor], torch.Tensor], seq, sampler: Sampler, k: int):
        self.mtp, self.norm, self.seq, self.sampler, self.k = mtp, norm, seq, sampler, k
        self.done = seq.cached
        self.pending: torch.Tensor | None = None

    def start(self, prompt: list[int], h: torch.Tensor):
        self.pending = self.norm(h)

    def _catch_up(self, token: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the pending MTP rows (the last one with `token`); the module's states and logits there."""
        seq = self.seq
        h, logits = self.mtp(self.done, self.pending, seq.ids[self.done + 1:] + [token])
        self.done, self.pending = len(seq.ids), self.pending[:0]
        return h, logits

    def propose(self, token: int, room: int) -> tuple[torch.Tensor | list[int], list[torch.Tensor | None]]:
        """The drafts stay on the device (a tensor [n]): each is fed to the next MTP step there, and the host
        reads them once, with the verification's outcome (speculative.verify_on_device)."""
        if room <= 0:
            return [], []
        h, logits = self._catch_up(token)
        params, n = self.sampler.params, min(self.k, room)
        drafts, probs = [], []
        for j in range(n):
            q = None if params.greedy else probabilities(logits[-1], params)
            drafts.append((logits[-1].argmax() if q is None else self.sampler.draw_tensor(q)).view(1))
            probs.append(q)
            if j + 1 < n:  # chain: the module's own state, the draft token
                h, logits = self.mtp(len(self.seq.ids) + j, h[-1:], drafts[-1])
        return torch.cat(drafts), probs

    def accept(self, drafts_ok: list[int], h: torch.Tensor):
        self.pending = torch.cat([self.pending, self.norm(h)])

    def finish(self, last: int):
        """Write the MTP rows of the last positions, so the cached prefix is whole for the next turn."""
        if len(self.seq.ids) > self.done:
            self._catch_up(last)

    def whole(self, length: int) -> int:
        return min(length, self.done)
