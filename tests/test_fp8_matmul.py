"""Block-scaled FP8 matmul (kernels/fp8_matmul.py): the Triton kernel in Triton's interpreter on the CPU
against the dequantise-then-matmul reference, with partial edge blocks."""

from __future__ import annotations

import os

import pytest
import torch

from dschat.dev import tiny_checkpoints as tc
from dschat.kernels.fp8_matmul import dequantize_fp8, fp8_linear, fp8_linear_reference, fp8_linear_triton


def case(M, N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    w, scale = tc.quantize_fp8(torch.randn(N, K, generator=g) * 0.05)
    return torch.randn(M, K, generator=g), w, scale


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's interpreter")
@pytest.mark.parametrize("M, N, K", [(1, 200, 300), (5, 130, 128)])  # decode and verify; partial blocks
def test_triton_matches_reference(M, N, K):
    x, w, scale = case(M, N, K, seed=M)
    assert w.dtype == torch.float8_e4m3fn and scale.shape == ((N + 127) // 128, (K + 127) // 128)
    want = fp8_linear_reference(x, w, scale, (128, 128))
    got = fp8_linear_triton(x, w, scale, (128, 128), block_n=64, block_k=64)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's interpreter")
def test_triton_in_half_precision_rounds_the_weight_as_the_reference_does():
    """16-bit x (the tensor-core path): each tile is dequantised to x's dtype, as the reference rounds the
    whole weight, then multiplied with a float32 accumulator. float16 here: the interpreter's tl.dot cannot
    take bfloat16 (triton-lang/triton#11584), the GPU's takes both alike."""
    x, w, scale = case(3, 200, 300, seed=4)
    x = x.half()
    want = x.float() @ dequantize_fp8(w, scale, (128, 128)).half().float().T  # float32 accumulation
    got = fp8_linear_triton(x, w, scale, (128, 128), block_n=64, block_k=64)
    assert got.dtype == torch.float16
    assert float((got.float() - want).abs().max() / want.abs().max()) < 2e-3


def test_reference_is_the_dequantised_weight():
    x, w, scale = case(3, 140, 260, seed=2)
    assert torch.allclose(fp8_linear_reference(x, w, scale, (128, 128)),
                          x @ tc.dequantize_fp8_reference(w, scale).T, atol=1e-5)
    assert torch.equal(fp8_linear(x, w, scale, (128, 128)), fp8_linear_reference(x, w, scale, (128, 128)))


def test_stacked_weights_dequantise_like_each_alone():
    ws = [case(1, 140, 260, seed=s)[1:] for s in range(3)]
    stack = dequantize_fp8(torch.stack([w for w, _ in ws]), torch.stack([s for _, s in ws]), (128, 128))
    for i, (w, s) in enumerate(ws):
        assert torch.equal(stack[i], dequantize_fp8(w, s, (128, 128)))
