"""dschat's own CPU GEMV for packed int8 / int4 weights (cpu_gemv.cpp: AVX2 + FMA, and AVX512-VNNI's dot product
where the CPU has it: `isa`), built at first use; the same library holds the float32 one-token decode step's
small operations (RMSNorm, RoPE and the latent row, SwiGLU, the router, the experts' weighted sum:
engine/cpu_step.py).

The C++ source (no torch headers: C entry points over raw pointers) is compiled once per machine by one call
of the system compiler (`$CXX`, else c++ / g++; a few seconds) into a shared library in dschat's cache
directory, $XDG_CACHE_HOME/dschat/kernels/<key>/ (or $DSCHAT_KERNELS_DIR/<key>/), the key naming the source,
the flags (the instruction set's among them: a library for each) and the OpenMP runtime, and loaded with
ctypes (which releases the GIL during a call); a later start loads the built library directly and compiles
nothing. It is compiled with -fopenmp and linked against the
libgomp that torch ships (torch/lib), so torch's threads and the kernel's are one OpenMP runtime's pool; each
call passes torch.get_num_threads(). Where the CPU lacks AVX2/FMA, or there is no C++ compiler, or the build
fails, `native()` returns None after saying so in one line on stderr, once per process, and
kernels/quant_cpu.py runs PyTorch's packed kernels instead. DSCHAT_CPU_GEMV=0 turns it off.

Numerics (cpu_gemv.cpp's header): each row of x is quantized to int8 in blocks of 32 (scale max|x|/127 per
block, round to nearest even), the weight is the stored one exactly, products are summed in integers per
block and in float32 across blocks. So the result is that of a float model of the dequantised weights applied
to the dequantised activations (`gemv_reference`), up to float32 summation order. For many rows (prefill) the
same library has three GEMMs: `igemm4` (int4) and, in a build for AVX512-VNNI, `igemm8` (int8): the same int8
activations, so `gemv`'s numbers up to summation order; and `gemm_f32` (x in float32, not quantized, times the
dequantised weight: F.linear(x, dequantize(w)) up to summation order; quant_cpu.py runs it for int8 prefill
where there is no `igemm8`).

Plain functions over tensors (`gemv`, `gemm_f32`, `igemm4`, `igemm8`, `experts`), so that they can be wrapped as custom
ops.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from . import quant_format
from .quant_format import SYMMETRIC_ZERO, Packed, dequantize

QK = 32  # activation block
SOURCE = Path(__file__).with_name("cpu_gemv.cpp")
SOURCE_BF16 = Path(__file__).with_name("cpu_gemv_bf16.cpp")  # bfloat16 weights (cpu_bf16.py), in the same library
HEADER = Path(__file__).with_name("cpu_common.h")  # included by both
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-fPIC", "-shared", "-std=c++17"]
# What each instruction set adds to FLAGS: with AVX512-VNNI the integer dot products are one vpdpbusd (cpu_common.h's
# dot4 / dot8: the same int32 sums as AVX2's maddubs + madd, so the same results bit for bit).
ISA_FLAGS = {"avx2": [], "avx512vnni": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"]}
ABI = 5  # cpu_gemv.cpp's dschat_abi_version()
ABI_BF16 = 5  # cpu_gemv_bf16.cpp's dschat_bf16_abi_version()
ABI_PREFILL = 2  # cpu_gemv.cpp's dschat_prefill_abi_version() (prefill's GEMMs: gemm_f32, igemm4, igemm8)


def cache_dir() -> Path:
    """Where the built library lives: $DSCHAT_KERNELS_DIR, else dschat's cache directory + /kernels."""
    if os.environ.get("DSCHAT_KERNELS_DIR"):
        return Path(os.environ["DSCHAT_KERNELS_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dschat" / "kernels"


def torch_libgomp() -> Path | None:
    """The OpenMP runtime torch itself loaded (torch/lib/libgomp*.so*), which the kernel links against."""
    found = sorted((Path(torch.__file__).parent / "lib").glob("libgomp*.so*"))
    return found[0] if found else None


def _key(src: str, cxx: str, gomp: Path | None, flags: list[str]) -> str:
    h = hashlib.sha256("\0".join([src, " ".join(flags), cxx, str(gomp), sys.platform]).encode()).hexdigest()[:16]
    return f"dschat_cpu_gemv_{h}"


def _cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo's first "flags" line; empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def isa() -> str:
    """The instruction set the library is built for: "avx512vnni" where the CPU has AVX512-VNNI (with AVX512 F, BW
    and VL), else "avx2". DSCHAT_CPU_ISA=avx2 builds the AVX2 one anyway (to compare, or to test it here)."""
    if os.environ.get("DSCHAT_CPU_ISA") == "avx2":
        return "avx2"
    return "avx512vnni" if {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= _cpu_flags() else "avx2"


def flags() -> list[str]:
    """The compiler's flags for this CPU: FLAGS and its instruction set's (`isa`)."""
    return FLAGS + ISA_FLAGS[isa()]


def cpu_supported() -> str | None:
    """Why this CPU cannot run the kernel (None: it can)."""
    if os.environ.get("DSCHAT_CPU_GEMV", "1") == "0":
        return "DSCHAT_CPU_GEMV=0"
    cap = torch.backends.cpu.get_cpu_capability()
    if cap not in ("AVX2", "AVX512"):
        return f"this CPU has no AVX2 (PyTorch reports {cap})"
    cpu = _cpu_flags()  # empty where /proc/cpuinfo cannot be read: then trusted
    if cpu and "fma" not in cpu:
        return "this CPU has no FMA"
    return None


def _say(msg: str):
    print(f"dschat: {msg}", file=sys.stderr, flush=True)


def compiler() -> str | None:
    """The C++ compiler: $CXX, else c++, else g++ (None: none on PATH)."""
    for cxx in (os.environ.get("CXX"), "c++", "g++"):
        if cxx and shutil.which(cxx):
            return cxx
    return None


def _load(path: Path):
    lib = ctypes.CDLL(str(path))
    if (lib.dschat_abi_version() != ABI or lib.dschat_bf16_abi_version() != ABI_BF16
            or lib.dschat_prefill_abi_version() != ABI_PREFILL):
        raise OSError("a library of another version")
    P, I64, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.dschat_gemv.argtypes = [P, I64, I64, P, P, P, I, I64, I64, I64, P, I]
    lib.dschat_gemv.restype = I
    # the same function, called with ctypes values made in advance (no per-argument conversion): gemv's
    raw = ctypes.CDLL(str(path))
    lib.dschat_gemv_raw = raw.dschat_gemv
    lib.dschat_gemv_raw.restype = I
    lib.dschat_experts_raw = raw.dschat_experts  # the same, for the lean step's prepared arguments
    lib.dschat_experts_raw.restype = I
    lib.dschat_gemm_f32.argtypes = [P, I64, I64, P, P, P, I, I64, I64, I64, P, I]
    lib.dschat_gemm_f32.restype = I
    lib.dschat_igemm4.argtypes = [P, I64, I64, P, P, P, I, I64, I64, I64, P, I]
    lib.dschat_igemm4.restype = I
    lib.dschat_igemm8.argtypes = [P, I64, I64, P, P, P, I, I64, I64, I64, P, I]
    lib.dschat_igemm8.restype = I
    for name in ("dschat_heads_gemv", "dschat_heads_gemv_t"):  # called with ctypes values made in advance
        getattr(lib, name).restype = I
    lib.dschat_vnni.restype = I
    lib.has_vnni = lib.dschat_vnni() == 1  # built for AVX512-VNNI (has_igemm8)
    lib.dschat_mla_attend.argtypes = [P, P, I64, I64, I64, P, P, I64, I64, ctypes.c_float, P, I]
    lib.dschat_mla_attend.restype = I
    lib.dschat_experts.argtypes = [P, I64, P, P, I64, P, P, P, P, P, P, I64, I64, I64, I64, I, I64, P, I]
    lib.dschat_experts.restype = I
    lib.dschat_dequantize.argtypes = [P, P, P, I, I64, I64, I64, I64, P, I]
    lib.dschat_dequantize.restype = I
    lib.dschat_q8_activations.argtypes = [P, I64, I64, I64, P]
    lib.dschat_q8_activations.restype = None
    F = ctypes.c_float
    for name, args in (("dschat_add_rms", [P, P, P, F, I64, P]),
                       ("dschat_rope_latent", [P, I64, I64, I64, P, I64, I64, P, F, P, P, P, P]),
                       ("dschat_silu_mul", [P, I64, P]),
                       ("dschat_axpy", [P, P, F, I64, I]),
                       ("dschat_route", [P, I64, P, I, I, I, I, I, I, F, I64, P, P]),
                       ("dschat_bf16_add_sq", [P, P, I64, P]),
                       ("dschat_bf16_rms", [P, P, P, F, I64, P]),
                       ("dschat_bf16_rope_latent", [P, I64, I64, I64, P, I64, I64, P, P, F, P, P, P, P]),
                       ("dschat_bf16_silu_mul", [P, I64, P, I]),
                       ("dschat_bf16_add", [P, P, I64])):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, None
    lib.dschat_argmax.argtypes, lib.dschat_argmax.restype = [P, I64], I64
    lib.dschat_bf16_mla_scores.argtypes = [P, P, I64, I64, I64, P, P, I64, I64, P, I]
    lib.dschat_bf16_mla_mix.argtypes = [P, I64, I64, I64, P, P, I64, I64, P, I]
    lib.dschat_bf16_mla_scores.restype = lib.dschat_bf16_mla_mix.restype = I
    lib.dschat_bf16_linear_raw = raw.dschat_bf16_linear  # the bfloat16 lean step's prepared arguments
    lib.dschat_bf16_linear_raw.restype = I
    lib.dschat_bf16_linear_n.restype = I  # called with ctypes values made in advance
    return lib


def check(err: int, what: str = "a weight the kernel cannot take"):
    """A library call's status: 0, else the error its callers raise (by default: a weight the kernel cannot
    take)."""
    if err:
        raise ValueError(f"cpu_gemv: {what} (error {err})")


def sources_text() -> str:
    """Every file the compiler reads (the two sources and the header both include): the build key hashes it."""
    return "\0".join(p.read_text() for p in (SOURCE, SOURCE_BF16, HEADER))


def _build():
    why = cpu_supported()
    if why:
        return None, why
    src = sources_text()
    cxx = compiler()
    gomp = torch_libgomp()
    # the CPU's instruction set first; where that build fails (a compiler without AVX512-VNNI, say), the AVX2
    # one: a failed build leaves a marker beside it, so later starts go straight to the next
    first = flags()
    tries = [first] + ([FLAGS] if first != FLAGS else [])
    said, why = False, None
    for fl in tries:
        name = _key(src, cxx or "", gomp, fl)
        d = cache_dir() / name
        so = d / f"{name}.so"
        if so.exists():
            try:
                return _load(so), None
            except (OSError, AttributeError):  # a damaged or foreign file: build again
                pass
        if cxx is None:
            return None, "no C++ compiler (c++ / g++)"
        if (d / "failed").exists() and fl is not tries[-1]:
            continue
        if not said:
            _say("building the CPU kernels (once; a few seconds) ...")
            said = True
        lib, why = _compile(cxx, fl, gomp, d, so)
        if lib is not None:
            return lib, None
        if fl is not tries[-1]:
            try:
                (d / "failed").write_text(why + "\n")
            except OSError:
                pass
    return None, why


def _compile(cxx: str, fl: list[str], gomp: Path | None, d: Path, so: Path):
    """One compiler call into `so` (written whole or not at all): (the loaded library, None) or (None, why)."""
    # -fopenmp compiles the pragmas; torch's libgomp named first is the runtime the library is linked to (it
    # carries the same soname as the system's, so the loader binds the one torch already loaded).
    link = [str(gomp), f"-Wl,-rpath,{gomp.parent}"] if gomp else []
    try:
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=d) as tmp:
            out = Path(tmp) / so.name
            r = subprocess.run([cxx, *fl, str(SOURCE), str(SOURCE_BF16), *link, "-o", str(out)],
                               capture_output=True, text=True, timeout=600)
            if r.returncode != 0:
                lines = [x for x in (r.stderr or r.stdout).splitlines() if x.strip()]
                return None, f"building the CPU kernels failed ({lines[-1] if lines else f'exit {r.returncode}'})"
            os.replace(out, so)  # whole or not at all: another process may be loading it
        return _load(so), None
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"building the CPU kernels failed ({e})"


def native():
    """The loaded library (ctypes), or None (said once)."""
    global _LIB
    if _LIB is _UNSET:
        lib, why = _build()
        _LIB = lib
        if why and why != "DSCHAT_CPU_GEMV=0":
            _say(f"note: {why}; packed int8/int4 and bfloat16 weights and the float32 decode step run on "
                 "PyTorch's slower paths")
    return _LIB


_UNSET = object()
_LIB = _UNSET


def fits(w: Packed) -> bool:
    """Whether the kernel takes this packed weight (int8; int4 and int6 in groups of a multiple of 64; int6, the
    CPU's lm_head under int4, through `gemv` only)."""
    return w.bits == 8 or (w.group > 0 and w.group % (2 * QK) == 0)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(w: Packed, lead: int):
    """The stored tensors as the library reads them (a wrong one raises here, never reads astray there); their
    shapes were checked against each other on load (engine/quant.py)."""
    d, s = w.data, w.scale
    if not (d.dtype == (torch.int8 if w.bits == 8 else torch.uint8) and s.dtype == torch.float32
            and d.dim() == 2 + lead and d.is_contiguous() and s.is_contiguous()
            and (w.zero is None or (w.zero.dtype == torch.uint8 and w.zero.is_contiguous()))):
        raise ValueError("cpu_gemv: a packed weight of another layout")


def _rows(x: torch.Tensor, K: int) -> torch.Tensor:
    """x as contiguous float32 rows (itself when it is already: no copy, no dispatch)."""
    if x.dtype == torch.float32 and x.is_contiguous():
        return x
    return x.reshape(-1, K).to(torch.float32).contiguous()


_C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


def weight_args(w: Packed) -> tuple:
    """The weight's arguments as ctypes values, made once per Packed (a decode step's calls then convert only
    x's; ctypes' per-argument conversion is most of a small call's cost): (data, scale, zero, N, args), args
    being dschat_gemv's (data, scale, zero, bits, group, N, row). Kept with the tensors they point into, and
    remade when w's tensors are other objects."""
    c = w.__dict__.get("_cpu_gemv_args")
    if c is None or c[0] is not w.data or c[1] is not w.scale or c[2] is not w.zero:
        _check(w, 0)
        P, I64, I = _C
        N, row = w.data.shape
        args = (P(w.data.data_ptr()), P(w.scale.data_ptr()), P(_ptr(w.zero)), I(w.bits), I64(w.group), I64(N),
                I64(row))
        c = (w.data, w.scale, w.zero, N, args)
        w.__dict__["_cpu_gemv_args"] = c
    return c


def _rows_through(fn: str, x: torch.Tensor, w: Packed) -> torch.Tensor:
    """x [..., K] -> [..., N] in x's dtype through one of the library's row kernels taking (x, M, K, the weight's
    arguments, y, threads): dschat_gemv_raw, dschat_gemm_f32, dschat_igemm4, dschat_igemm8."""
    lib = native() if _LIB is _UNSET else _LIB
    _, _, _, N, wargs = weight_args(w)
    K = x.shape[-1]
    xf = _rows(x, K)
    y = torch.empty(*x.shape[:-1], N)
    P, I64, I = _C
    err = getattr(lib, fn)(P(xf.data_ptr()), I64(xf.numel() // K), I64(K), *wargs, P(y.data_ptr()),
                           I(torch.get_num_threads()))
    check(err)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def gemv(x: torch.Tensor, w: Packed) -> torch.Tensor:
    """x [..., K] (float32 or bfloat16) -> [..., N] in x's dtype through the kernel (native() must not be None,
    fits(w) hold)."""
    return _rows_through("dschat_gemv_raw", x, w)


def gemm_f32(x: torch.Tensor, w: Packed) -> torch.Tensor:
    """x [..., K] -> [..., N] in x's dtype: x in float32 (not quantized) times the dequantised weight, a float32
    GEMM whose weight panels are dequantised in registers (cpu_gemv.cpp's fgemm): `F.linear(x, dequantize(w))`
    up to float32 summation order, without the float32 weight in memory. For many rows (prefill); native() must
    not be None, fits(w) hold."""
    return _rows_through("dschat_gemm_f32", x, w)


def igemm8(x: torch.Tensor, w: Packed) -> torch.Tensor:
    """x [..., K] -> [..., N] in x's dtype through an int8 weight by the integer GEMM (cpu_gemv.cpp's igemm8): as
    `igemm4`, x quantized to int8 blocks as `gemv` quantizes it, so `gemv`'s numbers up to float32 summation
    order. For many rows; only where the library is built with AVX512-VNNI (`has_igemm8`), fits(w) holds and w
    is int8."""
    return _rows_through("dschat_igemm8", x, w)


def has_igemm8() -> bool:
    """Whether the library runs `igemm8`: built (native()) for AVX512-VNNI, whose dpbusd it needs (AVX2's
    maddubs would overflow on the int8 weight plus 128)."""
    lib = native() if _LIB is _UNSET else _LIB
    return lib is not None and lib.has_vnni


def heads(x: torch.Tensor, w: Packed, n: int, row0: int, head_rows: int, transposed: bool) -> torch.Tensor:
    """MLA's absorbed fold / unfold over a packed kv_b_proj w [N, K]: x [S, H, ·] (rows of each head), head h's
    weight W_h = the n rows of w from row0 + h * head_rows. transposed False: y[s, h] = W_h x[s, h] (x [S, H, K]
    -> [S, H, n]); True: y[s, h] = x[s, h] W_h (x [S, H, n] -> [S, H, K]); both with float32 x (not quantized,
    unlike `gemv`'s), the weight dequantised in registers: the float model's numbers to float32 rounding. x may
    be a view whose rows are evenly spaced (q_nope inside q). Returns y in x's dtype (native() must not be
    None, fits(w) hold)."""
    lib = native() if _LIB is _UNSET else _LIB
    _, _, _, _, wargs = weight_args(w)
    S, H, dim = x.shape
    xf = x if x.dtype == torch.float32 else x.to(torch.float32)
    if not (xf.stride(2) == 1 and xf.stride(0) == H * xf.stride(1)):
        xf = xf.contiguous()
    width = w.in_features if transposed else n
    if dim != (n if transposed else w.in_features):
        raise ValueError(f"cpu_gemv.heads: x of {dim} values a head, the weight takes "
                         f"{n if transposed else w.in_features}")
    y = torch.empty(S, H, width)
    P, I64, I = _C
    fn = lib.dschat_heads_gemv_t if transposed else lib.dschat_heads_gemv
    err = fn(P(xf.data_ptr()), I64(xf.stride(1)), I64(S * H), I64(H), I64(w.in_features), *wargs, I64(n), I64(row0),
             I64(head_rows), P(y.data_ptr()), I64(width), I(torch.get_num_threads()))
    check(err)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def argmax(v: torch.Tensor) -> int:
    """The index torch.argmax gives for a float32 vector (the first of equal largest values, the first NaN where
    there is one), by the library's dschat_argmax (the lean step's greedy token; native() must not be None)."""
    lib = native() if _LIB is _UNSET else _LIB
    if not (v.dtype == torch.float32 and v.dim() == 1 and v.numel() > 0 and v.is_contiguous()):
        raise ValueError("cpu_gemv.argmax: a contiguous float32 vector of one value or more")
    return int(lib.dschat_argmax(v.data_ptr(), v.numel()))


def attend_keys(keys: torch.Tensor | slice) -> tuple:
    """dschat_mla_attend's keys: (the tensor to keep alive while the call runs or None, slots (a pointer or
    None), first, T) for a slice of consecutive cache rows or a tensor of row indices."""
    if isinstance(keys, slice):
        return None, None, keys.start, keys.stop - keys.start
    keep = keys if keys.dtype == torch.int64 and keys.is_contiguous() else keys.to(torch.int64).contiguous()
    return keep, keep.data_ptr(), 0, keep.numel()


def mla_attend(q_lat: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, keys: torch.Tensor | slice,
               scale: float) -> torch.Tensor:
    """MLA's absorbed attention for one query (the lean decode step's, cpu_step.py): q_lat [H, R], q_pe [H, P],
    cache [N, R + P] float32 rows [c_kv | k_pe], keys the rows attended (a slice of consecutive rows, or a
    tensor of row indices) -> o_lat [H, R] = softmax(scale (q_lat c_kv^T + q_pe k_pe^T)) c_kv over those rows,
    read in place (kernels/mla_decode.py's mla_decode_reference at one query, up to float32 summation order;
    native() must not be None). Rows outside the cache raise IndexError, as the reference's gather does."""
    lib = native() if _LIB is _UNSET else _LIB
    (H, R), P = q_lat.shape, q_pe.shape[-1]
    N = cache.shape[0]
    if not (q_pe.shape == (H, P) and cache.shape[-1] == R + P and cache.stride(-1) == 1 and cache.stride(0) == R + P
            and q_lat.dtype == q_pe.dtype == cache.dtype == torch.float32):
        raise ValueError("cpu_gemv.mla_attend: q_lat [H, R], q_pe [H, P] and rows [N, R + P], float32")
    if isinstance(keys, slice):
        if keys.step not in (None, 1) or keys.start is None or not 0 <= keys.start < keys.stop <= N:
            raise IndexError(f"cpu_gemv.mla_attend: rows {keys} of a cache of {N}")
    elif keys.numel() == 0 or int(keys.min()) < 0 or int(keys.max()) >= N:
        raise IndexError(f"cpu_gemv.mla_attend: a row outside the cache's {N}")
    keep, slots, first, T = attend_keys(keys)
    ql, qp = q_lat.contiguous(), q_pe.contiguous()
    out = torch.empty(H, R, dtype=torch.float32)
    check(lib.dschat_mla_attend(ql.data_ptr(), qp.data_ptr(), H, R, P, cache.data_ptr(), slots, first, T, scale,
                                out.data_ptr(), torch.get_num_threads()), "bad attention arguments")
    return out


def igemm4(x: torch.Tensor, w: Packed) -> torch.Tensor:
    """x [..., K] -> [..., N] in x's dtype through an int4 weight by the integer GEMM (cpu_gemv.cpp's igemm4): x
    quantized to int8 blocks as `gemv` quantizes it, so `gemv`'s numbers (gemv_reference) up to float32
    summation order. For many rows; native() must not be None, fits(w) hold and w be int4."""
    return _rows_through("dschat_igemm4", x, w)


def heads_reference(x: torch.Tensor, w: Packed, n: int, row0: int, head_rows: int, transposed: bool) -> torch.Tensor:
    """What `heads` computes, in float64 plain PyTorch: x times the dequantised weight's rows of each head."""
    S, H, _ = x.shape
    W = dequantize(w).double()
    Wh = torch.stack([W[row0 + h * head_rows: row0 + h * head_rows + n] for h in range(H)])  # [H, n, K]
    if transposed:
        return torch.einsum("shn,hnk->shk", x.double(), Wh)
    return torch.einsum("shk,hnk->shn", x.double(), Wh)


def experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w13: Packed, w2: Packed) -> torch.Tensor:
    """One token x [1, H] through its chosen experts ids [k] with routing weights [k], over packed stacks
    w13 [E, 2I, H] (gate rows, then up rows) and w2 [E, H, I]: fused_moe.moe_experts's function in one call,
    each expert's weights read once, its intermediate quantized as x is (ids outside 0..E-1: nothing)."""
    lib = native() if _LIB is _UNSET else _LIB
    _check(w13, 1)
    _check(w2, 1)
    H = x.shape[-1]
    assert x.numel() == H, "one token"
    E, I2 = w13.data.shape[:2]
    xf = _rows(x, H)
    idc = ids if ids.dtype == torch.int64 and ids.is_contiguous() else ids.to(torch.int64).contiguous()
    wc = _rows(weights, weights.shape[-1])
    y = torch.empty(x.shape)
    err = lib.dschat_experts(xf.data_ptr(), H, idc.data_ptr(), wc.data_ptr(), min(idc.numel(), wc.numel()),
                             w13.data.data_ptr(), w13.scale.data_ptr(), _ptr(w13.zero), w2.data.data_ptr(),
                             w2.scale.data_ptr(), _ptr(w2.zero), E, I2 // 2, w13.data.shape[-1], w2.data.shape[-1],
                             w13.bits, w13.group, y.data_ptr(), torch.get_num_threads())
    check(err)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def experts_args(w13: Packed, w2: Packed) -> tuple:
    """dschat_experts's weight arguments as ctypes values, made once (the lean CPU step's calls, engine/cpu_step.py):
    (d13, s13, z13, d2, s2, z2, E, I, row13, row2, bits, group), in the order the function takes them after
    k. The tensors must outlive the values (the caller keeps w13 and w2)."""
    _check(w13, 1)
    _check(w2, 1)
    P, I64, I = _C
    E, I2 = w13.data.shape[:2]
    return (P(w13.data.data_ptr()), P(w13.scale.data_ptr()), P(_ptr(w13.zero)), P(w2.data.data_ptr()),
            P(w2.scale.data_ptr()), P(_ptr(w2.zero)), I64(E), I64(I2 // 2), I64(w13.data.shape[-1]),
            I64(w2.data.shape[-1]), I(w13.bits), I64(w13.group))


def dequantize(w: Packed) -> torch.Tensor:
    """The float32 weight [N, in_features] the kernel computes with (quant_format.dequantize's numbers, exactly),
    written by the library in one pass over the packed bytes, on torch.get_num_threads() threads (int6:
    quant_format's own, in PyTorch)."""
    if w.bits == 6:
        return quant_format.dequantize(w)
    lib = native() if _LIB is _UNSET else _LIB
    _check(w, 0)
    N, K = w.data.shape[0], w.in_features
    out = torch.empty(N, K)
    err = lib.dschat_dequantize(w.data.data_ptr(), w.scale.data_ptr(), _ptr(w.zero), w.bits, w.group, N, K,
                                w.data.shape[1], out.data_ptr(), torch.get_num_threads())
    check(err)
    return out


def q8_activations(x: torch.Tensor, kp: int) -> torch.Tensor:
    """The kernel's activation quantization alone (for tests): x [M, K] -> the dequantised activations [M, kp]."""
    lib = native() if _LIB is _UNSET else _LIB
    xf = x.to(torch.float32).contiguous()
    out = torch.empty(xf.shape[0], kp)
    lib.dschat_q8_activations(xf.data_ptr(), xf.shape[0], xf.shape[1], kp, out.data_ptr())
    return out


def quantize_activations_reference(x: torch.Tensor, kp: int | None = None) -> torch.Tensor:
    """The activations the kernel computes with, in plain PyTorch: x [M, K] -> [M, kp] float32 (zeros past K),
    each block of 32 quantized to int8 with scale max|x|/127 and dequantised."""
    M, K = x.shape
    kp = kp or -(-K // QK) * QK
    b = torch.nn.functional.pad(x.float(), (0, kp - K)).view(M, kp // QK, QK)
    d = b.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    return (torch.round(b * inv).clamp(-127, 127) * d).view(M, kp)


def gemv_reference(x: torch.Tensor, w: Packed) -> torch.Tensor:
    """What `gemv` computes, in float64 plain PyTorch: dequantised activations times dequantised weights."""
    xd = quantize_activations_reference(x, -(-w.padded_in // QK) * QK)[:, : w.in_features]
    return xd.double() @ dequantize(w).double().T


__all__ = ["native", "fits", "argmax", "gemv", "gemm_f32", "igemm4", "igemm8", "has_igemm8", "gemv_reference", "heads",
           "heads_reference", "quantize_activations_reference", "SYMMETRIC_ZERO"]
