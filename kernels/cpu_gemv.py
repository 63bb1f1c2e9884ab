"""dschat's own CPU GEMV for packed int8 / int4 weights (cpu_gemv.cpp, AVX2 + FMA), built at first use.

The C++ source is compiled once per machine (torch.utils.cpp_extension) into dschat's cache directory,
$XDG_CACHE_HOME/dschat/kernels/<key> (or $DSCHAT_KERNELS_DIR/<key>), the key naming the source, the torch
and Python versions; a later start imports the built module directly and compiles nothing. Where the CPU
lacks AVX2/FMA, or there is no C++ compiler, or the build fails, `native()` returns None after saying so in
one line on stderr, once per process, and kernels/quant_cpu.py runs PyTorch's packed kernels instead.
DSCHAT_CPU_GEMV=0 turns it off.

Numerics (cpu_gemv.cpp's header): each row of x is quantized to int8 in blocks of 32 (scale max|x|/127 per
block, round to nearest even), the weight is the stored one exactly, products are summed in integers per
block and in float32 across blocks. So the result is that of a float model of the dequantised weights applied
to the dequantised activations (`gemv_reference`), up to float32 summation order.

Plain functions over tensors (`gemv`, `experts`), so that they can be wrapped as custom ops.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import sys
from pathlib import Path

import torch

from .quant_format import SYMMETRIC_ZERO, Packed, dequantize

QK = 32  # activation block
SOURCE = Path(__file__).with_name("cpu_gemv.cpp")
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]  # -fopenmp: at::parallel_for splits over torch's own threads

def cache_dir() -> Path:
    """Where the built module lives: $DSCHAT_KERNELS_DIR, else dschat's cache directory + /kernels."""
    if os.environ.get("DSCHAT_KERNELS_DIR"):
        return Path(os.environ["DSCHAT_KERNELS_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dschat" / "kernels"


def _key(src: str) -> str:
    h = hashlib.sha256((src + torch.__version__ + sys.version + " ".join(FLAGS)).encode()).hexdigest()[:16]
    return f"dschat_cpu_gemv_{h}"


def cpu_supported() -> str | None:
    """Why this CPU cannot run the kernel (None: it can)."""
    if os.environ.get("DSCHAT_CPU_GEMV", "1") == "0":
        return "DSCHAT_CPU_GEMV=0"
    cap = torch.backends.cpu.get_cpu_capability()
    if cap not in ("AVX2", "AVX512"):
        return f"this CPU has no AVX2 (PyTorch reports {cap})"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = " fma "
    if " fma" not in flags:
        return "this CPU has no FMA"
    return None


def _say(msg: str):
    print(f"dschat: {msg}", file=sys.stderr, flush=True)


def _import(name: str, path: Path):
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def _build():
    why = cpu_supported()
    if why:
        return None, why
    src = SOURCE.read_text()
    name = _key(src)
    d = cache_dir() / name
    so = d / f"{name}.so"
    if so.exists():
        try:
            return _import(name, so), None
        except Exception:  # a damaged or foreign file: build again
            pass
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None and shutil.which("g++") is None:
        return None, "no C++ compiler (c++ / g++)"
    path = os.environ.get("PATH", "")
    ninja_dir = ninja_bin_dir()
    if ninja_dir is None:
        return None, "no ninja build tool (pip install ninja)"
    try:
        d.mkdir(parents=True, exist_ok=True)
        _say("building the CPU int8/int4 kernels (once; about a minute) ...")
        from torch.utils import cpp_extension

        os.environ["PATH"] = ninja_dir + os.pathsep + path  # torch's builder runs `ninja` from PATH
        mod = cpp_extension.load_inline(name, [src], functions=["gemv", "experts", "q8_activations"],
                                        extra_cflags=FLAGS, build_directory=str(d), verbose=False)
        return mod, None
    except Exception as e:  # noqa: BLE001 (a compiler's failure: say it in one line, run the fallback)
        lines = [x for x in str(e).strip().splitlines() if x.strip()]
        return None, f"building the CPU kernels failed ({lines[-1] if lines else type(e).__name__})"
    finally:
        os.environ["PATH"] = path


def ninja_bin_dir() -> str | None:
    """The folder of the `ninja` that torch's extension builder needs: the `ninja` distribution's (a dependency
    of dschat, so a venv's dschat finds it even when the venv's bin/ is not on PATH), else one on PATH."""
    try:
        import ninja

        if (Path(ninja.BIN_DIR) / "ninja").exists():
            return str(ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    found = shutil.which("ninja")
    return str(Path(found).parent) if found else None


def native():
    """The built module (gemv, experts, q8_activations), or None (said once)."""
    global _MOD
    if _MOD is _UNSET:
        mod, why = _build()
        _MOD = mod
        if why and why != "DSCHAT_CPU_GEMV=0":
            _say(f"note: {why}; packed int8/int4 weights run through PyTorch's slower kernels")
    return _MOD


_UNSET = object()
_MOD = _UNSET


def fits(w: Packed) -> bool:
    """Whether the kernel takes this packed weight (int8; int4 in groups of a multiple of 64)."""
    return w.bits == 8 or w.group % (2 * QK) == 0


def gemv(x: torch.Tensor, w: Packed) -> torch.Tensor:
    """x [..., K] (float32 or bfloat16) -> [..., N] in x's dtype through the kernel (native() must not be None,
    fits(w) hold)."""
    if _MOD is _UNSET:
        native()
    return _MOD.gemv(x, w.data, w.scale, _EMPTY if w.zero is None else w.zero, w.bits, w.group)


def experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w13: Packed, w2: Packed) -> torch.Tensor:
    """One token x [1, H] through its chosen experts ids [k] with routing weights [k], over packed stacks
    w13 [E, 2I, H] (gate rows, then up rows) and w2 [E, H, I]: fused_moe.moe_experts's function in one call,
    each expert's weights read once, its intermediate quantized as x is (ids outside 0..E-1: nothing)."""
    if _MOD is _UNSET:
        native()
    return _MOD.experts(x, ids, weights, w13.data, w13.scale, _EMPTY if w13.zero is None else w13.zero,
                        w2.data, w2.scale, _EMPTY if w2.zero is None else w2.zero, w13.bits, w13.group)


_EMPTY = torch.empty(0, dtype=torch.uint8)


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


__all__ = ["native", "fits", "gemv", "gemv_reference", "quantize_activations_reference", "SYMMETRIC_ZERO"]
