"""Decode beside a busy neighbour: the demo model's default-thread decode with one other CPU-bound process on
the machine, against the same decode without it, in interleaved rounds.

    python benchmarks/bench_busy.py [--rounds 5] [--tokens 64] [--threads N]
    python benchmarks/bench_busy.py --smoke          # one short round: checks that it runs (no figures)

Each round runs two fresh processes in turn (the order alternates per round): one decodes alone, the other
decodes while a neighbour process spins on one core from before the model loads until the decode ends (so
the load average the engine reads when it chooses its threads may or may not have seen it yet, as for a
user who starts dschat beside a build). A process loads the engine with its default thread choice (or
--threads), decodes --tokens greedy tokens after a code prompt and reports the engine's decode tok/s and the
thread count it chose. Printed: per round both rates, the 1-minute load average before each, then the median
ratio busy / quiet (target: >= 0.8, issue 25).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

PROMPT = "import os\nimport sys\n\n\ndef main(argv=None):\n    "


def child(tokens: int, threads: int | None) -> None:
    from dschat.engine import Engine, SamplingParams
    from dschat.runtime import DEMO_DIR

    eng = Engine.from_pretrained(DEMO_DIR, speculative="none", threads=threads)
    ids = [eng.tokenizer.bos_token_id] + eng.tokenizer.encode(PROMPT)
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    list(eng.generate(ids, params))  # warm-up
    eng.cache.clear()
    list(eng.generate(ids, params))
    print(json.dumps({"tok_s": eng.stats.decode_tokens_per_s, "threads": eng.load_stats["threads"]}))


def run(tokens: int, threads: int | None, busy: bool) -> dict:
    load = os.getloadavg()[0]
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        args = [sys.executable, __file__, "--child", "--tokens", str(tokens)]
        if threads:
            args += ["--threads", str(threads)]
        out = subprocess.run(args, capture_output=True, text=True, timeout=600)
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    if out.returncode != 0:
        raise SystemExit(f"bench_busy: the decode process failed: {out.stderr.strip().splitlines()[-1:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["load"] = load
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="override the engine's choice (default: its own)")
    ap.add_argument("--smoke", action="store_true", help="one round of 4 tokens: checks that every step runs")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.tokens, args.threads)
        return 0
    if args.smoke:
        args.rounds, args.tokens = 1, 4
    print(f"demo model, {args.tokens} greedy tokens, threads {args.threads or 'default'}, {os.cpu_count()} cores")
    print(f"{'round':>5} {'quiet tok/s':>12} {'load':>5} {'busy tok/s':>11} {'load':>5} {'threads q/b':>12}")
    ratios = []
    for r in range(args.rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        rows = {busy: run(args.tokens, args.threads, busy) for busy in order}
        q, b = rows[False], rows[True]
        ratios.append(b["tok_s"] / q["tok_s"])
        print(f"{r + 1:>5} {q['tok_s']:>12.1f} {q['load']:>5.1f} {b['tok_s']:>11.1f} {b['load']:>5.1f} "
              f"{q['threads']:>6}/{b['threads']}")
    print(f"busy / quiet, median of {len(ratios)}: {statistics.median(ratios):.2f}x "
          f"[{min(ratios):.2f}-{max(ratios):.2f}]  (target >= 0.8)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
