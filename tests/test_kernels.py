"""Triton kernels against their PyTorch references, in Triton's interpreter on the CPU (TRITON_INTERPRET=1,
set in conftest.py before triton is imported)."""

from __future__ import annotations

import os

import pytest
import torch

from dschat.kernels import triton_support
from dschat.kernels.mla_decode import mla_decode, mla_decode_reference, mla_decode_triton

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's interpreter")


def case(S, H, R, P, T, n_slots, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q_lat = torch.randn(S, H, R, generator=g, dtype=dtype)
    q_pe = torch.randn(S, H, P, generator=g, dtype=dtype)
    cache = torch.randn(n_slots, R + P, generator=g, dtype=dtype)
    slots = torch.randperm(n_slots, generator=g)[:T]  # pages scattered over the pool
    q_pos = torch.arange(T - S, T)  # the last S positions: causal within them
    return q_lat, q_pe, cache, slots, q_pos


@pytest.mark.parametrize("S, H, R, P, T, split", [
    (1, 4, 64, 16, 37, None),   # decode: one query, T not a multiple of the block
    (4, 4, 64, 16, 150, 64),    # speculative verification: 4 queries, several splits
    (2, 20, 32, 16, 70, 32),    # more heads than one head block, splits with no visible keys for some rows
])
def test_mla_decode_triton_matches_reference(S, H, R, P, T, split):
    args = case(S, H, R, P, T, n_slots=T + 50)
    ref = mla_decode_reference(*args, scale=0.125)
    out = mla_decode_triton(*args, scale=0.125, keys_per_split=split)
    assert out.shape == ref.shape
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-4


def test_causal_rows_see_only_their_past():
    q_lat, q_pe, cache, slots, q_pos = case(3, 4, 32, 16, 40, n_slots=64)
    full = mla_decode_triton(q_lat, q_pe, cache, slots, q_pos, 0.2, keys_per_split=16)
    alone = mla_decode_reference(q_lat[:1], q_pe[:1], cache, slots[: int(q_pos[0]) + 1], q_pos[:1], 0.2)
    assert torch.allclose(full[:1], alone, atol=1e-5)


def test_dispatch_uses_the_reference_on_cpu():
    args = case(1, 4, 32, 16, 20, n_slots=30)
    assert torch.equal(mla_decode(*args, scale=0.3), mla_decode_reference(*args, scale=0.3))


def test_triton_is_imported_only_where_a_kernel_can_run(monkeypatch):
    """Without a GPU and outside the interpreter no kernel runs, so Triton's import (0.4 s) is left out of
    start-up."""
    assert triton_support._load()[0] is not None  # the interpreter (these tests)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert (triton_support._load()[0] is not None) == torch.cuda.is_available()
