"""Absorbed-MLA decode on the GPU: the Triton kernel against its PyTorch reference, same inputs, same run.

    python benchmarks/bench_kernels.py
    python benchmarks/bench_kernels.py --smoke    # toy shapes on the CPU in Triton's interpreter (a check)

For V2-Lite-like (16 heads) and V3-like (128 heads) shapes, kv_lora_rank 512 + rope 64, bf16, one query
token, a paged cache of T tokens scattered over the pool: prints microseconds per call, the cache bytes read
per second, and the largest difference from the reference.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch


def timed(fn, device: str, iters=50):
    for _ in range(5):
        fn()
    if device == "cpu":  # the smoke run, in Triton's interpreter: a check, not a figure
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters * 1e6
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1000  # microseconds


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="toy shapes on the CPU in Triton's interpreter")
    args = ap.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel is first compiled
    elif not torch.cuda.is_available():
        print("bench_kernels: no CUDA GPU here; this benchmark needs one (--smoke runs it on the CPU in Triton's "
              "interpreter; the kernel's tests: pytest tests/test_kernels.py)", file=sys.stderr)
        return 2
    from dschat.kernels.mla_decode import mla_decode_reference, mla_decode_triton

    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    print(f"{torch.cuda.get_device_name() if device == 'cuda' else 'cpu (interpreter)'}  torch {torch.__version__}")
    print(f"{'shape':<12} {'T':>6} {'triton us':>10} {'torch us':>9} {'speedup':>8} {'triton GB/s':>12} {'max err':>9}")
    R, P = (32, 16) if args.smoke else (512, 64)
    shapes = (("toy 2h", 2),) if args.smoke else (("V2-Lite 16h", 16), ("V3 128h", 128))
    for name, H in shapes:
        for T in (16,) if args.smoke else (1024, 4096, 16384, 32768):
            g = torch.Generator(device=device).manual_seed(0)
            n_slots = T + (8 if args.smoke else 4096)
            cache = torch.randn(n_slots, R + P, device=device, dtype=dtype, generator=g)
            slots = torch.randperm(n_slots, device=device, generator=g)[:T]
            q_lat = torch.randn(1, H, R, device=device, dtype=dtype, generator=g)
            q_pe = torch.randn(1, H, P, device=device, dtype=dtype, generator=g)
            q_pos = torch.tensor([T - 1], device=device)
            inputs = (q_lat, q_pe, cache, slots, q_pos, 0.1)
            ref = mla_decode_reference(*inputs).float()
            out = mla_decode_triton(*inputs).float()
            err = float((out - ref).abs().max() / ref.abs().max())
            iters = 2 if args.smoke else 50
            t_tri = timed(lambda: mla_decode_triton(*inputs), device, iters)
            t_ref = timed(lambda: mla_decode_reference(*inputs), device, iters)
            gbs = T * (R + P) * cache.element_size() / (t_tri * 1e-6) / 1e9
            print(f"{name:<12} {T:>6} {t_tri:>10.1f} {t_ref:>9.1f} {t_ref / t_tri:>7.1f}x {gbs:>12.0f} {err:>9.1e}")
            if args.smoke and not err < 1e-4:
                print(f"bench_kernels: the kernel differs from its reference ({err:.1e})", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
