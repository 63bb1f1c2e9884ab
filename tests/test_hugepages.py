"""A CPU model's weights in transparent huge pages (engine/hugepages.py): moved after loading with their values
and views kept, embeddings left where they are, the memory advised for huge pages, nothing moved when turned
off, and the same tokens either way."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from dschat.engine import Engine, SamplingParams, hugepages
from dschat.engine.layers.embedding import Embedding

needs_thp = pytest.mark.skipif(not hugepages.available(), reason="no transparent huge pages on this system")
# where PyTorch's own allocator asks for huge pages too, its memory is advised as well
torch_advises = os.environ.get("THP_MEM_ALLOC_ENABLE", "0") not in ("", "0")


def _advised(ptr: int) -> bool:
    """Whether the mapping holding address ptr is advised for huge pages ("hg" in /proc/self/smaps)."""
    mapping = None
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(x, 16) for x in head.split("-"))
            mapping = lo <= ptr < hi
        elif head == "VmFlags:" and mapping:
            return "hg" in line.split()[1:]
    return False


class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3000, 1000), requires_grad=False)  # 12 MB
        self.register_buffer("rows", self.w.data[100:200])  # a view of w's storage
        self.register_buffer("small", torch.randn(10))
        self.embed = Embedding(2000, 1000)
        self.embed.weight = nn.Parameter(torch.randn(2000, 1000), requires_grad=False)


@needs_thp
def test_large_weights_move_into_advised_memory_with_their_values_and_views():
    m = Holder()
    w, rows, small, emb = (t.clone() for t in (m.w, m.rows, m.small, m.embed.weight))
    ptrs = {n: t.data_ptr() for n, t in (("w", m.w), ("small", m.small), ("embed", m.embed.weight))}
    assert torch_advises or not _advised(ptrs["w"])
    moved = hugepages.move(m)
    assert moved == 3000 * 1000 * 4  # w's storage once (rows is a view of it); small and embed stay
    assert m.w.data_ptr() != ptrs["w"] and _advised(m.w.data_ptr()) and m.w.data_ptr() % hugepages.HUGE == 0
    assert m.rows.data_ptr() == m.w.data_ptr() + 100 * 1000 * 4  # still a view of w
    m.w[100, 0] = 7.0
    assert m.rows[0, 0] == 7.0
    m.w[100, 0] = w[100, 0]
    assert torch.equal(m.w, w) and torch.equal(m.rows, rows) and torch.equal(m.small, small)
    assert m.small.data_ptr() == ptrs["small"] and m.embed.weight.data_ptr() == ptrs["embed"]
    assert torch.equal(m.embed.weight, emb)
    assert isinstance(m.w, nn.Parameter)


@needs_thp
def test_a_table_shared_with_a_linear_moves_and_stays_shared():
    """tie_word_embeddings: lm_head's weight is the embedding's table, read whole every token: it moves (an
    embedding alone stays), and both modules still hold the one tensor."""
    m = nn.Module()
    m.embed = Embedding(2000, 1000)
    m.embed.weight = nn.Parameter(torch.randn(2000, 1000), requires_grad=False)
    m.head = nn.Linear(1000, 2000, bias=False)
    m.head.weight = m.embed.weight
    w = m.embed.weight.clone()
    assert hugepages.move(m) == 2000 * 1000 * 4
    assert m.head.weight is m.embed.weight and _advised(m.head.weight.data_ptr()) and torch.equal(m.head.weight, w)


@needs_thp
def test_a_buffer_made_as_a_view_leaves_no_copy_behind():
    """A buffer that is a view of the bytes it was read from (engine/checkpoint.py reads so): the view it was made
    from is set onto the new memory too, so the old 64 MB are freed, not kept twice."""
    def rss() -> int:
        return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) * 1024

    raw = torch.ones(64 << 20, dtype=torch.uint8)
    m = nn.Module()
    m.register_buffer("w", raw.view(torch.int8).reshape(8192, 8192))
    del raw
    assert m.w._base is not None
    before = rss()
    assert hugepages.move(m) == 64 << 20
    assert rss() - before < 16 << 20  # the old bytes handed back (a second copy would be +64 MB)
    assert m.w._base.data_ptr() == m.w.data_ptr() and bool((m.w == 1).all())  # (its temporary after the RSS)


def test_nothing_moves_when_turned_off(monkeypatch):
    monkeypatch.setenv(hugepages.ENV, "0")
    m = Holder()
    p = m.w.data_ptr()
    assert not hugepages.available() and hugepages.move(m) == 0 and m.w.data_ptr() == p
    assert torch_advises or not _advised(hugepages.empty((2000, 2000), torch.float32).data_ptr())


@needs_thp
def test_empty_and_copy_give_advised_memory_above_the_threshold():
    t = hugepages.empty((1024, 2048), torch.float32)
    assert t.shape == (1024, 2048) and t.is_contiguous() and _advised(t.data_ptr())
    src = torch.randn(2048, 1024).t()  # not contiguous
    c = hugepages.copy(src)
    assert c.is_contiguous() and torch.equal(c, src) and _advised(c.data_ptr())
    tail = hugepages.empty((1024 * 1024 + 1024,), torch.float32)  # 4 MiB + 4 KiB: the last 4 KiB not advised
    assert _advised(tail.data_ptr()) and not _advised(tail.data_ptr() + (4 << 20))
    small = hugepages.empty((4, 4), torch.float32)
    assert small.shape == (4, 4)  # below MIN_BYTES: an ordinary tensor


@pytest.mark.parametrize("quant", [None, "int4"])
def test_moved_weights_give_the_same_tokens(checkpoints, monkeypatch, quant):
    """Every storage moved (the threshold lowered to 0 for the tiny model): the lean step, its plan built on
    the moved weights, and the plain path give the tokens of the model that moved nothing."""
    ids = torch.randint(2, 500, (10,), generator=torch.Generator().manual_seed(3)).tolist()
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    out = {}
    for on in ("0", "1"):
        monkeypatch.setenv(hugepages.ENV, on)
        monkeypatch.setattr(hugepages, "MIN_BYTES", 0)
        eng = Engine.from_pretrained(checkpoints["v2_lite"], dtype=torch.float32, speculative="none", quant=quant)
        assert (eng.load_stats["huge_page_bytes"] > 0) == (on == "1" and hugepages.available())
        out[on] = list(eng.generate(ids, params, reuse_cache=False))
        if on == "1" and hugepages.available():  # moved (these are too small for a whole huge page to advise)
            assert eng.model.lm_head.weight.data_ptr() % hugepages.HUGE == 0
            assert eng.cache.layers[0].data_ptr() % hugepages.HUGE == 0
    assert out["0"] == out["1"]
