"""Every Triton kernel of kernels/, compiled for an H100 (sm_90a) without a GPU: grid, registers, spills.

    python benchmarks/check_kernels.py            # a table: demo, V2-Lite and V3 shapes, decode (one token)
    python benchmarks/check_kernels.py --json     # one JSON line: a list of {kernel, shape, grid_blocks, ...}
    python benchmarks/check_kernels.py --smoke    # the demo shapes only (seconds)

Nothing runs on a device. Triton's active driver is replaced by a stub whose target is
GPUTarget("cuda", 90, 32); each kernel's Python wrapper runs on meta tensors (no memory) and its launches
compile without launching (JITFunction.run(..., warmup=True)), recording the grid. The PTX then goes
through the ptxas Triton itself uses for sm_90 (its bundled ptxas-blackwell: the older bundled `ptxas`
cannot read the PTX version Triton 3.9 writes) with `-v --gpu-name sm_90a`, which reports registers and
spill bytes per thread. Tensor cores: an mma / wgmma instruction in the PTX. Pipelined: cp.async copies
into shared memory in the PTX (Triton's software pipelining of a loop's loads over num_stages buffers).
An H100 has 132 SMs: a grid of fewer blocks leaves SMs idle (the MoE decode kernels must launch at least
that many). The MoE decode shapes include the models' shared experts (one more row a token).
Exit status 1 when a kernel spills or a MoE decode grid is smaller than the SM count (what the tests keep).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not for the interpreter
os.environ["DSCHAT_TRITON_COMPILE_ONLY"] = "1"  # kernels/triton_support.py imports Triton without a GPU
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning

import torch  # noqa: E402

H100_SMS = 132

# The real models' dimensions (the demo's from its config.json): hidden, attention heads, kv_lora_rank,
# qk_rope_head_dim, moe_intermediate_size, routed experts, experts per token, shared experts, dense
# intermediate_size.
MODELS = {
    "demo": dict(hidden=256, heads=4, kv_lora=64, rope=16, moe_inter=192, experts=16, top_k=2, shared=1, inter=1024,
                 context=1024, router=dict(n_group=1, topk_group=1, top2=False, softmax=True, bias=False)),
    "v2-lite": dict(hidden=2048, heads=16, kv_lora=512, rope=64, moe_inter=1408, experts=64, top_k=6,
                    shared=2, inter=10944, context=4096,
                    router=dict(n_group=1, topk_group=1, top2=False, softmax=True, bias=False)),
    "v3": dict(hidden=7168, heads=128, kv_lora=512, rope=64, moe_inter=2048, experts=256, top_k=8,
               shared=1, inter=18432, context=4096, fp8=True, router=dict(n_group=8, topk_group=4, top2=True,
                                                                 softmax=False, bias=True)),
}
INT4_GROUP = 128  # engine/quant.py's default group size
PREFILL_ROWS = 512  # the linear kernels also run a prefill chunk (their GEMM tiles)
MOE_DECODE = ("moe_gate_up", "moe_down")  # kernels whose decode grid must cover every SM


class StubDriver:
    """What JITFunction.run asks of the active driver when it compiles and does not launch."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("meta")

    def map_python_to_cpp_type(self, ty):
        from triton.backends.nvidia.driver import CudaDriver
        return CudaDriver.map_python_to_cpp_type(self, ty)

    def __getattr__(self, name):
        raise AttributeError(f"check_kernels' stub driver has no {name}: nothing may launch here")


class Recorder:
    """Every launch a wrapper makes, compiled and not launched: (jit function, grid, compiled kernel)."""

    def __init__(self):
        from triton.runtime.jit import JITFunction
        self.launches = []
        original = JITFunction.run
        recorder = self

        def run(fn, *args, grid, warmup, **kwargs):
            compiled = original(fn, *args, grid=grid, warmup=True, **kwargs)
            if not warmup:
                recorder.launches.append((fn, tuple(grid(kwargs) if callable(grid) else grid), compiled))
            return compiled

        JITFunction.run = run


def meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def packed(E, N, K, bits):
    from dschat.kernels.quant_format import Packed
    lead = (E,) if E else ()
    if bits == 8:
        return Packed(meta(*lead, N, K, dtype=torch.int8), meta(*lead, N, dtype=torch.float32), None, 8, 0, K)
    groups = -(-K // INT4_GROUP)
    return Packed(meta(*lead, N, groups * INT4_GROUP // 2, dtype=torch.uint8),
                  meta(*lead, N, groups, dtype=torch.float32), None, 4, INT4_GROUP, K)


def cases(m):
    """(kernel label, call) pairs for one model's decode shapes; each call runs a wrapper on meta tensors."""
    from dschat.kernels.fp8_matmul import fp8_linear_triton
    from dschat.kernels.fp8_moe import moe_experts_fp8_triton
    from dschat.kernels.fused_moe import moe_experts_triton
    from dschat.kernels.mla_decode import mla_decode_triton
    from dschat.kernels.norm_rope import add_rms_norm_triton, rope_latent_write_triton, silu_mul_triton
    from dschat.kernels.router import route_triton
    from dschat.kernels.quant_matmul import quant_matmul_triton
    from dschat.kernels.quant_moe import moe_experts_quant_triton

    H, E, k, I = m["hidden"], m["experts"], m["top_k"], m["moe_inter"]
    Is = I * m["shared"]  # the shared experts, in the routed experts' launches (engine/moe.py)
    x = meta(1, H)
    ids = meta(1, k, dtype=torch.int64)
    wts = meta(1, k, dtype=torch.float32)
    yield "moe/bf16", lambda: moe_experts_triton(x, meta(E, 2 * I, H), meta(E, H, I), ids, wts,
                                                 shared=(meta(Is, H), meta(Is, H), meta(H, Is)))
    for bits in (8, 4):
        yield f"moe/int{bits}", lambda bits=bits: moe_experts_quant_triton(
            x, packed(E, 2 * I, H, bits), packed(E, H, I, bits), ids, wts,
            shared=(packed(0, Is, H, bits), packed(0, Is, H, bits), packed(0, H, Is, bits)))
    if m.get("fp8"):  # the checkpoints that ship FP8 experts (`--fp8 keep` reads them as they are)
        f8 = torch.float8_e4m3fn
        gate = (meta(Is, H, dtype=f8), meta(Is // 128, -(-H // 128), dtype=torch.float32))
        yield "moe/fp8", lambda: moe_experts_fp8_triton(
            x, meta(E, 2 * I, H, dtype=f8), meta(E, 2 * I // 128, -(-H // 128), dtype=torch.float32),
            meta(E, H, I, dtype=f8), meta(E, -(-H // 128), I // 128, dtype=torch.float32), ids, wts,
            (128, 128),
            shared=(*gate, *gate, meta(H, Is, dtype=f8), meta(-(-H // 128), Is // 128, dtype=torch.float32)))
    R, P, heads, T = m["kv_lora"], m["rope"], m["heads"], m["context"]
    yield "mla_decode", lambda: mla_decode_triton(
        meta(1, heads, R), meta(1, heads, P), meta(T + 256, R + P), meta(T, dtype=torch.int64),
        meta(1, dtype=torch.int64), 0.1)
    yield "add_rms_norm", lambda: add_rms_norm_triton(meta(1, 1, H), meta(1, 1, H), meta(H), 1e-6)
    yield "rope_latent", lambda: rope_latent_write_triton(
        meta(1, heads, P), meta(1, R + P), meta(R), 1e-6, meta(1, P // 2, dtype=torch.float32),
        meta(1, P // 2, dtype=torch.float32), meta(T, R + P), meta(1, dtype=torch.int64))
    yield "silu_mul", lambda: silu_mul_triton(meta(1, 1, m["inter"]), meta(1, 1, m["inter"]))
    rt = m["router"]
    yield "router", lambda: route_triton(
        meta(1, E, dtype=torch.float32), meta(E, dtype=torch.float32) if rt["bias"] else None, k, rt["n_group"],
        rt["topk_group"], rt["top2"], rt["softmax"], True, 2.5, 0)
    N, K = 2 * m["inter"], H  # the dense MLP's gate_up projection: one token, and a prefill chunk
    for rows in (1, PREFILL_ROWS):
        xs = meta(rows, H)
        at = "" if rows == 1 else f"/M={rows}"
        for bits in (8, 4):
            yield f"quant_matmul/int{bits}{at}", lambda xs=xs, bits=bits: quant_matmul_triton(
                xs, packed(0, N, K, bits))
        yield f"fp8_linear{at}", lambda xs=xs: fp8_linear_triton(
            xs, meta(N, K, dtype=torch.float8_e4m3fn), meta(-(-N // 128), -(-K // 128), dtype=torch.float32),
            (128, 128))


KERNEL_NAMES = {"_gate_up_kernel": "moe_gate_up", "_down_kernel": "moe_down", "_mla_split_kernel": "mla_decode",
                "_mla_merge_kernel": "mla_merge", "_add_rms_norm_kernel": "add_rms_norm",
                "_rope_latent_kernel": "rope_latent", "_router_kernel": "router", "_silu_mul_kernel": "silu_mul",
                "_quant_matmul_kernel": "quant_matmul", "_fp8_linear_kernel": "fp8_linear"}


_PTXAS_LINE = re.compile(r"Used (\d+) registers.*")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_report(ptx: str, cache: dict) -> tuple[int, int]:
    """(registers, spill bytes: stores + loads) per thread, from `ptxas -v --gpu-name sm_90a`; `cache` maps
    the PTX's hash to earlier answers."""
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(90).path  # Triton's own choice for sm_90 (the one that built the cubin)
    key = hashlib.sha256((ptxas + "\0" + ptx).encode()).hexdigest()
    if key in cache:
        return tuple(cache[key])
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        r = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", str(src), "-o", str(Path(d) / "k.cubin")],
                           capture_output=True, text=True)
    log = r.stdout + r.stderr
    if r.returncode != 0:
        raise RuntimeError(f"ptxas failed ({r.returncode}): {log.strip()[-2000:]}")
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", log)]
    spills = [int(a) + int(b) for a, b in _SPILL.findall(log)]
    cache[key] = (max(regs), max(spills, default=0))
    return cache[key]


def tensor_cores(ptx: str) -> str | None:
    if re.search(r"\bwgmma\.", ptx):
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma"
    return None


def pipelined(ptx: str) -> bool:
    """Loads copied asynchronously into shared memory (cp.async, or the TMA's cp.async.bulk)."""
    return re.search(r"\bcp\.async\.", ptx) is not None


def check(models) -> list[dict]:
    import triton
    from triton.runtime import driver
    driver.set_active(StubDriver())
    recorder = Recorder()
    cache_file = Path(triton.knobs.cache.dir) / "dschat-check-kernels-ptxas.json"  # beside Triton's own cache
    try:
        ptxas_cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        ptxas_cache = {}
    rows = []
    for model in models:
        m = MODELS[model]
        for label, call in cases(m):
            recorder.launches.clear()
            call()
            variant, rows_at = label.partition("/")[2], ""
            if "M=" in label:
                variant, rows_at = (variant.split("/")[0] if variant.count("/") else ""), label.split("/")[-1]
            for fn, grid, compiled in recorder.launches:
                ptx = compiled.asm["ptx"]
                regs, spill = ptxas_report(ptx, ptxas_cache)
                mma = tensor_cores(ptx)
                name = KERNEL_NAMES.get(fn.__name__, fn.__name__) + (f"/{variant}" if variant else "")
                blocks = 1
                for g in grid:
                    blocks *= g
                rows.append(dict(kernel=name, shape=model + (f"/{rows_at}" if rows_at else ""), grid=list(grid), grid_blocks=blocks,
                                 num_warps=compiled.metadata.num_warps, num_stages=compiled.metadata.num_stages,
                                 registers=regs, spill_bytes=spill, tensor_cores=mma is not None, mma=mma,
                                 pipelined=pipelined(ptx),
                                 shared_bytes=compiled.metadata.shared))
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps(ptxas_cache))
    except OSError:
        pass
    return rows


def problems(rows) -> list[str]:
    out = []
    for r in rows:
        where = f"{r['kernel']} at {r['shape']}"
        if r["spill_bytes"]:
            out.append(f"{where} spills {r['spill_bytes']} bytes per thread")
        if r["kernel"].split("/")[0] in MOE_DECODE and r["shape"] in ("v2-lite", "v3") and r["grid_blocks"] < H100_SMS:
            out.append(f"{where} launches {r['grid_blocks']} blocks for {H100_SMS} SMs")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="one JSON line: a list of rows")
    ap.add_argument("--smoke", action="store_true", help="the demo shapes only")
    ap.add_argument("--models", default=None,
                    help=f"comma-separated, of {', '.join(MODELS)} (default: all; --smoke: demo)")
    args = ap.parse_args(argv)
    models = args.models.split(",") if args.models else (["demo"] if args.smoke else list(MODELS))
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        sys.stderr.write(f"check_kernels: error: unknown model {unknown[0]!r} (one of {', '.join(MODELS)})\n")
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.stderr.write("check_kernels: error: Triton is not installed here\n")
        return 2
    rows = check(models)
    if args.json:
        print(json.dumps(rows))
    else:
        print(f"{'kernel':24} {'shape':14} {'grid':>16} {'blocks':>7} {'/SMs':>6} {'warps':>5} {'regs':>5} "
              f"{'spill B':>8} {'tensor cores':>12} {'pipelined':>9}")
        for r in rows:
            grid = "x".join(str(g) for g in r["grid"])
            print(f"{r['kernel']:24} {r['shape']:14} {grid:>16} {r['grid_blocks']:>7} "
                  f"{r['grid_blocks'] / H100_SMS:>6.2f} {r['num_warps']:>5} {r['registers']:>5} "
                  f"{r['spill_bytes']:>8} {r['mma'] or 'no':>12} "
                  f"{str(r['num_stages']) + ' stages' if r['pipelined'] else 'no':>9}")
    bad = problems(rows)
    for line in bad:
        sys.stderr.write(f"check_kernels: {line}\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
