"""CPU decode and prefill of dschat in float32 / bfloat16 / int8 / int4, against the memory roofline and
(when installed) llama.cpp, in interleaved rounds.

    python benchmarks/bench_cpu.py [--model v2lite|demo] [--layers 2] [--threads 1] [--rounds 2]
                                   [--tokens 32] [--prefill 512] [--depth 0] [--configs float32,bfloat16,int8,int4]
    python benchmarks/bench_cpu.py --smoke          # the demo model, a few tokens, in-process: seconds

Models: `v2lite`, DeepSeek-V2-Lite's real shapes (hidden 2048, 64 routed experts top-6 + 2 shared,
moe_intermediate 1408, kv_lora 512, 16 heads, vocab 102400, layer 0 dense with intermediate 10944) with random
bf16 weights, cut to --layers layers (1 dense + the rest MoE), written once to a temporary directory; or
`demo`, the bundled demo model (cache-resident: its roofline fraction is no bound and can pass 100%).

Each configuration runs in a fresh process once per round, the order rotated each round (A B C D, B C D A,
...), so that what else the shared machine does hits every configuration alike in expectation. A process:
loads the model, decodes --tokens greedy tokens after a 128-token prompt (rate = the engine's
decode_tokens_per_s), then prefills a --prefill-token prompt from an empty cache (rate = tokens / prefill_s);
with --depth N, then decodes --tokens tokens after an N-token prompt and prefills a 64-token follow-up turn over
those N cached tokens (a chat's next turn; llama-bench: `-p 0 -n TOKENS -d N` and `-p 64 -n 0 -d N`).
Each round also measures the read bandwidth at the same thread count (torch.sum over 64 MiB slices of a
float32 tensor, the median of 64; the best is printed beside it: see bandwidth()). Printed per configuration:
the median [min-max] of the rounds, bytes of weights read per token (counted from the loaded model: routed
experts at k/E, one embedding row), and the fraction of the bandwidth (the rounds' median) that decode reaches
(tok/s x bytes / bandwidth). The 1-minute load average
is recorded before and after every process.

llama.cpp runs in the same rounds, interleaved with dschat's configurations (not after them): its
`llama-bench` (--llama-bench PATH, or $DSCHAT_LLAMA_BENCH, or `llama-bench` on PATH) on GGUF files of the same
checkpoint (--gguf DIR holding <name>-<type>.gguf, name `v2lite<layers>` or `demo`; --llama-types, default
bf16,q8_0,q4_0), one process for decode (`-p 0 -n TOKENS -d 128`: TOKENS tokens after 128 of context) and one
for prefill (`-p PREFILL -n 0`) per round; its bytes per token are counted from the GGUF's tensor table as
dschat's are (routed experts at k/E, one embedding row). Printed after the table: dschat over llama.cpp at the
same precision (int4 / Q4_0, int8 / Q8_0, bfloat16 / BF16), decode and prefill. Without llama-bench or the
GGUF files the script says so in one line and goes on. benchmarks/make_gguf.py writes the GGUF files from the
same checkpoint (llama.cpp's converter with the one patch the demo tokenizer and V2-Lite's missing q_lora_rank
need, then llama-quantize).

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
FOLLOW = 64  # --depth: a follow-up turn's new tokens


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
    def params(n: int):  # greedy, n tokens whatever the text (an older checkout may not have ignore_eos)
        if "ignore_eos" in inspect.signature(SamplingParams).parameters:
            return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        return SamplingParams(temperature=0.0, max_tokens=n)

    out = list(eng.generate(ids, params(spec["tokens"])))
    decode = eng.stats.decode_tokens_per_s
    long_ids = torch.randint(10, 4000, (spec["prefill"],), generator=g).tolist()
    list(eng.generate(long_ids, SamplingParams(temperature=0.0, max_tokens=1)))
    prefill = spec["prefill"] / eng.stats.prefill_s
    deep = {}
    if spec.get("depth"):  # decode after a long context, then a follow-up turn's prefill over it
        deep_ids = torch.randint(10, 4000, (spec["depth"],), generator=g).tolist()
        list(eng.generate(deep_ids, params(spec["tokens"])))
        deep["decode_deep_tok_s"] = eng.stats.decode_tokens_per_s
        follow = deep_ids + torch.randint(10, 4000, (FOLLOW,), generator=g).tolist()
        list(eng.generate(follow, SamplingParams(temperature=0.0, max_tokens=1)))
        cached = eng.stats.cached_tokens  # the context, and a first new token where it is the one decoded there
        if cached < spec["depth"]:
            raise RuntimeError(f"the follow-up reused {cached} cached tokens, not the context's {spec['depth']}")
        deep["follow_tok_s"] = (len(follow) - cached) / eng.stats.prefill_s
    return {"decode_tok_s": decode, "prefill_tok_s": prefill, **deep, "generated": len(out), "load_s": load_s,
            "bytes_per_token": bytes_per_token(eng.model), "weight_bytes": eng.load_stats.get("weight_bytes"),
            "peak_host_bytes": eng.load_stats.get("peak_host_bytes"),
            "threads_ran": torch.get_num_threads()}


def bandwidth(threads: int) -> tuple[float, float]:
    """Read bandwidth in bytes/s at `threads` threads: torch.sum over 64 MiB slices of a 1 GiB float32 tensor
    (each slice far past the caches), 64 of them: (the median slice's, the best slice's). Short reads, as a decode
    step's are: on a shared machine one long read is cut by the other processes' time slices and reads low (a 512
    MiB sum read 5 GB/s where its 64 MiB slices read 10-11). The roofline is the median's: on a VM whose memory the
    host shares the best slice catches rare bursts (a Zen 4 VM: best 48-63 GB/s, median 33-37, a 1.4 GB read 33),
    which no token's reads see for long; decode's own rate is a median too."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(2**28)
    n = 2**24
    times = []
    for i in range(64):
        v = x[(i * n) % (x.numel() - n):][:n]
        t0 = time.perf_counter()
        float(v.sum())
        times.append(time.perf_counter() - t0)
    return n * 4 / statistics.median(times), n * 4 / min(times)


# -- llama.cpp ----------------------------------------------------------------------------------------------
# ggml tensor types: (bytes per block, elements per block)
GGML_BLOCKS = {0: (4, 1), 1: (2, 1), 2: (18, 32), 3: (20, 32), 6: (22, 32), 7: (24, 32), 8: (34, 32),
               9: (36, 32), 10: (84, 256), 11: (110, 256), 12: (144, 256), 13: (176, 256), 14: (210, 256),
               15: (292, 256), 30: (2, 1)}
LLAMA_TYPES = {"bf16": "BF16", "f16": "F16", "f32": "F32", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_k_m": "Q4_K_M"}
SAME_PRECISION = [("int4", "q4_0"), ("int8", "q8_0"), ("bfloat16", "bf16"), ("float32", "f32")]


def gguf_active_bytes(path: Path) -> int | None:
    """Bytes of weights one decoded token reads from a GGUF file, counted as dschat's bytes_per_token counts
    them: every tensor, the routed experts (`*_exps`) at k/E, one row of the token embedding. None for a
    file this reader does not follow (another version, a tensor type not in GGML_BLOCKS)."""
    import struct

    with open(path, "rb") as f:
        def num(fmt):
            return struct.unpack("<" + fmt, f.read(struct.calcsize(fmt)))[0]

        def string():
            return f.read(num("Q")).decode("utf-8", "replace")

        scalars = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

        def value(t):
            if t == 8:
                return string()
            if t == 9:
                et, n = num("I"), num("Q")
                if et in scalars:  # skipped whole: the tokenizer's arrays are long
                    f.seek(n * struct.calcsize(scalars[et]), 1)
                    return None
                for _ in range(n):
                    value(et)
                return None
            return num(scalars[t])

        if f.read(4) != b"GGUF" or num("I") not in (2, 3):
            return None
        n_tensors, n_kv = num("Q"), num("Q")
        kv = {}
        for _ in range(n_kv):
            key = string()
            kv[key] = value(num("I"))
        arch = kv.get("general.architecture")
        k, e = kv.get(f"{arch}.expert_used_count"), kv.get(f"{arch}.expert_count")
        total = 0
        for _ in range(n_tensors):
            name = string()
            dims = [num("Q") for _ in range(num("I"))]
            ttype = num("I")
            num("Q")  # offset
            if ttype not in GGML_BLOCKS:
                return None
            size, block = GGML_BLOCKS[ttype]
            elems = 1
            for d in dims:
                elems *= d
            b = elems // block * size
            if "_exps" in name and k and e:
                b = b * k // e
            elif name.startswith("token_embd") and len(dims) > 1:
                b //= dims[1]
            total += b
    return total


def llama_bench_path(arg: str | None) -> str | None:
    exe = arg or os.environ.get("DSCHAT_LLAMA_BENCH") or shutil.which("llama-bench")
    return exe if exe and os.access(exe, os.X_OK) else None


def llama_run(spec: dict) -> dict:
    """One round of llama.cpp at one precision: a llama-bench process for decode, one for prefill."""
    out = {}
    runs = [("decode", ["-p", "0", "-n", str(spec["tokens"]), "-d", str(PROMPT)]),
            ("prefill", ["-p", str(spec["prefill"]), "-n", "0"])]
    if spec.get("depth"):
        runs += [("decode_deep", ["-p", "0", "-n", str(spec["tokens"]), "-d", str(spec["depth"])]),
                 ("follow", ["-p", str(FOLLOW), "-n", "0", "-d", str(spec["depth"])])]
    for what, flags in runs:
        cmd = [spec["exe"], "-m", spec["gguf"], "-t", str(spec["threads"]), "-r", "1", "-o", "jsonl", *flags,
               *spec["extra"]]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
        if r.returncode != 0 or not rows:
            tail = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
            return {"error": f"llama-bench {what}: {tail}"}
        out[f"{what}_tok_s"] = float(rows[-1]["avg_ts"])
    out.update(bytes_per_token=spec["bytes_per_token"], threads_ran=spec["threads"])
    return out


# -- the driver ---------------------------------------------------------------------------------------------
def run_one(python: str | None, spec: dict, in_process: bool = False) -> dict:
    before = os.getloadavg()[0]
    if python is None:  # llama.cpp
        res = llama_run(spec)
        res.update(load_before=before, load_after=os.getloadavg()[0])
        return res
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


def llama_jobs(args, name: str) -> tuple[list[tuple], str | None]:
    """The llama.cpp jobs of this run, and the one line that says why there are none (or which are missing)."""
    exe = llama_bench_path(args.llama_bench)
    if exe is None:
        return [], "llama.cpp: skipped (llama-bench is not installed: --llama-bench PATH or $DSCHAT_LLAMA_BENCH)"
    if not args.gguf:
        return [], "llama.cpp: skipped (no --gguf DIR; benchmarks/make_gguf.py writes the files)"
    jobs, missing = [], []
    for t in [t for t in args.llama_types.split(",") if t]:
        f = Path(args.gguf) / f"{name}-{t}.gguf"
        if f.is_file():
            jobs.append(("llama.cpp", None, t, {"exe": exe, "gguf": str(f), "bytes_per_token": gguf_active_bytes(f),
                                                "extra": args.llama_args.split()}))
        else:
            missing.append(f.name)
    note = f"llama.cpp: no {', '.join(missing)} in {args.gguf}" if missing else None
    if not jobs:
        note = f"llama.cpp: skipped (no {', '.join(missing)} in {args.gguf})"
    return jobs, note


def ratios(results: dict) -> list[str]:
    """dschat over llama.cpp at the same precision, medians of the rounds, decode and prefill."""
    def med(key, what):
        ok = [x[what] for x in results.get(key, []) if "error" not in x and what in x]
        return statistics.median(ok) if ok else None

    lines = []
    names = {"decode_tok_s": "decode", "prefill_tok_s": "prefill", "decode_deep_tok_s": "decode deep",
             "follow_tok_s": "follow-up prefill"}
    for ours, theirs in SAME_PRECISION:
        for label in sorted({lab for lab, _ in results if lab != "llama.cpp"}):
            parts = []
            for what, shown in names.items():
                a, b = med((label, ours), what), med(("llama.cpp", theirs), what)
                if a is not None and b:
                    parts.append(f"{shown} {a / b:.3f}x")
            if parts:
                lines.append(f"{label} dschat {ours} / llama.cpp {LLAMA_TYPES.get(theirs, theirs)}: "
                             + ", ".join(parts))
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["v2lite", "demo"], default="v2lite")
    ap.add_argument("--path", help="a V2-Lite-shaped checkpoint already written (else a temporary one)")
    ap.add_argument("--layers", type=int, default=2, help="v2lite: layers (1 dense + the rest MoE)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32, help="tokens decoded per process")
    ap.add_argument("--prefill", type=int, default=512, help="prompt tokens of the prefill measurement")
    ap.add_argument("--depth", type=int, default=0,
                    help=f"also decode after a DEPTH-token context and prefill a {FOLLOW}-token follow-up over it")
    ap.add_argument("--configs", default="float32,bfloat16,int8,int4",
                    help="comma-separated; int8:torch / int4:torch run PyTorch's packed kernels (DSCHAT_CPU_GEMV=0)")
    ap.add_argument("--python", action="append", default=[], metavar="LABEL=PYTHON",
                    help="also run the configurations with another environment's python (an older checkout): "
                         "e.g. before=/tmp/old/venv/bin/python; repeatable")
    ap.add_argument("--gguf",
                    help="directory of <name>-<type>.gguf files (name v2lite<layers> or demo) for llama-bench")
    ap.add_argument("--llama-bench", help="the llama-bench executable (default $DSCHAT_LLAMA_BENCH, then PATH)")
    ap.add_argument("--llama-types", default="bf16,q8_0,q4_0", help="GGUF types to run (comma-separated)")
    ap.add_argument("--llama-args", default="", help="more llama-bench arguments, e.g. '--repack 0'")
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
    name = f"v2lite{args.layers}" if args.model == "v2lite" else "demo"
    extra, llama_note = llama_jobs(args, name)
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
        jobs = [(label, py, c, {}) for label, py in pythons for c in configs] + extra
        results: dict[tuple[str, str], list[dict]] = {(label, c): [] for label, _, c, _ in jobs}
        bws = []
        for r in range(args.rounds):
            bws.append(bandwidth(args.threads))  # (median, best)
            order = jobs[r % len(jobs):] + jobs[:r % len(jobs)]
            for label, py, c, more in order:
                spec = {"model": path, "config": c, "threads": args.threads, "tokens": args.tokens,
                        "prefill": args.prefill, "depth": args.depth, **more}
                res = run_one(py, spec, in_process=args.smoke)
                res.update(round=r, label=label, config=c, model=args.model, layers=args.layers,
                           threads=args.threads, bandwidth=bws[-1][0], bandwidth_best=bws[-1][1])
                results[(label, c)].append(res)
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(res) + "\n")
                deep = (f"decode at {args.depth} {res['decode_deep_tok_s']:.2f} tok/s, follow-up prefill "
                        f"{res['follow_tok_s']:.1f} tok/s, " if "follow_tok_s" in res else "")
                print(f"  round {r} {label:>9} {c:>8}: " + (res["error"] if "error" in res else
                      f"decode {res['decode_tok_s']:.2f} tok/s, prefill {res['prefill_tok_s']:.1f} tok/s, {deep}"
                      f"load {res['load_before']:.1f}->{res['load_after']:.1f}"), flush=True)
    bw = statistics.median(b for b, _ in bws)
    print(f"\n{args.model}{f' ({args.layers} layers)' if args.model == 'v2lite' else ''}, {args.threads} "
          f"thread(s), {args.rounds} round(s), decode {args.tokens} tokens after {PROMPT}, prefill "
          f"{args.prefill}; read bandwidth {bw / 1e9:.1f} GB/s (the rounds' median 64 MiB read; the best one "
          f"{max(b for _, b in bws) / 1e9:.1f})")
    print("| checkout | precision | bytes/token | decode tok/s | roofline | vs float32 | prefill tok/s | load avg |")
    print("|---|---|---|---|---|---|---|---|")
    for (label, c), rs in results.items():
        ok = [x for x in rs if "error" not in x]
        shown = LLAMA_TYPES.get(c, c) if label == "llama.cpp" else c
        if not ok:
            print(f"| {label} | {shown} | - | failed: {rs[0]['error']} | | | | |")
            continue
        dec = [x["decode_tok_s"] for x in ok]
        nbytes = ok[0]["bytes_per_token"]
        base = [x["decode_tok_s"] for x in results.get((label, "float32"), []) if "error" not in x]
        ratio = f"{statistics.median(dec) / statistics.median(base):.2f}" if base else "-"
        loads = [x[k] for x in ok for k in ("load_before", "load_after")]
        print(f"| {label} | {shown} | {f'{nbytes / 1e6:,.0f} MB' if nbytes else '-'} | {summary(dec)} | "
              f"{f'{statistics.median(dec) * nbytes / bw:.0%}' if nbytes else '-'} | {ratio} | "
              f"{summary([x['prefill_tok_s'] for x in ok])} | {min(loads):.1f}-{max(loads):.1f} |")
    if args.depth:
        print(f"\nafter a {args.depth}-token context: decode {args.tokens} tokens; a {FOLLOW}-token follow-up's "
              "prefill over it")
        print("| checkout | precision | decode tok/s | follow-up prefill tok/s |")
        print("|---|---|---|---|")
        for (label, c), rs in results.items():
            ok = [x for x in rs if "error" not in x and "follow_tok_s" in x]
            if ok:
                shown = LLAMA_TYPES.get(c, c) if label == "llama.cpp" else c
                print(f"| {label} | {shown} | {summary([x['decode_deep_tok_s'] for x in ok])} | "
                      f"{summary([x['follow_tok_s'] for x in ok])} |")
    loads = [x[k] for rs in results.values() for x in rs for k in ("load_before", "load_after") if k in x]
    print(f"load average during the run: {min(loads):.1f}-{max(loads):.1f}")
    if llama_note:
        print(llama_note)
    for line in ratios(results):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
