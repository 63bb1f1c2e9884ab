"""What verifying 1+K drafted tokens costs against decoding one, on the CPU (issue 25 item 5): speculation
pays only where the tokens a forward pass yields (1 + accepted drafts) exceed that ratio.

    python benchmarks/bench_verify.py --path CHECKPOINT [--quant int4] [--threads 1] [--rounds 5]
    python benchmarks/bench_verify.py --smoke       # the demo model, 1 round

After a 128-token prompt, forward passes over 1, 3, 5 and 9 new tokens (the lm_head over each) alternate,
--rounds times; printed: the median milliseconds of each and its ratio to one token, with the load average.
A MoE layer reads the union of the experts the tokens choose (up to 6 per token of 64 in V2-Lite), so on a
bandwidth-bound model the ratio approaches 1+K; on a GPU it stays near 1. A V2-Lite-shaped checkpoint:
benchmarks/bench_cpu.py writes one (write_v2lite). Runs the engine's own cached forward (Engine._forward),
as the speculative decoder does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from dschat.engine import Engine
from dschat.runtime import DEMO_DIR

SIZES = (1, 3, 5, 9)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", help="checkpoint directory (default: the demo model)")
    ap.add_argument("--quant", choices=["none", "int8", "int4"], default="none")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    if args.smoke:
        args.rounds = 1
    eng = Engine.from_pretrained(args.path or DEMO_DIR, device="cpu", dtype=torch.float32, speculative="none",
                                 quant=None if args.quant == "none" else args.quant, threads=args.threads,
                                 progress=lambda d, t: None)
    g = torch.Generator().manual_seed(0)
    top = min(eng.config.vocab_size, 4000)
    times: dict[int, list[float]] = {n: [] for n in SIZES}
    load = [os.getloadavg()[0]]
    with torch.inference_mode():
        seq = eng.cache.open([], limit=0)
        try:
            eng._forward(seq, torch.randint(10, top, (128,), generator=g).tolist())
            for _ in range(args.rounds):
                for n in SIZES:
                    new = torch.randint(10, top, (n,), generator=g).tolist()
                    t0 = time.perf_counter()
                    eng.model.head(eng._forward(seq, new))
                    times[n].append(time.perf_counter() - t0)
        finally:
            eng.cache.close(seq, insert=False)
    load.append(os.getloadavg()[0])
    one = statistics.median(times[1])
    row = {"model": str(args.path or "demo"), "quant": args.quant, "threads": torch.get_num_threads(),
           "load": [round(x, 1) for x in load]}
    for n in SIZES:
        row[f"ms_{n}"] = round(statistics.median(times[n]) * 1e3, 2)
        row[f"ratio_{n}"] = round(statistics.median(times[n]) / one, 2)
    print(" ".join(f"1+{n - 1}: {row[f'ms_{n}']} ms ({row[f'ratio_{n}']}x)" for n in SIZES)
          + f"; load average {load[0]:.1f}->{load[1]:.1f}")
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
