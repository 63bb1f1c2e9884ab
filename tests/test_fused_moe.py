"""The stacked-expert MoE (kernels/fused_moe.py): the Triton kernel in Triton's interpreter on the CPU and
the CPU loop against the gathering PyTorch reference, and an independent per-expert sum."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from dschat.engine import Engine, SamplingParams
from dschat.engine import moe as engine_moe
from dschat.kernels import fused_moe, ops  # noqa: F401 - ops registers torch.ops.dschat.*
from dschat.kernels.fused_moe import (GATHER_MAX_TOKENS, moe_experts, moe_experts_loop, moe_experts_reference,
                                      moe_experts_triton)

needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's interpreter")


def case(T, E, k, H, I, seed=0, lo=0, hi=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    w13 = torch.randn(E, 2 * I, H, generator=g) / H ** 0.5
    w2 = torch.randn(E, H, I, generator=g) / I ** 0.5
    hi = E if hi is None else hi
    ids = torch.stack([torch.randperm(hi - lo, generator=g)[:k] + lo for _ in range(T)])
    weights = torch.rand(T, k, generator=g)
    return x, w13, w2, ids, weights


def by_hand(x, w13, w2, ids, weights):
    """Token by token, expert by expert, with the per-expert projections as the hub stores them."""
    E, I = w13.shape[0], w2.shape[-1]
    y = torch.zeros(x.shape)
    for t in range(x.shape[0]):
        for e, w in zip(ids[t].tolist(), weights[t].tolist()):
            if 0 <= e < E:
                gate, up, down = w13[e, :I], w13[e, I:], w2[e]
                y[t] += w * (down @ (F.silu(gate @ x[t]) * (up @ x[t])))
    return y


def shared_case(H, Is, seed=0):
    """The shared experts' gate, up and down (gate and up [Is, H], down [H, Is])."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(Is, H, generator=g) / H ** 0.5, torch.randn(Is, H, generator=g) / H ** 0.5,
            torch.randn(H, Is, generator=g) / Is ** 0.5)


def swiglu(x, gate, up, down):
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


@pytest.mark.parametrize("T", [1, 3, GATHER_MAX_TOKENS + 5])
def test_reference_and_loop_equal_the_per_expert_sum(T):
    args = case(T, E=8, k=3, H=48, I=40, seed=T)
    want = by_hand(*args)
    assert torch.allclose(moe_experts_reference(*args), want, atol=1e-5)
    assert torch.allclose(moe_experts_loop(*args), want, atol=1e-5)


@pytest.mark.parametrize("T", [1, GATHER_MAX_TOKENS + 5])
def test_experts_of_other_ranks_contribute_zero(T):
    """ids outside 0..E-1 (another rank's experts, after subtracting this rank's first) add nothing."""
    x, w13, w2, ids, weights = case(T, E=6, k=4, H=32, I=24, seed=5, lo=-6, hi=12)
    kept = (ids >= 0) & (ids < 6)
    assert kept.any() and not kept.all()
    want = by_hand(x, w13, w2, torch.where(kept, ids, 0), torch.where(kept, weights, 0.0))
    for fn in (moe_experts_reference, moe_experts_loop):
        assert torch.allclose(fn(x, w13, w2, ids, weights), want, atol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("T, E, k, H, I, Is", [
    (1, 8, 2, 64, 48, 16),     # batch-1 decode; I not a multiple of the block; shared experts narrower (TP)
    (3, 6, 3, 100, 40, 48),    # 1+K verify; H not a multiple of either block; shared experts wider (V2-Lite)
])
def test_triton_matches_reference(T, E, k, H, I, Is):
    """The routed experts and the shared ones (one more row a token, weight 1) in the same two launches."""
    x, w13, w2, ids, weights = case(T, E, k, H, I, seed=E + T, lo=-2, hi=E + 2)
    shared = shared_case(H, Is, seed=T)
    ref = moe_experts_reference(x, w13, w2, ids, weights, shared)
    out = moe_experts_triton(x, w13, w2, ids, weights, block_n=16, block_k=32, shared=shared)
    assert out.dtype == x.dtype
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5
    # the down kernel's last program a block summed the token's rows and put its counter back to 0
    assert fused_moe._ARRIVALS and all(not c.any() for c in fused_moe._ARRIVALS.values())


@needs_interpreter
def test_triton_in_bfloat16_accumulates_in_float32():
    x, w13, w2, ids, weights = case(2, 4, 2, 64, 32, seed=9)
    want = moe_experts_reference(x, w13, w2, ids, weights)
    out = moe_experts_triton(x.bfloat16(), w13.bfloat16(), w2.bfloat16(), ids, weights, block_n=16, block_k=32)
    assert out.dtype == torch.bfloat16
    assert float((out.float() - want).abs().max() / want.abs().max()) < 2e-2


def test_dispatch_on_the_cpu_is_the_loop():
    args = case(1, 5, 2, 16, 8, seed=3)
    assert torch.equal(moe_experts(*args), moe_experts_loop(*args))


@pytest.mark.parametrize("T", [1, GATHER_MAX_TOKENS + 5])
def test_shared_experts_join_the_sum_with_weight_one(T):
    x, w13, w2, ids, weights = case(T, E=6, k=2, H=32, I=24, seed=11, lo=-2, hi=8)
    shared = shared_case(32, 40, seed=T)
    want = by_hand(x, w13, w2, ids, weights) + swiglu(x, *shared)
    for fn in (moe_experts_reference, moe_experts_loop, moe_experts):
        assert torch.allclose(fn(x, w13, w2, ids, weights, shared), want, atol=1e-5), fn.__name__
    assert float((want - by_hand(x, w13, w2, ids, weights)).abs().max()) > 0.1  # they count
    torch.library.opcheck(torch.ops.dschat.moe_experts, (x[:1], w13, w2, ids[:1], weights[:1], list(shared)),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("quant", [None, "int8"])
def test_the_engine_runs_its_shared_experts_in_the_routed_call_and_decodes_the_same_tokens(checkpoints,
                                                                                       monkeypatch, quant):
    """Where the routed experts' kernels take the shared experts (fused_moe.fuses_shared: the CUDA decode
    path; forced here), MoE.forward hands them over instead of running its shared MLP: same greedy tokens
    (the CPU's dispatch computes the same sum), and the shared MLP never runs on its own. Unquantized, the
    Triton kernels themselves too (Triton's interpreter)."""
    monkeypatch.setenv("DSCHAT_CPU_STEP", "0")  # the lean CPU step does not go through MoE.forward
    eng = Engine.from_pretrained(checkpoints["v2_lite"], dtype=torch.float32, speculative="none", quant=quant)
    ids, params = [3, 17, 99, 5, 41], SamplingParams(max_tokens=6, ignore_eos=True)
    want = list(eng.generate(ids, params, reuse_cache=False))
    short = SamplingParams(max_tokens=2, ignore_eos=True)
    want_short = list(eng.generate(ids[:2], short, reuse_cache=False))
    seen, alone = [], []
    name = "moe_experts_quant" if quant else "moe_experts"
    real_experts = getattr(engine_moe, name)
    monkeypatch.setattr(engine_moe, "fuses_shared", lambda x, ids: True)
    monkeypatch.setattr(engine_moe, name, lambda *a: (seen.append(len(a[5])), real_experts(*a))[1])
    moes = [m for m in eng.model.modules() if isinstance(m, engine_moe.MoE)]
    assert moes and all(m.shared_experts is not None for m in moes)
    for m in moes:
        monkeypatch.setattr(m.shared_experts, "forward", lambda x: alone.append(1))
    assert list(eng.generate(ids, params, reuse_cache=False)) == want
    assert seen and set(seen) == {3} and not alone
    if os.environ.get("TRITON_INTERPRET") == "1" and quant is None:  # through the Triton kernels, as on CUDA
        seen.clear()
        monkeypatch.setattr(engine_moe, "moe_experts", lambda x, w13, w2, ids, weights, shared: (
            seen.append(len(shared)), moe_experts_triton(x, w13, w2, ids, weights, shared=shared))[1])
        assert list(eng.generate(ids[:2], short, reuse_cache=False)) == want_short
        assert seen and set(seen) == {3} and not alone
