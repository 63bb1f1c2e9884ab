"""The packed-weight kernels (kernels/quant_matmul.py, kernels/quant_moe.py) against dequantise-then-compute,
the Triton ones in Triton's interpreter on the CPU (TRITON_INTERPRET=1, set in conftest.py)."""

from __future__ import annotations

import os

import pytest
import torch

from dschat.engine.quant import QuantSpec, quantize
from dschat.kernels.fused_moe import moe_experts_reference
from dschat.kernels.quant_format import Packed, dequantize
from dschat.kernels.quant_matmul import quant_matmul, quant_matmul_reference, quant_matmul_triton
from dschat.kernels.quant_moe import moe_experts_quant, moe_experts_quant_reference, moe_experts_quant_triton

needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's interpreter")
SPECS = {"int8": QuantSpec(8), "int4": QuantSpec(4), "int4-sym": QuantSpec(4, symmetric=True),
         "int4-g48": QuantSpec(4, group=48)}  # a group no tile lies in: scales gathered an element at a time


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


@needs_interpreter
@pytest.mark.parametrize("name", ["int8", "int4", "int4-sym"])  # triton_fits: groups of a power of two
@pytest.mark.parametrize("M, N, K", [(1, 70, 200), (20, 64, 256)])  # GEMV / GEMM; K padded to the group
def test_triton_matmul_matches_reference(name, M, N, K):
    g = torch.Generator().manual_seed(M)
    p = quantize(torch.randn(N, K, generator=g), SPECS[name])
    x = torch.randn(M, K, generator=g)
    assert rel(quant_matmul_triton(x, p), quant_matmul_reference(x, p)) < 1e-5


def stack(ws: list[torch.Tensor], s: QuantSpec) -> Packed:
    """Experts quantized one by one (as the loader does), then stacked."""
    ps = [quantize(w, s) for w in ws]
    zero = None if ps[0].zero is None else torch.stack([p.zero for p in ps])
    return Packed(torch.stack([p.data for p in ps]), torch.stack([p.scale for p in ps]), zero, s.bits,
                  ps[0].group, ps[0].in_features)


def moe_case(T, name, E=6, k=2, H=160, I=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = SPECS[name]
    w13 = stack([torch.randn(2 * I, H, generator=g) for _ in range(E)], s)
    w2 = stack([torch.randn(H, I, generator=g) for _ in range(E)], s)
    x = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E + 3, generator=g)[:k] - 1 for _ in range(T)])  # some out of range
    return x, w13, w2, ids, torch.rand(T, k, generator=g)


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("T", [1, 24])
def test_quant_moe_equals_the_dequantized_experts(name, T):
    x, w13, w2, ids, weights = moe_case(T, name, seed=T)
    want = moe_experts_reference(x, dequantize(w13), dequantize(w2), ids, weights)
    assert rel(moe_experts_quant_reference(x, w13, w2, ids, weights), want) < 1e-5
    assert rel(moe_experts_quant(x, w13, w2, ids, weights), want) < 1e-5


@needs_interpreter
@pytest.mark.parametrize("name", SPECS)
def test_triton_quant_moe_matches_reference(name):
    """With the shared experts (packed alike, 64 wide) as one more row a token where the spec is int4."""
    x, w13, w2, ids, weights = moe_case(3, name, seed=7)
    shared = None
    if name == "int4":
        g = torch.Generator().manual_seed(8)
        shared = [quantize(torch.randn(*shape, generator=g), SPECS[name])
                  for shape in ((64, 160), (64, 160), (160, 64))]
    want = moe_experts_quant_reference(x, w13, w2, ids, weights, shared)
    assert rel(moe_experts_quant_triton(x, w13, w2, ids, weights, shared=shared), want) < 1e-5
    if shared is not None:
        assert rel(moe_experts_quant(x, w13, w2, ids, weights, shared), want) < 1e-5  # the CPU's dispatch
        assert rel(moe_experts_quant_reference(x, w13, w2, ids, weights), want) > 0.05  # they count


def test_dispatch_on_cpu_is_not_triton():
    p = quantize(torch.randn(32, 128), SPECS["int4"])
    x = torch.randn(2, 128)
    assert torch.equal(quant_matmul(x, p), quant_matmul_reference(x, p))
