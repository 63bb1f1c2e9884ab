"""The fused kernels (kernels/norm_rope.py, kernels/router.py, the MLA merge) against their PyTorch
references in Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py), and their custom operators'
fake implementations (torch.library.opcheck)."""

from __future__ import annotations

import os

import pytest
import torch

from dschat.kernels import norm_rope, ops  # noqa: F401 - ops registers torch.ops.dschat.*

interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's interpreter")


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@interpreted
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("D", [256, 200])
def test_add_rms_norm_matches_reference(dtype, tol, D):
    x, res, w = rand(3, D, seed=1, dtype=dtype), rand(3, D, seed=2, dtype=dtype), rand(D, seed=3, dtype=dtype)
    h_ref, y_ref = norm_rope.add_rms_norm_reference(x, res, w, 1e-6)
    h, y = norm_rope.add_rms_norm_triton(x, res, w, 1e-6)
    assert h.dtype == h_ref.dtype and y.dtype == y_ref.dtype and y.shape == y_ref.shape
    assert float((h.float() - h_ref.float()).abs().max()) < tol * float(h_ref.float().abs().max())
    assert float((y.float() - y_ref.float()).abs().max()) < tol * float(y_ref.float().abs().max())
    _, y_plain = norm_rope.add_rms_norm_triton(x[None], None, w, 1e-6)  # plain RMSNorm, [B,S,D]
    assert torch.allclose(y_plain[0].float(), norm_rope.rms_norm_reference(x, w, 1e-6).float(), atol=tol * 10)


def rope_case(S=3, H=4, nope=8, P=16, R=40, n_slots=20, dtype=torch.float32):
    q = rand(S, H, nope + P, seed=4, dtype=dtype)
    kv = rand(S, R + P, seed=5, dtype=dtype)
    w = rand(R, seed=6, dtype=dtype)
    angles = torch.arange(S, dtype=torch.float32)[:, None] * rand(P // 2, seed=7).abs()
    slots = torch.randperm(n_slots, generator=torch.Generator().manual_seed(8))[:S]
    cache = torch.zeros(n_slots, R + P, dtype=dtype)
    return q[..., nope:], kv, w, angles.cos(), angles.sin(), cache, slots


@interpreted
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_rope_latent_write_matches_reference(dtype, tol):
    q_pe, kv, w, cos, sin, cache, slots = rope_case(dtype=dtype)
    cache_ref = cache.clone()
    q_ref = norm_rope.rope_latent_write_reference(q_pe, kv, w, 1e-6, cos, sin, cache_ref, slots)
    q_out = norm_rope.rope_latent_write_triton(q_pe, kv, w, 1e-6, cos, sin, cache, slots)
    assert q_out.shape == q_ref.shape and q_out.dtype == q_ref.dtype
    assert float((q_out.float() - q_ref.float()).abs().max()) < tol * 4
    assert float((cache.float() - cache_ref.float()).abs().max()) < tol * 4
    untouched = torch.ones(cache.shape[0], dtype=torch.bool)
    untouched[slots] = False
    assert not cache[untouched].any() and cache[slots].abs().sum(-1).min() > 0


def test_dispatchers_run_the_references_on_the_cpu():
    x, res, w = rand(2, 64, seed=1), rand(2, 64, seed=2), rand(64, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(norm_rope.add_rms_norm(x, res, w, 1e-6),
                                                   norm_rope.add_rms_norm_reference(x, res, w, 1e-6)))
    q_pe, kv, w, cos, sin, cache, slots = rope_case()
    cache_ref = cache.clone()
    assert torch.equal(norm_rope.rope_latent_write(q_pe, kv, w, 1e-6, cos, sin, cache, slots),
                       norm_rope.rope_latent_write_reference(q_pe, kv, w, 1e-6, cos, sin, cache_ref, slots))
    assert torch.equal(cache, cache_ref)


def test_custom_operators_and_their_fake_implementations():
    x, res, w = rand(2, 64, seed=1), rand(2, 64, seed=2), rand(64, seed=3)
    torch.library.opcheck(torch.ops.dschat.rms_norm, (x, w, 1e-6))
    torch.library.opcheck(torch.ops.dschat.add_rms_norm, (x, res, w, 1e-6))
    q_pe, kv, w, cos, sin, cache, slots = rope_case()
    torch.library.opcheck(torch.ops.dschat.rope_latent_write, (q_pe.contiguous(), kv, w, 1e-6, cos, sin, cache,
                                                               slots))


# (E, k, n_group, topk_group, top2, softmax, normalise, scale, bias, offset): V2-Lite's, V2's (160 experts in 8
# groups of 20: groups padded in the kernel), V3's (sigmoid, correction bias, best-two group scores), a rank's
ROUTERS = {
    "v2-lite": (64, 6, 1, 1, False, True, False, 1.0, False, 0),
    "v2": (160, 6, 8, 3, False, True, False, 16.0, False, 0),
    "v3": (256, 8, 8, 4, True, False, True, 2.5, True, 0),
    "v3-rank1": (256, 8, 8, 4, True, False, True, 2.5, True, 128),
    "demo-normalised": (16, 2, 1, 1, False, True, True, None, False, 0),
}


@interpreted
@pytest.mark.parametrize("name", list(ROUTERS))
def test_router_matches_reference(name):
    from dschat.kernels import router
    E, k, n_group, topk_group, top2, softmax, normalise, scale, bias, offset = ROUTERS[name]
    logits = rand(5, E, seed=9) * 3
    b = rand(E, seed=10) * 0.1 if bias else None
    args = (logits, b, k, n_group, topk_group, top2, softmax, normalise, scale, offset)
    w_ref, ids_ref = router.route_reference(*args)
    w, ids = router.route_triton(*args)
    assert ids.dtype == torch.int64 and w.dtype == torch.float32
    assert torch.equal(ids, ids_ref)
    assert torch.allclose(w, w_ref, rtol=1e-5, atol=1e-6)
    if n_group > 1:  # the choice really is group-limited: some experts of the best overall are left out
        plain = router.route_reference(logits, b, k, 1, 1, top2, softmax, normalise, scale, offset)[1]
        assert not torch.equal(plain, ids_ref)


def test_router_custom_operator():
    E, k, n_group, topk_group, top2, softmax, normalise, scale, bias, offset = ROUTERS["v3-rank1"]
    torch.library.opcheck(torch.ops.dschat.route, (rand(3, E, seed=9), rand(E, seed=10), k, n_group, topk_group,
                                                   top2, softmax, normalise, scale, offset))


@interpreted
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_silu_mul_matches_reference(dtype, tol):
    g, u = rand(1, 3, 1500, seed=11, dtype=dtype), rand(1, 3, 1500, seed=12, dtype=dtype)  # blocks and a tail
    ref = norm_rope.silu_mul_reference(g, u)
    out = norm_rope.silu_mul_triton(g, u)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert float((out.float() - ref.float()).abs().max()) < tol * float(ref.float().abs().max())
    assert torch.equal(norm_rope.silu_mul(g, u), ref)  # the CPU's dispatch
    torch.library.opcheck(torch.ops.dschat.silu_mul, (g, u))
