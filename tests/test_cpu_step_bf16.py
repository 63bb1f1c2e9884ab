"""The CPU's one-token step for a bfloat16 model run lean (engine/cpu_step_bf16.py): each of its library calls
(kernels/cpu_gemv_bf16.cpp) against the PyTorch operations of the plain path it stands for, bit for bit, and
the step itself against decode_step: the same logits at every step and the same greedy tokens, over contiguous
and scattered pages, for a V3-like model (q_a_proj, a grouped router with its bias) and a V2-Lite-like one
(q_proj, a dense layer, shared experts)."""

from __future__ import annotations

import ctypes

import pytest
import torch
import torch.nn.functional as F
from helpers import lean_over_pages

from dschat.engine import Engine, SamplingParams
from dschat.engine.cpu_step_bf16 import Bf16Plan
from dschat.engine.cpu_step import CpuPlan
from dschat.engine.static import StaticDecoder, decode_step
from dschat.kernels import cpu_bf16, cpu_gemv
from dschat.kernels.mla_decode import mla_decode_bf16_cpu
from dschat.kernels.norm_rope import add_rms_norm_reference, rms_norm_reference, rope_latent_write_reference

BF16 = torch.bfloat16
P_ = ctypes.c_void_p


@pytest.fixture(scope="module")
def lib():
    """The built library; where it cannot be built here the test fails, naming why (nothing skipped silently)."""
    if not cpu_bf16.available():
        pytest.fail(f"cpu_gemv did not build: {cpu_gemv.cpu_supported() or 'see the line on stderr'}")
    return cpu_gemv.native()


def bf16(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(BF16)


def ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return P_(t.data_ptr())


def mean_sq(lib, x: torch.Tensor, res: torch.Tensor | None) -> torch.Tensor:
    """dschat_bf16_add_sq (x = bf16(x + res) in place), then torch.mean of the squares, as the step runs them."""
    sq = torch.empty(1, x.numel())
    lib.dschat_bf16_add_sq(ptr(x), None if res is None else ptr(res), x.numel(), ptr(sq))
    return sq.mean(-1, keepdim=True)


@pytest.mark.parametrize("D", [64, 520, 2048])
def test_rms_norm_is_the_reference(lib, D):
    """RMSNorm with and without the residual add before it (norm_rope's references in bfloat16), its mean of
    squares torch.mean's: bit for bit over 2000 rows of heavy-tailed activations (the library's own float32 sum
    of the squares moved 7 rows of 20000 at D = 2048)."""
    g = torch.Generator().manual_seed(D)
    for _ in range(2000 if D == 2048 else 100):
        x = (torch.randn(D, generator=g) * torch.randn(D, generator=g).exp()).to(BF16)
        res, w = bf16(D, seed=int(x[0].float().abs() * 1000)), (1 + 0.1 * torch.randn(D, generator=g)).to(BF16)
        want_h, want_y = add_rms_norm_reference(x, res, w, 1e-6)
        h, y = x.clone(), torch.empty(D, dtype=BF16)
        m = mean_sq(lib, h, res)
        lib.dschat_bf16_rms(ptr(h), ptr(w), ptr(m), 1e-6, D, ptr(y))
        assert torch.equal(h, want_h) and torch.equal(y, want_y)
        m = mean_sq(lib, x, None)
        lib.dschat_bf16_rms(ptr(x), ptr(w), ptr(m), 1e-6, D, ptr(y))
        assert torch.equal(y, rms_norm_reference(x, w, 1e-6))


def test_rope_latent_is_the_reference(lib):
    """q's RoPE (each head's rope part inside q's rows) and the cache row [RMSNorm(latent) | RoPE(k_pe)]:
    rope_latent_write_reference in bfloat16, bit for bit."""
    H, nope, P, R = 5, 24, 16, 72
    for seed in range(20):
        q, kv, w = bf16(1, H, nope + P, seed=seed, scale=2.0), bf16(1, R + P, seed=seed + 50), bf16(R, seed=seed + 9)
        angles = torch.rand(1, P // 2, generator=torch.Generator().manual_seed(seed)) * 40
        cos, sin = angles.cos(), angles.sin()
        cache = torch.zeros(4, R + P, dtype=BF16)
        want_q = rope_latent_write_reference(q[:, :, nope:], kv, w, 1e-6, cos, sin, cache, torch.tensor([2]))
        row, q_out = torch.zeros(R + P, dtype=BF16), torch.zeros(H, P, dtype=BF16)
        m = mean_sq(lib, kv[0, :R].clone(), None)
        lib.dschat_bf16_rope_latent(ptr(q), H, nope + P, nope, ptr(kv), R, P, ptr(w), ptr(m), 1e-6,
                                    ptr(cos.contiguous()), ptr(sin.contiguous()), ptr(row), ptr(q_out))
        assert torch.equal(q_out, want_q[0]) and torch.equal(row, cache[2])


def test_silu_mul_and_add_are_the_reference(lib):
    """F.silu(gate) * up for every bfloat16 gate (bf16(silu(g)) depends on g alone: the library's exp and PyTorch's
    agree after that rounding on all 65536, NaNs and infinities included), against random up; and a bfloat16
    sum (the shared experts' output added to the routed ones')."""
    n = 65536
    gate = torch.arange(n, dtype=torch.int32).to(torch.int16).view(BF16)
    gu = torch.cat([gate, bf16(n, seed=1, scale=6.0)])
    want = F.silu(gu[:n]) * gu[n:]
    nan = want.isnan()
    for threads in (1, 2):
        out = torch.empty(n, dtype=BF16)
        lib.dschat_bf16_silu_mul(ptr(gu), n, ptr(out), threads)
        assert nan.any() and torch.equal(out.isnan(), nan) and torch.equal(out[~nan], want[~nan])
    n = 1000
    y, x = bf16(n, seed=2, scale=100.0), bf16(n, seed=3)
    want = y + x
    lib.dschat_bf16_add(ptr(y), ptr(x), n)
    assert torch.equal(y, want)


@pytest.mark.parametrize("T, scattered, H, R, P", [(1, False, 16, 512, 64), (37, True, 16, 512, 64),
                                                   (130, False, 16, 512, 64), (300, True, 16, 512, 64),
                                                   (45, True, 6, 72, 16), (20, False, 3, 40, 8)])
def test_attention_is_the_reference(lib, T, scattered, H, R, P):
    """The scores, PyTorch's softmax (the step's own line) and the weighted sum of the rows, read in place at
    their slots or from a first row: mla_decode_bf16_cpu at one query (the plain path's), bit for bit; heads in
    fours and the rest, columns in sixteens and the rest, a rope part shorter than a block (the tails)."""
    n = T + 40
    q_lat, q_pe, cache = bf16(H, R, seed=T), bf16(H, P, seed=T + 1), bf16(n, R + P, seed=T + 2, scale=0.5)
    if scattered:
        slots = torch.randperm(n, generator=torch.Generator().manual_seed(T))[:T]
        sp, first = ptr(slots), 0
    else:
        slots, sp, first = torch.arange(7, 7 + T), None, 7
    want = mla_decode_bf16_cpu(q_lat[None], q_pe[None], cache, slots, torch.tensor([T - 1]), 0.07)[0]
    scores = torch.empty(H, T, dtype=BF16)
    assert lib.dschat_bf16_mla_scores(ptr(q_lat), ptr(q_pe), H, R, P, ptr(cache), sp, first, T, ptr(scores), 2) == 0
    probs = (scores.float() * 0.07).softmax(dim=-1).to(BF16)
    o = torch.empty(H, R, dtype=BF16)
    assert lib.dschat_bf16_mla_mix(ptr(probs), H, R, P, ptr(cache), sp, first, T, ptr(o), 2) == 0
    assert torch.equal(o, want)
    assert lib.dschat_bf16_mla_scores(ptr(q_lat), ptr(q_pe), H, R, P, ptr(cache), sp, first, 0, ptr(scores), 2) == 1


def test_linears_in_one_call_are_each_linear(lib):
    """dschat_bf16_linear_n (projections that read the same x, one parallel region): each output is
    cpu_bf16.linear's, bit for bit, for 1-3 weights of row counts not a multiple of 4, at 1 and 2 threads."""
    K = 520
    x = bf16(1, K, seed=1)
    ws = [bf16(N, K, seed=N, scale=0.05) for N in (37, 128, 3)]
    for n in (1, 2, 3):
        for threads in (1, 2):
            ys = [torch.full((1, w.shape[0]), float("nan"), dtype=BF16) for w in ws[:n]]
            err = lib.dschat_bf16_linear_n(ptr(x), ctypes.c_int64(K), ctypes.c_int64(n),
                                           (P_ * n)(*(w.data_ptr() for w in ws[:n])),
                                           (ctypes.c_int64 * n)(*(w.shape[0] for w in ws[:n])),
                                           (P_ * n)(*(y.data_ptr() for y in ys)), ctypes.c_int(threads))
            assert err == 0
            for y, w in zip(ys, ws):
                assert torch.equal(y, cpu_bf16.linear(x, w))


@pytest.fixture(scope="module")
def engines(checkpoints, lib):
    return {name: Engine.from_pretrained(checkpoints[name], dtype=BF16, speculative="none")
            for name in ("v3", "v2_lite")}


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(2, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("name", ["v3", "v2_lite"])
def test_the_lean_bf16_step_is_decode_step(engines, monkeypatch, name):
    """A bfloat16 engine's one-token step runs lean (Bf16Plan) and gives decode_step's logits at every step, bit
    for bit, teacher-forced (both fed the same tokens), and the same greedy tokens, whether the sequence's pages
    follow one another in the pool (its keys a view) or not (read at their slots)."""
    eng = engines[name]
    assert type(eng.static.lean) is Bf16Plan
    ids = prompt(40, seed=5)
    params = SamplingParams(max_tokens=70, ignore_eos=True)  # 110 rows: two pages
    fn = eng.static._fn
    monkeypatch.setattr(eng.static, "_fn", decode_step)
    want = list(eng.generate(ids, params, reuse_cache=False))
    monkeypatch.setattr(eng.static, "_fn", fn)
    lean_over_pages(eng, ids, params, want)
    logits = {}
    for which, step_fn in (("lean", fn), ("plain", decode_step)):
        got, feed = logits.setdefault(which, []), iter(want[:-1])

        def step(*a, step_fn=step_fn, got=got, feed=feed):
            a[1].fill_(next(feed))  # the ids buffer [1, 1]: the token this step embeds
            o = step_fn(*a)
            got.append((o[0].clone(), o[1].clone()))
            return o

        monkeypatch.setattr(eng.static, "_fn", step)
        list(eng.generate(ids, SamplingParams(max_tokens=30, ignore_eos=True), reuse_cache=False))
    assert len(logits["lean"]) == len(logits["plain"]) == 29
    for (h, lg), (h_want, lg_want) in zip(logits["lean"], logits["plain"]):
        assert h.dtype == BF16 and lg.dtype == torch.float32
        assert torch.equal(h, h_want) and torch.equal(lg, lg_want)


def test_the_lean_bf16_step_applies_only_to_bfloat16(checkpoints, engines, monkeypatch):
    """float32 keeps cpu_step's plan; DSCHAT_CPU_STEP=0 turns the lean step off for bfloat16 too; without the
    library (DSCHAT_CPU_GEMV=0) there is no bfloat16 plan (decode_step runs)."""
    f32 = Engine.from_pretrained(checkpoints["v2_lite"], dtype=torch.float32, speculative="none")
    assert type(f32.static.lean) is CpuPlan and Bf16Plan.build(f32.model) is None
    eng = engines["v2_lite"]
    assert CpuPlan.build(eng.model) is None
    monkeypatch.setenv("DSCHAT_CPU_STEP", "0")
    assert StaticDecoder(eng.model, eng.cache, eng.device, eng.context_length).lean is None
    monkeypatch.delenv("DSCHAT_CPU_STEP")
    monkeypatch.setattr(cpu_gemv, "_LIB", None)
    assert Bf16Plan.build(eng.model) is None
