"""CPU decode and prefill of dschat in float32 / bfloat16 / int8 / int4, against the memory roofline and
(when installed) llama.cpp, in interleaved rounds.

    python benchmarks/bench_cpu.py [--model v2lite|demo] [--layers 2] [--threads 1] [--rounds 2]
                                   [--tokens 32] [--prefill 512] [--configs float32,bfloat16,int8,int4]
    python benchmarks/bench_cpu.py --smoke          # the demo model, a few tokens, in-process: seconds

Models: `v2lite`, DeepSeek-V2-Lite's real shapes (hidden 2048, 64 routed experts top-6 + 2 shared,
moe_intermediate 1408, kv_lora 512, 16 heads, vocab 102400, layer 0 dense with intermediate 10944) with random
bf16 weights, cut to --layers layers (1 dense + the rest MoE), written once to a temporary directory; or
`demo`, the bundled demo model (cache-resident: its roofline fraction is no bound and can pass 100%).

Each configuration runs in a fresh process once per round, the order rotated each round (A B C D, B C D A,
...), so that what else the shared machine does hits every configuration alike in expectation. A process:
loads the model, decodes --tokens greedy tokens after a 128-token prompt (rate = the engine's
decode_tokens_per_s), then prefills a --prefill-token prompt from an empty cache (rate = tokens / prefill_s).
Each round also measures the read bandwidth at the same thread count (torch.sum over 64 MiB slices of a
float32 tensor, best of 64: see bandwidth()). Printed per configuration: the median [min-max] of the rounds,
bytes of weights read per token (counted from the loaded model: routed experts at k/E, one embedding row),
and the fraction of the bandwidth that decode reaches (tok/s x bytes / bandwidth). The 1-minute load average
is recorded before and after every process. The llama.cpp column needs `llama-bench` on PATH and GGUF files
(--gguf DIR with <model>-<type>.gguf); without them the script says so in one line and goes on.

The process runs dschat's public Engine API (and engine.quant.bytes_per_token), so the same script measures an
older checkout installed in another virtual environment (--python that environment's python): figures before
and after, one run. A configuration `int8:torch` / `int4:torch` runs PyTorch's packed kernels instead of
dschat's own CPU GEMV (DSCHAT_CPU_GEMV=0: what ran before it, and where it cannot be built).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = 128


def v2lite_config(layers: int) -> dict:
    from dschat.dev import tiny_checkpoints as tc

    c = tc.v2_lite_config(102400)
    c.update(hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=layers,
             num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512, qk_nope_head_dim=128,
             qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, num_experts_per_tok=6,
             n_shared_experts=2, first_k_dense_replace=1)
    return c


def write_v2lite(path: Path, layers: int, seed: int = 0) -> Path:
    """Random bf16 weights drawn one tensor at a time and written in ~1 GB shards (never the model in float32)."""
    import torch
    from safetensors.torch import save_file

    from dschat.dev import tiny_checkpoints as tc

    cfg = v2lite_config(layers)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    g = torch.Generator().manual_seed(seed)
    weight_map, shard, size, n, total = {}, {}, 0, 0, 0

    def flush():
        nonlocal shard, size, n
        if shard:
            n += 1
            name = f"model-{n:05d}.safetensors"
            save_file(shard, str(path / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
            shard, size = {}, 0

    for name, shape in tc.tensor_shapes(cfg).items():
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif "embed_tokens" in name:
            t = torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) / shape[-1] ** 0.5
        t = t.to(torch.bfloat16)
        if size + t.numel() * 2 > 1e9:
            flush()
        shard[name] = t
        size += t.numel() * 2
        total += t.numel() * 2
    flush()
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    from dschat.runtime import DEMO_DIR

    for f in DEMO_DIR.glob("tokenizer*"):
        shutil.copy(f, path / f.name)
    return path


# -- one configuration, in its own process ------------------------------------------------------------------
def worker(spec: dict) -> dict:
    import inspect

    config, _, backend = spec["config"].partition(":")
    if backend == "torch":  # PyTorch's packed kernels, as before cpu_gemv (and where it cannot be built)
        os.environ["DSCHAT_CPU_GEMV"] = "0"
    import torch

    from dschat.engine import Engine, SamplingParams
    from dschat.engine.quant import bytes_per_token

    torch.set_num_threads(spec["threads"])
    kw = dict(device="cpu", speculative="none")
    if config == "bfloat16":
        kw["dtype"] = torch.bfloat16
    else:
        kw["dtype"] = torch.float32
        if config in ("int8", "int4"):
            kw["quant"] = config
    if "threads" in inspect.signature(Engine.from_pretrained).parameters:
        kw["threads"] = spec["threads"]
    t0 = time.perf_counter()
    eng = Engine.from_pretrained(spec["model"], progress=lambda d, t: None, **kw)
    load_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 4000, (PROMPT,), generator=g).tolist()
    out = list(eng.generate(ids, SamplingParams(temperature=0.0, max_tokens=spec["tokens"], ignore_eos=True)
                            if "ignore_eos" in inspect.signature(SamplingParams).parameters else
                            SamplingParams(temperature=0.0, max_tokens=spec["tokens"])))
    decode = eng.stats.decode_tokens_per_s
    long_ids = torch.randint(10, 4000, (spec["prefill"],), generator=g).tolist()
    list(eng.generate(long_ids, SamplingParams(temperature=0.0, max_tokens=1)))
    prefill = spec["prefill"] / eng.stats.prefill_s
    return {"decode_tok_s": decode, "prefill_tok_s": prefill, "generated": len(out), "load_s": load_s,
            "bytes_per_token": bytes_per_token(eng.model), "weight_bytes": eng.load_stats.get("weight_bytes"),
            "peak_host_bytes": eng.load_stats.get("peak_host_bytes"),
            "threads_ran": torch.get_num_threads()}


def bandwidth(threads: int) -> float:
    """Read bandwidth in bytes/s at `threads` threads: torch.sum over 64 MiB slices of a 1 GiB float32 tensor
    (each slice far past the caches), the best of 64. Short reads, as a decode step's are: on a shared machine
    one long read is cut by the other processes' time slices and reads low (a 512 MiB sum read 5 GB/s where
    its 64 MiB slices read 10-11)."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(2**28)
    n = 2**24
    best = float("inf")
    for i in range(64):
        v = x[(i * n) % (x.numel() - n):][:n]
        t0 = time.perf_counter()
        float(v.sum())
        best = min(best, time.perf_counter() - t0)
    return n * 4 / best


# -- the driver ---------------------------------------------------------------------------------------------
def run_one(python: str, spec: dict, in_process: bool = False) -> dict:
    before = os.getloadavg()[0]
    if in_process:  # --smoke: no process start (seconds of imports each)
        res = worker(spec)
        res.update(load_before=before, load_after=os.getloadavg()[0])
        return res
    r = subprocess.run([python, os.path.abspath(__file__), "--worker", json.dumps(spec)], capture_output=True,
                       text=True, timeout=3600)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1], "load_before": before}
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res.update(load_before=before, load_after=os.getloadavg()[0])
    return res


def summary(values: list[float]) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    fmt = (lambda v: f"{v:.1f}") if med >= 10 else (lambda v: f"{v:.2f}")
    return fmt(med) + (f" [{fmt(min(values))}-{fmt(max(values))}]" if len(values) > 1 else "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["v2lite", "demo"], default="v2lite")
    ap.add_argument("--path", help="a V2-Lite-shaped checkpoint already written (else a temporary one)")
    ap.add_argument("--layers", type=int, default=2, help="v2lite: layers (1 dense + the rest MoE)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32, help="tokens decoded per process")
    ap.add_argument("--prefill", type=int, default=512, help="prompt tokens of the prefill measurement")
    ap.add_argument("--configs", default="float32,bfloat16,int8,int4",
                    help="comma-separated; int8:torch / int4:torch run PyTorch's packed kernels (DSCHAT_CPU_GEMV=0)")
    ap.add_argument("--python", action="append", default=[], metavar="LABEL=PYTHON",
                    help="also run the configurations with another environment's python (an older checkout): "
                         "e.g. before=/tmp/old/venv/bin/python; repeatable")
    ap.add_argument("--gguf", help="directory of <model>-<type>.gguf files for llama-bench")
    ap.add_argument("--json", help="append every process's result to this file (JSON lines)")
    ap.add_argument("--smoke", action="store_true", help="demo model, 1 round, 4 tokens: seconds")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.smoke:
        args.model, args.rounds, args.tokens, args.prefill, args.configs = "demo", 1, 4, 32, "float32,int8,int4"
    pythons = [("now", sys.executable)] + [tuple(p.split("=", 1)) for p in args.python]
    configs = args.configs.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "demo":
            from dschat.runtime import DEMO_DIR

            path = str(DEMO_DIR)
        elif args.path:
            path = args.path
        else:
            t0 = time.perf_counter()
            path = str(write_v2lite(Path(tmp) / "v2lite", args.layers))
            print(f"wrote a V2-Lite-shaped {args.layers}-layer checkpoint in {time.perf_counter() - t0:.0f}s",
                  flush=True)
        jobs = [(label, py, c) for label, py in pythons for c in configs]
        results: dict[tuple[str, str], list[dict]] = {(label, c): [] for label, _, c in jobs}
        bws = []
        for r in range(args.rounds):
            bws.append(bandwidth(args.threads))
            order = jobs[r % len(jobs):] + jobs[:r % len(jobs)]
            for label, py, c in order:
                spec = {"model": path, "config": c, "threads": args.threads, "tokens": args.tokens,
                        "prefill": args.prefill}
                res = run_one(py, spec, in_process=args.smoke)
                res.update(round=r, label=label, config=c, model=args.model, layers=args.layers,
                           threads=args.threads, bandwidth=bws[-1])
                results[(label, c)].append(res)
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(res) + "\n")
                print(f"  round {r} {label:>6} {c:>8}: " + (res["error"] if "error" in res else
                      f"decode {res['decode_tok_s']:.2f} tok/s, prefill {res['prefill_tok_s']:.1f} tok/s, "
                      f"load {res['load_before']:.1f}->{res['load_after']:.1f}"), flush=True)
    bw = max(bws)
    print(f"\n{args.model}{f' ({args.layers} layers)' if args.model == 'v2lite' else ''}, {args.threads} "
          f"thread(s), {args.rounds} round(s), decode {args.tokens} tokens after {PROMPT}, prefill "
          f"{args.prefill}; read bandwidth {bw / 1e9:.1f} GB/s (best of the rounds)")
    print("| checkout | precision | bytes/token | decode tok/s | roofline | vs float32 | prefill tok/s |")
    print("|---|---|---|---|---|---|---|")
    for (label, c), rs in results.items():
        ok = [x for x in rs if "error" not in x]
        if not ok:
            print(f"| {label} | {c} | - | failed: {rs[0]['error']} | | | |")
            continue
        dec = [x["decode_tok_s"] for x in ok]
        nbytes = ok[0]["bytes_per_token"]
        base = [x["decode_tok_s"] for x in results.get((label, "float32"), []) if "error" not in x]
        ratio = f"{statistics.median(dec) / statistics.median(base):.2f}" if base else "-"
        print(f"| {label} | {c} | {nbytes / 1e6:,.0f} MB | {summary(dec)} | "
              f"{statistics.median(dec) * nbytes / bw:.0%} | {ratio} | "
              f"{summary([x['prefill_tok_s'] for x in ok])} |")
    loads = [x[k] for rs in results.values() for x in rs for k in ("load_before", "load_after") if k in x]
    print(f"load average during the run: {min(loads):.1f}-{max(loads):.1f}")
    llama(args)
    return 0


def llama(args):
    """llama.cpp's llama-bench on the same shapes, when it and GGUF files are here."""
    exe = shutil.which("llama-bench")
    if exe is None or not args.gguf:
        print("llama.cpp: skipped (" + ("llama-bench is not installed" if exe is None else "no --gguf DIR") + ")")
        return
    for f in sorted(Path(args.gguf).glob(f"{args.model}*.gguf")):
        for flags in (["-p", "0", "-n", str(args.tokens), "-d", str(PROMPT)], ["-p", str(args.prefill), "-n", "0"]):
            r = subprocess.run([exe, "-m", str(f), "-t", str(args.threads), "-r", "1", "-o", "jsonl", *flags],
                               capture_output=True, text=True)
            for line in r.stdout.splitlines():
                row = json.loads(line)
                print(f"llama.cpp {f.stem}: {'decode' if flags[1] == '0' else 'prefill'} {row['avg_ts']:.2f} tok/s")


if __name__ == "__main__":
    sys.exit(main())
