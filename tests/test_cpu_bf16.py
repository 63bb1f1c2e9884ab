"""bfloat16 weights on the CPU through dschat's own kernels (kernels/cpu_bf16.py, cpu_gemv_bf16.cpp): the linear
layer against the float model of its bfloat16 numbers rounded once to bfloat16, the routed experts against
PyTorch's bfloat16 loop (only the chosen experts' rows read), and a bfloat16 model through them against the
same model through PyTorch's bfloat16 matmul."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import CHECKPOINTS

from dschat.dev import tiny_checkpoints as tc
from dschat.engine import Engine, SamplingParams
from dschat.engine.static import decode_step
from dschat.kernels import cpu_bf16, cpu_gemv
from dschat.kernels.fused_moe import moe_experts, moe_experts_loop


@pytest.fixture(scope="module")
def native():
    """The built kernel; where it cannot be built here, the test fails, naming why (nothing skipped silently)."""
    if not cpu_bf16.available():
        pytest.fail(f"cpu_gemv did not build: {cpu_gemv.cpu_supported() or 'see the line on stderr'}")


def bf16(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16)


def check_rounded_once(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor):
    """got == the exact sum x W^T rounded to bfloat16, wherever float32 summation in any order cannot change
    that rounding; elsewhere (the exact sum within float32 error of a midpoint between bfloat16 numbers) a
    bfloat16 number within that error. The error bound: K float32 roundings of at most S = sum |x_k w_k| each
    (|error| <= K u S, u = 2^-24)."""
    exact = x.double() @ w.double().T
    bound = x.shape[-1] * 2.0**-24 * (x.double().abs() @ w.double().abs().T)
    lo, hi = (exact - bound).to(torch.bfloat16), (exact + bound).to(torch.bfloat16)
    sure = lo == hi
    assert got.dtype == torch.bfloat16 and got.shape == exact.shape
    assert torch.equal(got[sure], exact.to(torch.bfloat16)[sure])
    assert bool(((got >= lo) & (got <= hi)).all())


@pytest.mark.parametrize("M, N, K", [(1, 70, 256), (1, 37, 300), (3, 64, 40), (4, 19, 2048), (5, 33, 520),
                                     (7, 130, 16), (67, 37, 600), (130, 50, 264)])
def test_linear_is_the_float_model_rounded_once(native, M, N, K):
    """Rows of x 1..4 (the GEMV: one weight row at a time), 5 and more (the GEMM: 6 x 16
    tiles, the rows and columns left over, K in blocks of 256); K a multiple of 16 or not (the tail)."""
    x, w = bf16(M, K, seed=M, scale=2.0), bf16(N, K, seed=K + N, scale=0.05)
    x[0, :8] = 0
    check_rounded_once(cpu_bf16.linear(x, w), x, w)
    # On a grid where float32 sums every order exactly (x in 1/8ths up to 1, w in 1/128ths up to 1/2: integer
    # multiples of 2^-10 below 2^20), the result is the exact sum rounded to nearest even, bit for bit: the
    # rounding itself, ties included, for every element.
    g = torch.Generator().manual_seed(M + N + K)
    xi = (torch.randint(-8, 9, (M, K), generator=g) / 8).to(torch.bfloat16)
    wi = (torch.randint(-64, 65, (N, K), generator=g) / 128).to(torch.bfloat16)
    exact = xi.double() @ wi.double().T
    assert torch.equal(cpu_bf16.linear(xi, wi), exact.to(torch.bfloat16))
    assert bool((exact != exact.to(torch.bfloat16).double()).any())  # some elements are rounded
    y32 = cpu_bf16.linear(x, w, out_dtype=torch.float32)  # float32 out: the sums themselves
    assert float((y32.double() - x.double() @ w.double().T).abs().max()) < 1e-4


def test_linear_keeps_leading_dimensions_and_torchs_special_values(native):
    """x [B, T, K] and a non-contiguous x; NaN and infinities come out as PyTorch's bfloat16 has them."""
    x, w = bf16(2, 3, 48, seed=1), bf16(20, 48, seed=2)
    got = cpu_bf16.linear(x, w)
    assert got.shape == (2, 3, 20)
    assert torch.equal(got, cpu_bf16.linear(x.transpose(0, 1).contiguous().transpose(0, 1), w))
    w[3, 5], w[4, 0] = float("nan"), float("inf")
    got = cpu_bf16.linear(x[0], w)
    want = torch.nn.functional.linear(x[0], w)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())


@pytest.mark.parametrize("trans", [True, False])
def test_bmm_on_views_is_the_float_model_rounded_once(native, trans):
    """MLA's absorbed attention: per head, a few query rows (a view striding over the heads) times a view of
    kv_b_proj's weight (one half of each head's rows), into a view of the output; each rounded once."""
    S, H, d, c = 3, 5, 24, 40
    w = bf16(H, 2 * d, c, seed=1, scale=0.1)
    w_half = w[:, d:]  # [H, d, c]: rows c apart, heads 2 d c apart
    x = bf16(S, H, c if trans else d, seed=2)
    y = torch.empty(S, H, d if trans else c, dtype=torch.bfloat16)
    cpu_bf16.bmm(x.transpose(0, 1), w_half, trans, out=y.transpose(0, 1))
    for h in range(H):
        check_rounded_once(y[:, h], x[:, h], w_half[h] if trans else w_half[h].T)


def stacks(E, H, I, seed=0):
    return bf16(E, 2 * I, H, seed=seed, scale=0.1), bf16(E, H, I, seed=seed + 1, scale=0.1)


@pytest.mark.parametrize("H, I", [(64, 48), (40, 24)])
def test_experts_read_only_the_chosen_rows(native, H, I):
    """One token (the decode call): PyTorch's bfloat16 loop's roundings, up to float32 summation order (a
    bfloat16 step here and there, in the intermediates too: within 2% of the output's range), ids outside
    0..E-1 contributing nothing; the other experts are NaN, so reading a row of them would show."""
    E = 8
    w13, w2 = stacks(E, H, I)
    ids = torch.tensor([[5, -1, 2, 8, 7]])
    weights = torch.tensor([[0.5, 0.3, 0.25, 0.9, 0.125]])
    for e in set(range(E)) - {2, 5, 7}:
        w13[e], w2[e] = float("nan"), float("nan")
    x = bf16(1, H, seed=3)
    got = moe_experts(x, w13, w2, ids, weights)
    want = moe_experts_loop(x, w13, w2, ids, weights)
    assert got.dtype == torch.bfloat16 and bool(got.isfinite().all())
    assert float((got.double() - want.double()).abs().max() / want.double().abs().max()) < 0.02
    # another expert in place of one chosen: far outside that tolerance (the rows chosen are the ones read)
    other = moe_experts_loop(x, w13.nan_to_num(0.01), w2.nan_to_num(0.01), torch.tensor([[5, -1, 3, 8, 7]]), weights)
    assert float((got.double() - other.double()).abs().max() / want.double().abs().max()) > 0.1


def test_experts_split_their_rows_over_threads_alike(native):
    """The one-token call reads its chosen experts' gate|up rows as one range over the threads, then their down
    rows (a range crossing from one expert into the next): the same bits at 1, 2 and 3 threads."""
    w13, w2 = stacks(5, 96, 37, seed=9)
    x = bf16(1, 96, seed=10)
    ids, weights = torch.tensor([[3, -1, 0, 7, 4]]), torch.tensor([[0.5, 0.9, 0.3, 0.8, 0.2]])
    before = torch.get_num_threads()
    got = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            got.append(moe_experts(x, w13, w2, ids, weights))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got[0], got[1]) and torch.equal(got[0], got[2])
    want = moe_experts_loop(x, w13, w2, ids, weights)
    assert float((got[0].double() - want.double()).abs().max() / want.double().abs().max()) < 0.02


@pytest.mark.parametrize("gemm", ["kernel", "auto"])
def test_experts_over_many_tokens(native, gemm, monkeypatch):
    """Prefill's shape: expert by expert over the kernel's GEMM (and, "auto", over PyTorch's matmul where the CPU
    multiplies bfloat16 natively: torch_gemm), against PyTorch's bfloat16 loop."""
    if gemm == "kernel":
        monkeypatch.setattr(cpu_bf16, "torch_gemm", lambda: False)
    w13, w2 = stacks(6, 64, 32, seed=5)
    x = bf16(9, 64, seed=6)
    ids = torch.randint(-1, 7, (9, 3), generator=torch.Generator().manual_seed(7))
    weights = torch.rand(9, 3, generator=torch.Generator().manual_seed(8))
    got, want = moe_experts(x, w13, w2, ids, weights), moe_experts_loop(x, w13, w2, ids, weights)
    assert float((got.double() - want.double()).abs().max() / want.double().abs().max()) < 0.02


def test_many_rows_run_pytorchs_matmul_where_the_cpu_has_bf16(native, monkeypatch):
    """torch_gemm: with AVX512-BF16 or AMX-BF16 among the CPU's flags (and oneDNN in PyTorch, turned on),
    TORCH_MIN_ROWS rows or more go to PyTorch's F.linear (its numbers exactly), fewer to the kernel; without those
    flags, with oneDNN off or with DSCHAT_BF16_GEMM=dschat, every row count runs the kernel."""
    w = bf16(48, 64, seed=9)
    few, many = bf16(cpu_bf16.TORCH_MIN_ROWS - 1, 64, seed=10), bf16(cpu_bf16.TORCH_MIN_ROWS, 64, seed=11)
    flags = {"avx2", "fma", "avx512f", "avx512bw", "avx512vl"}
    for extra, env, onednn, want in [({"avx512_bf16"}, None, True, True), ({"amx_bf16"}, None, True, True),
                                     (set(), None, True, False), ({"avx512_bf16"}, "dschat", True, False),
                                     ({"avx512_bf16"}, None, False, False)]:
        monkeypatch.setattr(cpu_gemv, "_cpu_flags", lambda extra=extra: flags | extra)
        monkeypatch.setattr(torch.backends.mkldnn, "enabled", onednn)
        if env:
            monkeypatch.setenv("DSCHAT_BF16_GEMM", env)
        else:
            monkeypatch.delenv("DSCHAT_BF16_GEMM", raising=False)
        cpu_bf16._bf16_arithmetic.cache_clear()
        try:
            assert cpu_bf16.torch_gemm() is (want and torch.backends.mkldnn.is_available())
            assert cpu_bf16.takes(few, w) and cpu_bf16.takes(many, w) is not cpu_bf16.torch_gemm()
            kernel = torch.equal(cpu_bf16.linear_or_torch(many, w), cpu_bf16.linear(many, w))
            pytorch = torch.equal(cpu_bf16.linear_or_torch(many, w), F.linear(many, w))
            assert pytorch if cpu_bf16.torch_gemm() else kernel
        finally:
            cpu_bf16._bf16_arithmetic.cache_clear()


@pytest.mark.parametrize("rows", [2, 3, 4])
def test_a_few_rows_get_decodes_bits(native, rows):
    """Below TORCH_MIN_ROWS rows (MTP's verify) linear_or_torch runs the kernel's GEMV whatever the CPU, and each
    row comes out as that row alone would (decode's one row): verifying a draft computes what decoding it does."""
    assert cpu_bf16.TORCH_MIN_ROWS == cpu_bf16.GEMV_MAX_ROWS + 1 == 5
    w = bf16(1024, 2048, seed=12, scale=0.02)
    x = bf16(rows, 2048, seed=13)
    y = cpu_bf16.linear_or_torch(x, w)
    for i in range(rows):
        assert torch.equal(y[i], cpu_bf16.linear_or_torch(x[i:i + 1], w)[0])


@pytest.fixture(scope="module")
def models(tmp_path_factory, native):
    """A V2-Lite-like tiny checkpoint on the CPU in bfloat16, and in float32."""
    path = tc.write_checkpoint(tmp_path_factory.mktemp("bf16") / "v2_lite", CHECKPOINTS["v2_lite"](), seed=3)
    return {dtype: Engine.from_pretrained(path, dtype=dtype, speculative="none")
            for dtype in (torch.bfloat16, torch.float32)}


def without_kernels(eng: Engine, fn):
    """fn(eng) through PyTorch's bfloat16 matmul: the library hidden, as DSCHAT_CPU_GEMV=0 hides it (and the
    lean step, which holds the library since the engine loaded, replaced by decode_step)."""
    saved, cpu_gemv._LIB = cpu_gemv._LIB, None
    saved_fn, eng.static._fn = eng.static._fn, decode_step
    try:
        return fn(eng)
    finally:
        cpu_gemv._LIB, eng.static._fn = saved, saved_fn


@pytest.mark.parametrize("path", ["prefill", "prefill-kernel", "decode"])
def test_bf16_model_equals_pytorchs_bf16(models, path, monkeypatch):
    """Prefill (the GEMM, the experts expert by expert: "prefill-kernel" the kernel's, "prefill" PyTorch's where
    the CPU multiplies bfloat16 natively, torch_gemm) and token-by-token decode (the GEMV, the experts' one
    call) against the same bfloat16 model through PyTorch. Both round to bfloat16 after every layer, in
    different float32 orders, so they drift apart by a few bfloat16 steps (2^-8 of a value each): the logits
    agree within 2% of their range, each is as close to the float32 model as the other (within 0.5%), and
    the next token is the same wherever PyTorch's top two logits are further apart than the drift."""
    eng = models[torch.bfloat16]
    ids = torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    if path == "prefill-kernel":
        monkeypatch.setattr(cpu_bf16, "torch_gemm", lambda: False)
    fn = (lambda e: e.logits(ids)) if path.startswith("prefill") else (lambda e: e.decode_logits(ids, chunk=1))
    got, want, f32 = fn(eng), without_kernels(eng, fn), fn(models[torch.float32])
    scale = want.abs().max()
    diff = (got - want).abs().max()
    assert float(diff / scale) < 0.02
    assert float((got - f32).abs().max() / scale) < float((want - f32).abs().max() / scale) + 0.005
    top2 = want.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * diff
    assert clear.float().mean() > 0.5
    assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])


def test_bf16_greedy_tokens(models):
    """Greedy decoding: the same 24 tokens through the kernels as through PyTorch's bfloat16 matmul."""
    eng = models[torch.bfloat16]
    ids = list(range(5, 60))
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    got = list(eng.generate(ids, params))
    want = without_kernels(eng, lambda e: list(e.generate(ids, params)))
    assert got == want


def test_attention_of_many_queries_runs_pytorchs_products(models, monkeypatch):
    """A follow-up turn's absorbed attention (TORCH_MIN_ROWS queries or more) runs the reference (PyTorch's
    bfloat16 products) where the CPU multiplies bfloat16 (torch_gemm), the kernel's below that or without it; the
    MLA layer's fold and unfold follow the same rule (the kernel's bmm called or not): chunks of 8 tokens through
    the absorbed attention give the same logits within bfloat16 rounding either way."""
    from dschat.kernels import mla_decode as md

    H, R, P = 16, 512, 64
    cache = bf16(100, R + P, seed=3, scale=0.5)
    eng = models[torch.bfloat16]
    ids = torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    real, got = cpu_bf16.bmm, {}
    for arithmetic in (True, False):
        monkeypatch.setattr(cpu_bf16, "torch_gemm", lambda: arithmetic)
        for S in (cpu_bf16.TORCH_MIN_ROWS - 1, cpu_bf16.TORCH_MIN_ROWS, 40):
            q_lat, q_pe = bf16(S, H, R, seed=S), bf16(S, H, P, seed=S + 1)
            assert cpu_bf16.torch_rows(S) is (S >= cpu_bf16.TORCH_MIN_ROWS and arithmetic)
            assert md.bf16_cpu_takes(q_lat, q_pe, cache) is not cpu_bf16.torch_rows(S)
        calls = []
        monkeypatch.setattr(cpu_bf16, "bmm", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
        got[arithmetic] = eng.decode_logits(ids, chunk=8)
        assert bool(calls) is not arithmetic  # the fold / unfold and attention of 8 queries: PyTorch's or the kernel's
    scale = got[False].abs().max()
    assert float((got[True] - got[False]).abs().max() / scale) < 0.02


@pytest.mark.parametrize("S, T", [(1, 37), (1, 300), (3, 90)])
def test_mla_decode_attention_in_bfloat16_is_the_reference(native, S, T):
    """mla_decode for bfloat16 on the CPU runs its three products through the batched kernel (the latent rows
    shared by every head, read in place): the reference's function (mla_decode_reference: each product rounded
    to bfloat16 once, softmax in float32) up to float32 summation order, which moves a rounded score by one
    bfloat16 step at most; scattered slots (pages), and S = 3 queries each seeing only its past."""
    from dschat.kernels import mla_decode as md

    H, R, P, n = 16, 512, 64, T + 40
    q_lat, q_pe, cache = bf16(S, H, R, seed=1), bf16(S, H, P, seed=2), bf16(n, R + P, seed=3, scale=0.5)
    slots = torch.randperm(n, generator=torch.Generator().manual_seed(4))[:T]
    q_pos = torch.arange(T - S, T)
    assert md.bf16_cpu_takes(q_lat, q_pe, cache)
    want = md.mla_decode_reference(q_lat, q_pe, cache, slots, q_pos, 0.06)
    with pytest.MonkeyPatch.context() as mp:  # mla_decode dispatches to it, not to the reference
        mp.setattr(md, "mla_decode_reference", lambda *a: pytest.fail("the reference ran"))
        got = md.mla_decode(q_lat, q_pe, cache, slots, q_pos, 0.06)
    assert got.shape == want.shape == (S, H, R) and got.dtype == torch.bfloat16
    assert float((got.double() - want.double()).abs().max() / want.double().abs().max()) < 1e-2
    if S > 1:  # the first query sees only its own past: the same as that query alone over its keys
        alone = md.mla_decode_bf16_cpu(q_lat[:1], q_pe[:1], cache, slots[: T - S + 1], q_pos[:1], 0.06)
        assert torch.equal(got[:1], alone)
