"""dschat's CPU GEMV for packed int8 / int4 weights (kernels/cpu_gemv.py, cpu_gemv.cpp) against its plain-PyTorch
reference: the float model of the dequantised weights applied to the dequantised int8 activations; and its
fallback, one line, when it cannot be built."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dschat.engine.quant import HEAD_INT6, QuantSpec, quantize
from dschat.kernels import cpu_gemv, quant_cpu
from dschat.kernels.quant_format import Packed, dequantize, pack_int6, unpack_int6

SPECS = {"int8": QuantSpec(8), "int4": QuantSpec(4), "int4-sym": QuantSpec(4, symmetric=True),
         "int4-g64": QuantSpec(4, group=64), "int4-g256": QuantSpec(4, group=256)}
# Tolerance: float32 sums in another order than the float64 reference, over up to a few thousand products.
TOL = 1e-5


@pytest.fixture(scope="module")
def native():
    """The built kernel; where it cannot be built here, the test fails, naming why (nothing skipped silently)."""
    mod = cpu_gemv.native()
    if mod is None:
        pytest.fail(f"cpu_gemv did not build: {cpu_gemv.cpu_supported() or 'see the line on stderr'}")
    return mod


def rel(got, want) -> float:
    return float((got.double() - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("M, N, K", [(1, 70, 256), (3, 64, 300), (32, 33, 2048), (5, 130, 40), (67, 37, 520)])
def test_gemv_equals_the_dequantised_model(native, name, M, N, K):
    """Rows of x 1 (decode's kernel) and 3..67 (the blocked one: tiles of 4 rows x 2 weight rows, and the
    rows and weight rows left over); K a multiple of 32, not one (300, 40, 520: the int8 tail, int4's padded
    group)."""
    g = torch.Generator().manual_seed(M * N + K)
    p = quantize(torch.randn(N, K, generator=g) * torch.linspace(0.1, 3, K), SPECS[name])
    x = torch.randn(M, K, generator=g) * torch.linspace(2, 0.01, K)  # blocks of very different scales
    x[0, :32] = 0  # an all-zero block (scale 0)
    assert cpu_gemv.fits(p)
    got = cpu_gemv.gemv(x, p)
    assert got.dtype == torch.float32 and got.shape == (M, N)
    assert rel(got, cpu_gemv.gemv_reference(x, p)) < TOL
    # and the int8 activations are what the reference says, exactly
    kp = -(-p.padded_in // 32) * 32
    assert torch.equal(cpu_gemv.q8_activations(x, kp), cpu_gemv.quantize_activations_reference(x, kp))
    # the blocked kernel and the one-row kernel: the same sums, in another float32 order at most
    one = torch.cat([cpu_gemv.gemv(x[i:i + 1], p) for i in range(M)])
    assert rel(got, one.double()) < TOL


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("H, nope, v, R, S", [(3, 40, 24, 100, 2), (2, 32, 16, 64, 1)])
def test_heads_fold_and_unfold_equal_the_dequantised_model(native, name, H, nope, v, R, S):
    """MLA's absorbed attention over a packed kv_b_proj [H * (nope + v), R] (engine/mla.py): the fold
    x[s, h] W_UK[h] (a contraction over the weight's rows) and the unfold W_UV[h] x[s, h], one call for all heads
    and tokens, equal the float model of the dequantised weight (float32 x, not quantized); q_nope a strided
    view inside q; R not a multiple of 32 (the int8 tails) and of the group (int4's padding); 1 and 2 threads."""
    g = torch.Generator().manual_seed(H * R + S)
    p = quantize(torch.randn(H * (nope + v), R, generator=g) * torch.linspace(0.1, 3, R), SPECS[name])
    q = torch.randn(S, H, nope + 8, generator=g)
    q_nope, o_lat = q[..., :nope], torch.randn(S, H, R, generator=g)
    before = torch.get_num_threads()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            fold = cpu_gemv.heads(q_nope, p, nope, 0, nope + v, transposed=True)
            unfold = cpu_gemv.heads(o_lat, p, v, nope, nope + v, transposed=False)
        finally:
            torch.set_num_threads(before)
        assert fold.shape == (S, H, R) and unfold.shape == (S, H, v)
        assert rel(fold, cpu_gemv.heads_reference(q_nope, p, nope, 0, nope + v, True)) < TOL
        assert rel(unfold, cpu_gemv.heads_reference(o_lat, p, v, nope, nope + v, False)) < TOL
    w = dequantize(p).double().view(H, nope + v, R)  # the reference itself, written another way
    assert rel(fold, torch.einsum("shn,hnr->shr", q_nope.double(), w[:, :nope])) < TOL
    with pytest.raises(ValueError, match="kernel cannot take"):  # rows past the weight's end: refused
        cpu_gemv.heads(o_lat, p, v + 1, nope, nope + v, transposed=False)


@pytest.mark.parametrize("name", SPECS)
def test_dequantize_is_the_stored_weight_exactly(native, name):
    """cpu_gemv.dequantize (the float weight the float GEMM's panels hold): quant_format.dequantize's float32
    numbers, bit for bit, K not a multiple of the group (int4's padding) nor of 32."""
    p = quantize(torch.randn(37, 300) * torch.linspace(0.1, 3, 300), SPECS[name])
    assert torch.equal(cpu_gemv.dequantize(p), dequantize(p))


def test_activation_quantization_costs_about_a_bfloat16_rounding():
    """The error the int8 activations add: within half a step (max|block| / 254) of x, element by element."""
    x = torch.randn(4, 512) * torch.linspace(0.01, 5, 512)
    xd = cpu_gemv.quantize_activations_reference(x)
    step = x.view(4, 16, 32).abs().amax(-1, keepdim=True) / 127
    assert bool(((xd - x).view(4, 16, 32).abs() <= step / 2 + 1e-7).all())


@pytest.mark.parametrize("name", ["int8", "int4"])
@pytest.mark.parametrize("threads, M", [(1, 1), (2, 1), (2, 2)])
def test_threads_split_the_rows(native, name, threads, M):
    """lm_head-like: many rows (an odd number: decode's kernel takes them two at a time, the last alone), split
    over torch.get_num_threads() threads; the same numbers either way."""
    p = quantize(torch.randn(3001, 256), SPECS[name])
    x = torch.randn(M, 256)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = cpu_gemv.gemv(x, p)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got, cpu_gemv.gemv(x, p))
    assert rel(got, cpu_gemv.gemv_reference(x, p)) < TOL


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_the_experts_call_splits_its_rows_over_threads_alike(native, name):
    """dschat_experts reads its chosen experts' gate|up rows as one range over the threads, then their down rows
    (odd row counts: the pairs, the last row alone, a range crossing from one expert into the next): the same
    numbers at 1, 2 and 3 threads, ids outside the stack contributing nothing, and close to the float model."""
    from dschat.kernels.quant_format import Packed

    s, E, H, I = SPECS[name], 5, 256, 97
    stack = lambda p, n: Packed(*(None if t is None else t.unflatten(0, (E, n)) for t in (p.data, p.scale, p.zero)),
                                p.bits, p.group, p.in_features)  # noqa: E731
    w13 = stack(quantize(torch.randn(E * 2 * I, H) * 0.1, s), 2 * I)
    w2 = stack(quantize(torch.randn(E * H, I) * 0.1, s), H)
    x, ids, weights = torch.randn(1, H), torch.tensor([3, -1, 0, 7, 4]), torch.tensor([0.5, 0.9, 0.3, 0.8, 0.2])
    before = torch.get_num_threads()
    got = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            got.append(cpu_gemv.experts(x, ids, weights, w13, w2))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got[0], got[1]) and torch.equal(got[0], got[2])
    want = torch.zeros(1, H)
    for e, w in ((3, 0.5), (0, 0.3), (4, 0.2)):
        g = cpu_gemv.gemv_reference(x, Packed(*(None if t is None else t[e] for t in (w13.data, w13.scale, w13.zero)),
                                              w13.bits, w13.group, w13.in_features))
        a = F.silu(g[:, :I]) * g[:, I:]
        want += w * cpu_gemv.gemv_reference(a, Packed(*(None if t is None else t[e] for t in (w2.data, w2.scale,
                                                                                            w2.zero)),
                                                      w2.bits, w2.group, w2.in_features))
    assert rel(got[0], want) < 3 * TOL


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("M, N, K", [(1, 16, 64), (7, 37, 70), (13, 50, 256), (100, 33, 300), (20, 64, 1100)])
def test_gemm_f32_is_the_float_model_of_the_dequantised_weight(native, name, M, N, K):
    """Prefill's float GEMM: x in float32 (not quantized) times the dequantised weight, to float32 rounding of
    the sum of |products| (summation order): rows past the 6-row tiles, weight rows past the 16-row strips and
    their 8-row blocks, K past the 256-input panels and their 8-input blocks, int4's padded group."""
    if K % 2 and name != "int8":
        K += 1
    g = torch.Generator().manual_seed(M * N + K)
    p = quantize(torch.randn(N, K, generator=g) * torch.linspace(0.1, 3, K), SPECS[name])
    x = torch.randn(M, K, generator=g) * torch.linspace(2, 0.01, K)
    wd = dequantize(p).double()
    got = cpu_gemv.gemm_f32(x, p)
    assert got.dtype == torch.float32 and got.shape == (M, N)
    bound = (x.double().abs() @ wd.abs().T) * K * 2 ** -24
    assert bool(((got.double() - x.double() @ wd.T).abs() <= bound).all())


@pytest.mark.parametrize("name", [n for n in SPECS if n != "int8"])
@pytest.mark.parametrize("M, N, K", [(7, 37, 70), (13, 50, 256), (100, 9, 300), (20, 64, 1100)])
def test_igemm4_computes_what_gemv_computes(native, name, M, N, K):
    """Prefill's int4 integer GEMM: gemv's numbers (the dequantised weight times the dequantised int8
    activations) up to float32 summation order: rows past the 6-row tiles, weight rows past the 8-row strips,
    K past the 512-input panels and int4's padded group, an all-zero block."""
    g = torch.Generator().manual_seed(M * N + K)
    p = quantize(torch.randn(N, K, generator=g) * torch.linspace(0.1, 3, K), SPECS[name])
    x = torch.randn(M, K, generator=g) * torch.linspace(2, 0.01, K)
    x[0, :32] = 0
    got = cpu_gemv.igemm4(x, p)
    assert got.dtype == torch.float32 and got.shape == (M, N)
    assert rel(got, cpu_gemv.gemv_reference(x, p)) < TOL


@pytest.mark.parametrize("M, N, K", [(7, 37, 70), (13, 50, 256), (100, 9, 300), (20, 64, 1100), (8, 16, 32)])
def test_igemm8_computes_what_gemv_computes(native, M, N, K):
    """Prefill's int8 integer GEMM (AVX512-VNNI builds): gemv's numbers up to float32 summation order, as igemm4's,
    with the same edges (K not a multiple of 32: the last block past the row's end reads zeros, not the next row or
    past the weight's end); on the largest inputs and weights, where the weight plus 128 times x is farthest from
    the exact product. Elsewhere the library says it has none, in a ValueError."""
    g = torch.Generator().manual_seed(M * N + K)
    p = quantize(torch.randn(N, K, generator=g) * torch.linspace(0.1, 3, K), SPECS["int8"])
    x = torch.randn(M, K, generator=g) * torch.linspace(2, 0.01, K)
    x[0, :32] = 0
    x[1] = torch.where(torch.arange(K) % 3 == 0, -1.0, 1.0)  # every x +-127 after quantization
    p.data[0] = torch.where(torch.arange(K) % 2 == 0, -128, 127).to(torch.int8)  # the int8 extremes
    if not cpu_gemv.has_igemm8():
        with pytest.raises(ValueError, match="error 5"):
            cpu_gemv.igemm8(x, p)
        return
    before = torch.get_num_threads()
    try:
        got = cpu_gemv.igemm8(x, p)
        torch.set_num_threads(1)
        one = cpu_gemv.igemm8(x, p)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got, one)  # the same bits on one thread: each output is one task's, whoever runs it
    assert got.dtype == torch.float32 and got.shape == (M, N)
    assert rel(got, cpu_gemv.gemv_reference(x, p)) < TOL
    assert (got[1] - cpu_gemv.gemv_reference(x[1:2], p)[0]).abs().max() <= 1e-6 * got[1].abs().max()


@pytest.mark.parametrize("name, rows", [("int8", 1), ("int8", 7), ("int8", 11), ("int8", 12), ("int8", 13),
                                        ("int8", 14), ("int8", 65), ("int4", 1), ("int4", 7), ("int4", 13),
                                        ("int4", 14), ("int4", 300)])
def test_matmul_cpu_runs_it_for_few_rows(native, name, rows):
    """quant_cpu.matmul_cpu: cpu_gemv's one-row-at-a-time integer kernel below gemm_min_rows rows (14; int8 12
    without its integer GEMM), a GEMM from there: the integer one (gemv's numbers), or for int8 without it the float
    GEMM (float32-exact); other leading dimensions and bfloat16 inputs keep their shape and dtype."""
    p = quantize(torch.randn(96, 384), SPECS[name])
    limit = quant_cpu.gemm_min_rows(p.bits)
    integer = name == "int4" or cpu_gemv.has_igemm8()
    assert limit == (14 if integer else 12)
    x = torch.randn(rows, 384)
    got = quant_cpu.matmul_cpu(x, p)
    if rows < limit:
        assert torch.equal(got, cpu_gemv.gemv(x, p))
    elif not integer:
        assert torch.equal(got, cpu_gemv.gemm_f32(x, p))
        assert rel(got, x.double() @ dequantize(p).double().T) < 1e-6
    else:
        assert torch.equal(got, cpu_gemv.igemm8(x, p) if name == "int8" else cpu_gemv.igemm4(x, p))
    if integer or rows < limit:
        assert rel(got, cpu_gemv.gemv_reference(x, p)) < TOL
    xb = x[:1].view(1, 1, 384).bfloat16()
    yb = quant_cpu.matmul_cpu(xb, p)
    assert yb.dtype == torch.bfloat16 and yb.shape == (1, 1, 96)


def test_groups_it_cannot_take_run_elsewhere(native):
    """int4 in groups of 32 (not a multiple of 64): PyTorch's path (repacked), within bfloat16 rounding."""
    p = quantize(torch.randn(64, 256), QuantSpec(4, group=32))
    assert not cpu_gemv.fits(p) and quant_cpu.int4_fits(p)
    x = torch.randn(1, 256)
    got = quant_cpu.matmul_cpu(x, quant_cpu.repack_int4(p))
    assert rel(got, x.double() @ dequantize(p).double().T) < 2e-2


@pytest.mark.parametrize("case", ["no compiler", "compiler fails", "turned off"])
def test_without_a_compiler_it_says_so_once_and_falls_back(tmp_path, case, monkeypatch, capfd):
    """An empty kernel cache and no C++ compiler on PATH, or a compiler that fails, or DSCHAT_CPU_GEMV=0: one
    line on stderr saying which (none when turned off), no traceback, and PyTorch's kernels compute the same
    weights. In this process, as a new one would start: the library not loaded yet (what `native()` keeps
    for the process is put back after), the environment of the case (a new process spent seconds importing torch)."""
    monkeypatch.setattr(cpu_gemv, "_LIB", cpu_gemv._UNSET)
    monkeypatch.setenv("DSCHAT_KERNELS_DIR", str(tmp_path / "kernels"))
    if case == "turned off":
        monkeypatch.setenv("DSCHAT_CPU_GEMV", "0")
    else:
        bindir = tmp_path / "bin"
        bindir.mkdir()
        os.symlink(sys.executable, bindir / "python")
        monkeypatch.setenv("PATH", str(bindir))
        monkeypatch.setenv("CXX", "no-such-compiler")
        if case == "compiler fails":
            (bindir / "c++").write_text("#!/bin/sh\necho 'cc1plus: fatal error: out of memory' >&2\nexit 1\n")
            (bindir / "c++").chmod(0o755)
    capfd.readouterr()
    p = quantize(torch.randn(64, 256), QuantSpec(4))
    x = torch.randn(1, 256)
    for _ in range(2):  # the note is said once, not at every use
        got = quant_cpu.matmul_cpu(x, quant_cpu.repack_int4(p) if quant_cpu.int4_fits(p) else p)
    want = x @ quant_cpu.dequantize_cpu(quant_cpu.repack_int4(p)).T
    assert cpu_gemv.native() is None
    assert float((got - want).abs().max() / want.abs().max()) < 2e-2
    err = capfd.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    if case == "turned off":
        assert lines == [], err
    elif case == "no compiler":
        assert len(lines) == 1 and lines[0].startswith("dschat: note: no C++ compiler"), err
    else:
        assert lines[0] == "dschat: building the CPU kernels (once; a few seconds) ..." and len(lines) == 2
        assert lines[1].startswith("dschat: note: building the CPU kernels failed (cc1plus: fatal error: out of "
                                   "memory)"), err
    assert not (tmp_path / "kernels").exists() or not any((tmp_path / "kernels").rglob("*.so"))


def test_it_builds_in_seconds_and_shares_torchs_openmp(tmp_path):
    """A fresh cache: one compiler call builds the library (no torch headers, no ninja), linked to the libgomp
    torch loaded (one OpenMP runtime, one pool of threads), and a second process loads it without building."""
    env = {**os.environ, "DSCHAT_KERNELS_DIR": str(tmp_path / "kernels")}
    script = ("import torch, sys\nfrom dschat.kernels import cpu_gemv\nassert cpu_gemv.native() is not None\n"
              "maps = open('/proc/self/maps').read()\n"
              "print(sorted({l.split()[-1] for l in maps.splitlines() if 'libgomp' in l}))")
    runs = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
            for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr
    assert "building the CPU kernels (once" in runs[0].stderr and runs[1].stderr.strip() == ""
    gomp = cpu_gemv.torch_libgomp()
    if gomp is not None:  # one runtime: torch's
        assert runs[1].stdout.strip() == str([str(gomp.resolve())]), runs[1].stdout


def test_the_build_key_counts_the_shared_header_and_the_package_ships_it(tmp_path, monkeypatch):
    """cpu_common.h is compiled into both sources: a change to it alone must build a new library (not load the
    old one), and an installed package must carry it beside the sources."""
    import tomllib
    from fnmatch import fnmatch

    before = cpu_gemv.sources_text()
    changed = tmp_path / "cpu_common.h"
    changed.write_text(cpu_gemv.HEADER.read_text() + "// changed\n")
    monkeypatch.setattr(cpu_gemv, "HEADER", changed)
    assert cpu_gemv.sources_text() != before
    root = Path(cpu_gemv.__file__).resolve().parent.parent
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["dschat.kernels"]
    for f in (cpu_gemv.SOURCE, cpu_gemv.SOURCE_BF16, Path(cpu_gemv.__file__).with_name("cpu_common.h")):
        assert any(fnmatch(f.name, g) for g in globs), f.name


def test_a_compiler_without_vnni_builds_the_avx2_library(tmp_path, monkeypatch, capfd):
    """On a CPU with AVX512-VNNI whose compiler rejects -mavx512vnni, the AVX2 library is built and used (said
    once, as any build is), and a marker beside the failed build keeps later starts from trying it again."""
    calls = tmp_path / "calls"
    cxx = tmp_path / "c++"
    real = cpu_gemv.compiler()
    cxx.write_text(f"#!/bin/sh\necho \"$*\" >> {calls}\ncase \"$*\" in *-mavx512vnni*) "
                   f"echo 'c++: error: unrecognized command-line option' >&2; exit 1;; esac\nexec {real} \"$@\"\n")
    cxx.chmod(0o755)
    monkeypatch.setenv("CXX", str(cxx))
    monkeypatch.setenv("DSCHAT_KERNELS_DIR", str(tmp_path / "kernels"))
    monkeypatch.delenv("DSCHAT_CPU_ISA", raising=False)
    monkeypatch.setattr(cpu_gemv, "_cpu_flags", lambda: {"avx2", "fma", "avx512f", "avx512bw", "avx512vl",
                                                          "avx512_vnni"})
    capfd.readouterr()
    lib, why = cpu_gemv._build()
    assert why is None and lib is not None and lib.dschat_vnni() == 0
    assert [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()] == [
        "dschat: building the CPU kernels (once; a few seconds) ..."]
    assert len(calls.read_text().splitlines()) == 2 and len(list((tmp_path / "kernels").rglob("failed"))) == 1
    lib, why = cpu_gemv._build()  # a later start: the AVX2 library, no compiler call
    assert why is None and lib.dschat_vnni() == 0 and len(calls.read_text().splitlines()) == 2
    assert capfd.readouterr().err.strip() == ""


def test_the_instruction_set_follows_the_cpu_and_can_be_forced(monkeypatch):
    """AVX512-VNNI (with F, BW and VL) builds the VNNI library, anything less the AVX2 one, DSCHAT_CPU_ISA=avx2
    the AVX2 one anyway; the two have other flags, so other build keys (one library each, never the other's)."""
    vnni = {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}
    monkeypatch.delenv("DSCHAT_CPU_ISA", raising=False)
    monkeypatch.setattr(cpu_gemv, "_cpu_flags", lambda: vnni)
    assert cpu_gemv.isa() == "avx512vnni" and "-mavx512vnni" in cpu_gemv.flags()
    key_vnni = cpu_gemv._key("src", "c++", None, cpu_gemv.flags())
    monkeypatch.setattr(cpu_gemv, "_cpu_flags", lambda: vnni - {"avx512vl"})
    assert cpu_gemv.isa() == "avx2" and cpu_gemv.flags() == cpu_gemv.FLAGS
    monkeypatch.setattr(cpu_gemv, "_cpu_flags", lambda: vnni)
    monkeypatch.setenv("DSCHAT_CPU_ISA", "avx2")
    assert cpu_gemv.isa() == "avx2" and cpu_gemv._key("src", "c++", None, cpu_gemv.flags()) != key_vnni


_SAME_BITS = """
import sys, torch
from dschat.engine.quant import QuantSpec, quantize
from dschat.kernels import cpu_gemv
from dschat.kernels.quant_format import Packed
g = torch.Generator().manual_seed(5)
out = {}
for name, s in (("int8", QuantSpec(8)), ("int4", QuantSpec(4)), ("int4-sym", QuantSpec(4, symmetric=True))):
    p = quantize(torch.randn(301, 520, generator=g) * torch.linspace(0.1, 3, 520), s)
    for M in (1, 3, 20):
        x = torch.randn(M, 520, generator=g) * torch.linspace(2, 0.01, 520)
        out[f"{name} gemv {M}"] = cpu_gemv.gemv(x, p)
        if name != "int8":
            out[f"{name} igemm4 {M}"] = cpu_gemv.igemm4(x, p)
    stack = lambda p, n: Packed(*(None if t is None else t.unflatten(0, (4, n)) for t in (p.data, p.scale, p.zero)),
                                p.bits, p.group, p.in_features)
    w13 = stack(quantize(torch.randn(4 * 2 * 96, 256, generator=g), s), 2 * 96)
    w2 = stack(quantize(torch.randn(4 * 256, 96, generator=g), s), 256)
    x = torch.randn(1, 256, generator=g)
    out[f"{name} experts"] = cpu_gemv.experts(x, torch.tensor([2, 0]), torch.tensor([0.7, 0.3]), w13, w2)
    if name == "int8":
        p6 = quantize(torch.randn(301, 520, generator=g), QuantSpec(6, group=64, symmetric=True))
        for M in (1, 3, 20):
            out[f"int6 gemv {M}"] = cpu_gemv.gemv(torch.randn(M, 520, generator=g), p6)
    kv_b = quantize(torch.randn(3 * 70, 520, generator=g), s)  # 3 heads of nope 40 + v 30 rows, R 520
    out[f"{name} fold"] = cpu_gemv.heads(torch.randn(2, 3, 40, generator=g), kv_b, 40, 0, 70, transposed=True)
    out[f"{name} unfold"] = cpu_gemv.heads(torch.randn(2, 3, 520, generator=g), kv_b, 30, 40, 70, transposed=False)
cache = torch.randn(300, 576, generator=g)
q_lat, q_pe = torch.randn(16, 512, generator=g) * 0.1, torch.randn(16, 64, generator=g) * 0.1
out["attend"] = cpu_gemv.mla_attend(q_lat, q_pe, cache, slice(3, 290), 0.07)
out["attend scattered"] = cpu_gemv.mla_attend(q_lat[:13], q_pe[:13], cache, torch.randperm(300, generator=g)[:157],
                                              0.07)
small = torch.randn(90, 44 + 8, generator=g)  # R 44: 5 blocks of 8 and 4 columns past them, the tiles' remainders
out["attend R 44"] = cpu_gemv.mla_attend(q_lat[:5, :44].contiguous(), q_pe[:5, :8].contiguous(), small, slice(1, 88),
                                         0.1)
lib = cpu_gemv.native()
for H, R, T in ((16, 512, 150), (5, 44, 87)):  # the bf16 step's weighted sum: its tiles, their remainders
    c16 = torch.randn(T + 3, R + 8, generator=g).bfloat16()
    p16 = torch.softmax(torch.randn(H, T, generator=g), -1).bfloat16()
    o16 = torch.empty(H, R, dtype=torch.bfloat16)
    assert lib.dschat_bf16_mla_mix(p16.data_ptr(), H, R, 8, c16.data_ptr(), None, 2, T, o16.data_ptr(), 2) == 0
    out[f"bf16 mix R {R}"] = o16
out["isa"] = cpu_gemv.isa()
out["vnni"] = lib.dschat_vnni()
torch.save(out, sys.argv[1])
"""


def test_the_vnni_and_avx2_builds_give_the_same_bits(native, tmp_path):
    """Where the CPU has AVX512-VNNI, its library's int8 / int4 kernels (one vpdpbusd for each maddubs + madd)
    and the AVX2 library's give the same results bit for bit: decode's kernel, the blocked one, int4's integer
    GEMM, the experts, MLA's fold and unfold and int6's GEMV (lm_head's), each build in its own process; and the
    float32 attention, whose tiles differ (4 rows x 4 heads and 4 heads x 32 columns with AVX-512's 32 registers,
    2 x 4 and 4 x 16 with AVX2's 16) while every sum keeps its order, and the bf16 step's weighted sum alike."""
    if cpu_gemv.isa() != "avx512vnni":
        pytest.skip("this CPU has no AVX512-VNNI: only the AVX2 library can run here")
    script = tmp_path / "same.py"
    script.write_text(_SAME_BITS)
    got = {}
    for isa in ("avx512vnni", "avx2"):
        env = {**os.environ, "DSCHAT_CPU_ISA": isa, "DSCHAT_KERNELS_DIR": str(tmp_path / "kernels")}
        r = subprocess.run([sys.executable, str(script), str(tmp_path / isa)], capture_output=True, text=True,
                           env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        got[isa] = torch.load(tmp_path / isa)
        assert got[isa].pop("isa") == isa
        assert got[isa].pop("vnni") == (isa == "avx512vnni")  # the dot products that library was built with
    assert len({p.name for p in (tmp_path / "kernels").iterdir()}) == 2  # two libraries, one for each
    for k, v in got["avx2"].items():
        assert torch.equal(v, got["avx512vnni"][k]), k


@pytest.mark.parametrize("H, R, P, T, scattered", [(16, 512, 64, 300, True), (16, 512, 64, 1, False),
                                                   (5, 36, 12, 70, False), (9, 64, 32, 130, True),
                                                   (5, 40, 0, 200, True)])
@pytest.mark.parametrize("threads", [1, 2])
def test_mla_attend_is_the_reference_attention(native, H, R, P, T, scattered, threads):
    """The lean step's attention (cpu_gemv.mla_attend, the library's dschat_mla_attend): mla_decode_reference at
    one query, up to float32 summation order, over rows read in place: consecutive (a slice) or scattered
    (row indices); heads in blocks of 8 and a partial one, R and P with and without a tail past 8."""
    from dschat.kernels.mla_decode import mla_decode_reference

    g = torch.Generator().manual_seed(H * T + R)
    cache = torch.randn(T + 50, R + P, generator=g)
    q_lat, q_pe = torch.randn(H, R, generator=g), torch.randn(H, P, generator=g)
    idx = torch.randperm(T + 50, generator=g)[:T] if scattered else torch.arange(20, 20 + T)
    keys = idx if scattered else slice(20, 20 + T)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = cpu_gemv.mla_attend(q_lat, q_pe, cache, keys, 0.07)
    finally:
        torch.set_num_threads(before)
    want = mla_decode_reference(q_lat[None].double(), q_pe[None].double(), cache.double(), idx,
                                torch.tensor([T - 1]), 0.07)[0]
    assert got.shape == (H, R)
    assert rel(got, want) < 1e-5


def test_mla_attend_refuses_rows_outside_the_cache(native):
    """Rows past the cache (a slice, or an index) raise IndexError as the reference's gather does, before the
    library reads anything; a cache of another width is refused."""
    cache, q_lat, q_pe = torch.randn(40, 72), torch.randn(4, 64), torch.randn(4, 8)
    for keys in (slice(30, 41), slice(-1, 5), torch.tensor([0, 40]), torch.tensor([-1])):
        with pytest.raises(IndexError):
            cpu_gemv.mla_attend(q_lat, q_pe, cache, keys, 0.1)
    with pytest.raises(ValueError, match="R \\+ P"):
        cpu_gemv.mla_attend(q_lat, q_pe, torch.randn(40, 80), slice(0, 4), 0.1)
    assert cpu_gemv.mla_attend(q_lat, q_pe, cache, slice(39, 40), 0.1).shape == (4, 64)  # the last row alone


def test_argmax_is_torchs(native):
    """dschat_argmax (the lean step's greedy token) against torch.argmax: ties to the first, NaN first, infinities,
    signed zeros, lengths off the vectors' 8."""
    g = torch.Generator().manual_seed(3)
    cases = [torch.randn(n, generator=g) for n in (1, 7, 8, 9, 102400, 102401)]
    t = torch.randint(0, 4, (1000,), generator=g).float()  # many ties
    cases += [t, -t, torch.full((37,), float("-inf")), torch.tensor([0.0, -0.0, -1.0]), torch.tensor([-0.0, 0.0])]
    for where in (0, 5, 8, 998):
        for bad in (float("nan"), float("inf")):
            c = torch.randn(1000, generator=g)
            c[where] = bad
            c[where + 1] = bad
            cases.append(c)
    for c in cases:
        assert cpu_gemv.argmax(c) == int(torch.argmax(c)), c
    with pytest.raises(ValueError):
        cpu_gemv.argmax(torch.zeros(0))


@pytest.mark.parametrize("K", [2048, 520, 100])
def test_int6_weights_pack_and_multiply_as_their_float_model(native, K):
    """lm_head's int6 (under --quant int4): values 0..63 pack into 48 bytes per 64 and back; quantizing keeps
    each weight within half a step of its group's scale; gemv (one row: decode's kernel; more: the blocked one)
    equals the float model of the dequantised weight applied to the kernel's int8 activations; the library's
    other kernels refuse it."""
    g = torch.Generator().manual_seed(6)
    v = torch.randint(0, 64, (7, 3 * 64), generator=g, dtype=torch.uint8)
    packed = pack_int6(v)
    assert packed.shape == (7, 3 * 48) and torch.equal(unpack_int6(packed), v)
    w = torch.randn(301, K, generator=g) * torch.linspace(0.1, 3, K)
    p = quantize(w, HEAD_INT6)
    assert p.bits == 6 and p.zero is None and p.padded_in == -(-K // 64) * 64 and cpu_gemv.fits(p)
    step = p.scale.repeat_interleave(64, dim=1)[:, :K]
    assert bool(((dequantize(p) - w).abs() <= step / 2 * (1 + 1e-5)).all())
    for M in (1, 2, 3, 20, 70):
        x = torch.randn(M, K, generator=g)
        want = cpu_gemv.gemv_reference(x, p)
        assert float((cpu_gemv.gemv(x, p).double() - want).abs().max() / want.abs().max()) < 1e-5, M
    with pytest.raises(ValueError):
        cpu_gemv.gemm_f32(torch.randn(16, K, generator=g), p)
    with pytest.raises(ValueError):
        cpu_gemv.igemm4(torch.randn(16, K, generator=g), p)
    with pytest.raises(ValueError):
        cpu_gemv.igemm8(torch.randn(16, K, generator=g), p)
