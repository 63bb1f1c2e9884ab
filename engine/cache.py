"""The latent KV cache: one preallocated pool of pages per device, and a prefix tree that finds them again.

Per token and layer MLA needs only kv_lora_rank + qk_rope_head_dim values (576 for every released model),
so the whole history of a chat is cheap to keep. The pool is `n_layers` buffers of
[num_pages * page_size, latent_dim]; a sequence is a list of pages ("block table") and a length.

The prefix tree has one node per page, keyed by the page's token ids under its parent. A new prompt walks
it page by page; a page that matches only in part (the last page of an earlier reply, or a prompt that
diverges mid-page) is copied into a fresh private page, so reuse is exact to the token. When a generation
ends, its pages are inserted into the tree (prompt and reply), and pinned pages are released. Pages no
sequence uses are evicted leaf-first, least recently used first, when the pool runs out.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from . import hugepages
from .errors import ContextLengthError


@dataclass(eq=False)
class Node:
    """One page of the prefix tree: its token ids (a full page, or fewer in a partial last page), the pool page
    holding their latent rows, and how many open sequences pin it."""

    tokens: tuple[int, ...]
    page: int
    parent: "Node | None"
    children: dict[tuple[int, ...], "Node"] = field(default_factory=dict)
    refs: int = 0
    last_used: int = 0


@dataclass(eq=False)
class Sequence:
    """One sequence's view of the pool: `ids` are the tokens whose latents are cached, in order."""

    ids: list[int]
    pages: list[int]
    shared: list[Node]  # tree nodes this sequence pins (its first len(shared) pages)
    cached: int  # how many of `ids` came from the tree when it was opened


class LatentCache:
    """The pool of latent-row pages (`layers`: one buffer per cached layer) and the prefix tree over them. A
    generation `open`s a Sequence (reusing the longest cached prefix), `reserve`s room, reads and writes its
    `slots`, and `close`s it (inserting its pages into the tree)."""

    def __init__(self, n_layers: int, latent_dim: int, num_pages: int, page_size: int,
                 device: torch.device, dtype: torch.dtype):
        self.page_size, self.num_pages, self.latent_dim = page_size, num_pages, latent_dim
        rows = num_pages * page_size  # on the CPU in huge pages (engine/hugepages.py): attention reads them all
        self.layers = [hugepages.empty((rows, latent_dim), dtype, device) for _ in range(n_layers)]
        self.free = list(range(num_pages - 1, -1, -1))
        self.root = Node((), -1, None)
        self.clock = itertools.count(1)
        self.device = device

    def clear(self):
        """Forget every cached prefix (pages stay allocated; nothing may be open)."""
        self.free = list(range(self.num_pages - 1, -1, -1))
        self.root = Node((), -1, None)

    @staticmethod
    def bytes_per_token(n_layers: int, latent_dim: int, dtype: torch.dtype) -> int:
        return n_layers * latent_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def capacity(self) -> int:
        return self.num_pages * self.page_size

    # -- pages ------------------------------------------------------------------------------------------
    def _alloc(self) -> int:
        if not self.free:
            self._evict(1)
        if not self.free:
            raise ContextLengthError(
                f"the latent cache is full ({self.capacity} tokens): raise `cache_gb` or start a new chat")
        return self.free.pop()

    def _nodes(self):
        stack = [self.root]
        while stack:
            n = stack.pop()
            stack.extend(n.children.values())
            if n is not self.root:
                yield n

    def _evict(self, n: int):
        """Free at least n pages from unpinned leaves, least recently used first."""
        while n > 0:
            leaves = [x for x in self._nodes() if not x.children and x.refs == 0]
            if not leaves:
                return
            leaves.sort(key=lambda x: x.last_used)
            for leaf in leaves[:n]:
                self._drop(leaf)
                n -= 1

    def _drop(self, node: Node):
        del node.parent.children[node.tokens]
        self.free.append(node.page)

    def _copy_rows(self, src_page: int, dst_page: int, n: int):
        s, d = src_page * self.page_size, dst_page * self.page_size
        for buf in self.layers:
            buf[d:d + n] = buf[s:s + n]

    # -- sequences ----------------------------------------------------------------------------------------
    def open(self, ids: list[int], limit: int | None = None) -> Sequence:
        """A sequence holding the longest cached prefix of ids (at most `limit` tokens)."""
        limit = len(ids) if limit is None else min(limit, len(ids))
        P, node, pos = self.page_size, self.root, 0
        seq = Sequence([], [], [], 0)
        now = next(self.clock)
        while pos < limit:
            chunk = tuple(ids[pos:pos + P])
            child = node.children.get(chunk) if pos + P <= limit else None
            if child is not None:  # a whole page matches: share it
                child.refs += 1
                child.last_used = now
                seq.shared.append(child)
                seq.pages.append(child.page)
                pos += P
                node = child
                continue
            best, best_n = None, 0  # else the child with the longest common prefix, copied
            for c in node.children.values():
                k = 0
                for a, b in zip(c.tokens, ids[pos:limit]):
                    if a != b:
                        break
                    k += 1
                if k > best_n:
                    best, best_n = c, k
            if best is not None:
                best.last_used = now
                best.refs += 1  # keep it while copying: _alloc may evict
                try:
                    page = self._alloc()
                finally:
                    best.refs -= 1
                self._copy_rows(best.page, page, best_n)
                seq.pages.append(page)
                pos += best_n
            break
        seq.ids = list(ids[:pos])
        seq.cached = pos
        return seq

    def reserve(self, seq: Sequence, length: int):
        """Make room for positions up to `length` in seq's pages."""
        while len(seq.pages) * self.page_size < length:
            seq.pages.append(self._alloc())

    def slots(self, seq: Sequence, length: int) -> torch.Tensor:
        """Flat slot index of positions 0..length-1."""
        P = self.page_size
        pages = torch.tensor(seq.pages[: (length + P - 1) // P], dtype=torch.long)
        slots = (pages[:, None] * P + torch.arange(P)[None, :]).flatten()[:length]
        return slots.to(self.device)

    def truncate(self, seq: Sequence, length: int):
        """Forget positions >= length (rejected draft tokens); private pages past the end are freed."""
        P = self.page_size
        del seq.ids[length:]
        keep = max((length + P - 1) // P, len(seq.shared))
        while len(seq.pages) > keep:
            self.free.append(seq.pages.pop())

    def close(self, seq: Sequence, insert: bool = True):
        """End a sequence: insert its pages into the tree (unless insert=False) and unpin shared ones."""
        P, now = self.page_size, next(self.clock)
        node = self.root
        n_shared = len(seq.shared)
        for j, page in enumerate(seq.pages):
            tokens = tuple(seq.ids[j * P:(j + 1) * P])
            if j < n_shared:
                node = seq.shared[j]
                continue
            if not insert or not tokens:
                self.free.append(page)
                continue
            existing = node.children.get(tokens)
            if existing is not None:  # someone cached the same page meanwhile
                self.free.append(page)
                existing.last_used = now
                node = existing
                continue
            # partial pages that are a prefix of this one are now redundant
            for other in list(node.children.values()):
                if len(other.tokens) < P and not other.children and other.refs == 0 \
                        and tokens[: len(other.tokens)] == other.tokens:
                    self._drop(other)
            child = Node(tokens, page, node, last_used=now)
            node.children[tokens] = child
            node = child
        for n in seq.shared:
            n.refs -= 1
        seq.pages, seq.shared = [], []
