"""Routed experts over block-scaled FP8 stacks (kernels/fp8_moe.py, `--fp8 keep`): the host loop that
dequantises each chosen expert as it runs, and fused_moe's kernels reading the FP8 rows in place (Triton's
interpreter on the CPU), against every expert dequantised first and against a sum by hand."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from dschat.dev import tiny_checkpoints as tc
from dschat.kernels.fp8_moe import (fp8_triton_fits, moe_experts_fp8, moe_experts_fp8_loop,
                                    moe_experts_fp8_reference, moe_experts_fp8_triton)
from dschat.kernels import ops  # noqa: F401 - registers torch.ops.dschat.*
from dschat.kernels.fused_moe import GATHER_MAX_TOKENS, moe_experts_reference

needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's interpreter")
BLOCK = (128, 128)


def case(T, E=4, k=2, H=200, I=128, seed=0, lo=0, hi=None):
    """FP8 stacks as a V3 checkpoint ships each expert's gate_proj, up_proj and down_proj (a scale tile each,
    partial edge tiles along H), stacked as the engine stacks them."""
    g = torch.Generator().manual_seed(seed)
    gates, ups, downs = ([tc.quantize_fp8(torch.randn(*shape, generator=g) * 0.05) for _ in range(E)]
                         for shape in ((I, H), (I, H), (H, I)))
    w13 = torch.stack([torch.cat([a[0], b[0]]) for a, b in zip(gates, ups)])
    s13 = torch.stack([torch.cat([a[1], b[1]]) for a, b in zip(gates, ups)])
    w2, s2 = torch.stack([d[0] for d in downs]), torch.stack([d[1] for d in downs])
    hi = E if hi is None else hi
    ids = torch.stack([torch.randperm(hi - lo, generator=g)[:k] + lo for _ in range(T)])
    return (torch.randn(T, H, generator=g), w13, s13, w2, s2, ids, torch.rand(T, k, generator=g)), (gates, ups, downs)


def by_hand(x, parts, ids, weights):
    """Token by token, each chosen expert's three projections dequantised on their own."""
    gates, ups, downs = ([tc.dequantize_fp8_reference(*p) for p in ps] for ps in parts)
    y = torch.zeros(x.shape)
    for t in range(x.shape[0]):
        for e, w in zip(ids[t].tolist(), weights[t].tolist()):
            if 0 <= e < len(gates):
                y[t] += w * (downs[e] @ (F.silu(gates[e] @ x[t]) * (ups[e] @ x[t])))
    return y


@pytest.mark.parametrize("T", [1, 3, GATHER_MAX_TOKENS + 5])
def test_reference_and_loop_equal_the_sum_by_hand(T):
    args, parts = case(T, seed=T)
    x, *_, ids, weights = args
    want = by_hand(x, parts, ids, weights)
    assert torch.allclose(moe_experts_fp8_reference(*args, BLOCK), want, atol=1e-5)
    assert torch.allclose(moe_experts_fp8_loop(*args, BLOCK), want, atol=1e-5)
    assert torch.equal(moe_experts_fp8(*args, BLOCK), moe_experts_fp8_loop(*args, BLOCK))  # the CPU's choice


def test_the_loop_dequantises_only_the_chosen_experts(monkeypatch):
    """No torch.unique, and no expert nobody chose is turned into floats."""
    import dschat.kernels.fp8_moe as m
    args, _ = case(2, E=6, k=2, seed=7)
    seen = []
    real = m.dequantize_fp8
    monkeypatch.setattr(m, "dequantize_fp8", lambda w, s, b: seen.append(w.shape) or real(w, s, b))
    monkeypatch.setattr(torch, "unique", None)
    m.moe_experts_fp8_loop(*args, BLOCK)
    chosen = len(set(args[5].flatten().tolist()))
    assert len(seen) == 3 * chosen and all(len(s) == 2 for s in seen)  # gate, up and down of each, one by one


def test_experts_of_other_ranks_contribute_zero():
    args, parts = case(GATHER_MAX_TOKENS + 3, E=4, k=3, seed=5, lo=-4, hi=8)
    x, *_, ids, weights = args
    kept = (ids >= 0) & (ids < 4)
    assert kept.any() and not kept.all()
    want = by_hand(x, parts, torch.where(kept, ids, 0), torch.where(kept, weights, 0.0))
    assert torch.allclose(moe_experts_fp8_loop(*args, BLOCK), want, atol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("T, lo, hi", [(1, 0, None), (3, -2, 6)])  # decode; a verify batch, other ranks' ids
def test_triton_reads_the_fp8_rows_as_the_reference_dequantises_them(T, lo, hi):
    """At the decode shape with the shared experts (FP8 too) as one more row a token."""
    args, _ = case(T, seed=10 + T, lo=lo, hi=hi)
    shared = None
    if T == 1:
        g = torch.Generator().manual_seed(T)
        shared = [t for shape in ((128, 200), (128, 200), (200, 128))
                  for t in tc.quantize_fp8(torch.randn(*shape, generator=g) * 0.05)]
    want = moe_experts_fp8_reference(*args, BLOCK, shared)
    got = moe_experts_fp8_triton(*args, BLOCK, shared=shared)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5
    if shared is not None:
        loop = moe_experts_fp8(*args, BLOCK, shared)  # the CPU's dispatch: the host loop
        assert float((loop - want).abs().max() / want.abs().max()) < 1e-5
        assert float((moe_experts_fp8_reference(*args, BLOCK) - want).abs().max() / want.abs().max()) > 0.05
        torch.library.opcheck(torch.ops.dschat.moe_experts_fp8, (*args, list(BLOCK), shared),
                              test_utils=("test_faketensor",))  # the schema check cannot multiply FP8 on the CPU


@needs_interpreter
def test_triton_in_bfloat16_rounds_the_weights_as_the_reference_does():
    """Every weight 1.0 in FP8 times a scale of 1 + 3/1024, which bfloat16 rounds to 1: weights rounded (as
    the reference rounds the dequantised expert to x's dtype) give a reply ~0.9% away from unrounded ones,
    more than the output's own rounding (at most 0.3% here)."""
    E, k, H, I, T = 3, 2, 200, 128, 2
    scale = 1 + 3 / 1024
    w13 = torch.ones(E, 2 * I, H).to(torch.float8_e4m3fn)
    w2 = torch.ones(E, H, I).to(torch.float8_e4m3fn)
    s13, s2 = torch.full((E, 2 * I // 128, 2), scale), torch.full((E, 2, I // 128), scale)
    x = torch.full((T, H), 0.01, dtype=torch.bfloat16)
    ids, weights = torch.tensor([[0, 2], [1, 0]]), torch.tensor([[0.5, 0.25], [1.0, 0.125]])
    got = moe_experts_fp8_triton(x, w13, s13, w2, s2, ids, weights, BLOCK)
    assert got.dtype == torch.bfloat16
    xf = x.float()  # float32 sums both, so that only the weights' rounding differs
    w = float(torch.tensor(scale).bfloat16())
    rounded = moe_experts_reference(xf, torch.full((E, 2 * I, H), w), torch.full((E, H, I), w), ids, weights)
    unrounded = moe_experts_fp8_reference(xf, w13, s13, w2, s2, ids, weights, BLOCK)
    assert float(((unrounded - rounded).abs() / rounded.abs()).min()) > 0.007
    assert float(((got.float() - rounded).abs() / rounded.abs()).max()) < 0.0035  # bfloat16's half step


def test_tiles_that_would_straddle_scale_tiles_take_the_loop():
    (_, w13, s13, w2, s2, _, _), _ = case(1, I=128)
    assert fp8_triton_fits(w2, BLOCK)
    (_, _, _, w2, _, _, _), _ = case(1, I=96)  # an expert's up rows would start inside a tile of its gate's
    assert not fp8_triton_fits(w2, BLOCK) and not fp8_triton_fits(w2, (128, 64))
