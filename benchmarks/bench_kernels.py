"""Absorbed-MLA decode on the GPU: the Triton kernel against its PyTorch reference, same inputs, same run.

    python benchmarks/bench_kernels.py

For V2-Lite-like (16 heads) and V3-like (128 heads) shapes, kv_lora_rank 512 + rope 64, bf16, one query
token, a paged cache of T tokens scattered over the pool: prints microseconds per call, the cache bytes read
per second, and the largest difference from the reference.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dschat.kernels.mla_decode import mla_decode_reference, mla_decode_triton


def timed(fn, iters=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1000  # microseconds


def main():
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA GPU here; this benchmark needs one (the kernel's CPU tests run in "
              "Triton's interpreter: pytest tests/test_kernels.py)")
        return
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"{'shape':<12} {'T':>6} {'triton us':>10} {'torch us':>9} {'speedup':>8} {'triton GB/s':>12} {'max err':>9}")
    R, P = 512, 64
    for name, H in (("V2-Lite 16h", 16), ("V3 128h", 128)):
        for T in (1024, 4096, 16384, 32768):
            g = torch.Generator(device="cuda").manual_seed(0)
            n_slots = T + 4096
            cache = torch.randn(n_slots, R + P, device="cuda", dtype=torch.bfloat16, generator=g)
            slots = torch.randperm(n_slots, device="cuda", generator=g)[:T]
            q_lat = torch.randn(1, H, R, device="cuda", dtype=torch.bfloat16, generator=g)
            q_pe = torch.randn(1, H, P, device="cuda", dtype=torch.bfloat16, generator=g)
            q_pos = torch.tensor([T - 1], device="cuda")
            args = (q_lat, q_pe, cache, slots, q_pos, 0.1)
            ref = mla_decode_reference(*args).float()
            out = mla_decode_triton(*args).float()
            err = float((out - ref).abs().max() / ref.abs().max())
            t_tri = timed(lambda: mla_decode_triton(*args))
            t_ref = timed(lambda: mla_decode_reference(*args))
            gbs = T * (R + P) * 2 / (t_tri * 1e-6) / 1e9
            print(f"{name:<12} {T:>6} {t_tri:>10.1f} {t_ref:>9.1f} {t_ref / t_tri:>7.1f}x {gbs:>12.0f} {err:>9.1e}")


if __name__ == "__main__":
    main()
