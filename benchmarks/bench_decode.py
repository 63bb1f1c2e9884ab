"""Batch-1 greedy decode tokens/s: dschat's engine against transformers, same random model, same run.

    python benchmarks/bench_decode.py [--device cpu|cuda] [--tokens 128] [--prompt 128 1024]

The model is a small DeepSeek-V2-shaped checkpoint written to a temporary directory in the hub layout
(4 layers, hidden 512, 16 routed experts top-4 + 2 shared). Both sides load the same files, greedy-decode
the same prompt, and must produce the same tokens; the script prints both rates and their ratio.

Then the bundled demo model (V3's architecture with its MTP layer) decodes a code prompt plainly and with
each drafter: tok/s, the ratio to plain decoding, tokens per forward pass, and whether the tokens are the
plain ones. The engine's default speculation per device follows this table.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from dschat.dev import reference
from dschat.dev import tiny_checkpoints as tc
from dschat.runtime import DEMO_DIR
from dschat.engine import Engine, SamplingParams

DEMO_PROMPT = "import os\nimport sys\n\n\ndef main(argv=None):\n    "


def bench_config(vocab: int) -> dict:
    c = tc.v2_lite_config(vocab)
    c.update({"hidden_size": 512, "intermediate_size": 1408, "moe_intermediate_size": 256,
              "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8,
              "kv_lora_rank": 256, "qk_nope_head_dim": 64, "qk_rope_head_dim": 32, "v_head_dim": 64,
              "n_routed_experts": 16, "num_experts_per_tok": 4, "n_shared_experts": 2})
    return c


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt", type=int, nargs="+", default=[128, 1024],
                    help="prompt lengths (history the decode attends over)")
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--demo-only", action="store_true", help="only the demo model's drafters")
    ap.add_argument("--smoke", action="store_true", help="toy sizes: checks that every step runs (no figures)")
    ap.add_argument("--static", action="store_true", help="only the static decode step: plain, eager, compiled")
    args = ap.parse_args(argv)
    if args.static:
        return static_step(args)
    if args.smoke:
        args.tokens, args.prompt, args.vocab, args.repeats = 6, [16], 512, 1
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, None: None}[args.dtype]
    if dtype is None:
        dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32

    if args.demo_only:
        return demo_speculation(args, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        path = tc.write_checkpoint(Path(tmp) / "bench", bench_config(args.vocab), seed=0)
        eng = Engine.from_pretrained(path, device=args.device, dtype=dtype, speculative="none")
        try:
            ref = reference.load(path, dtype, args.device)
        except reference.ReferenceUnavailable as e:
            raise SystemExit(f"bench_decode: no comparison with transformers: {e}") from None
        print(f"device {args.device}  dtype {str(dtype).replace('torch.', '')}  threads {torch.get_num_threads()}  "
              f"decode {args.tokens} tokens  transformers {reference.transformers().__version__}")
        print(f"{'prompt':>7} {'dschat tok/s':>13} {'transformers tok/s':>19} {'ratio':>7}  same tokens")
        for n_prompt in args.prompt:
            e, r, same = measure(eng, ref, n_prompt, args)
            print(f"{n_prompt:>7} {e:>13.1f} {r:>19.1f} {e / r:>6.2f}x  {same}")
    demo_speculation(args, dtype)


def best_rate(eng, ids, params, repeats):
    """Best decode tok/s over `repeats` cold-cache runs (after a warm-up), the tokens, tokens per forward."""
    rate = 0.0
    for i in range(repeats + 1):
        eng.cache.clear()
        out = list(eng.generate(ids, params))
        if i:
            rate = max(rate, eng.stats.decode_tokens_per_s)
    return rate, out, eng.stats.tokens_per_forward


def demo_speculation(args, dtype):
    print(f"\ndemo model ({DEMO_DIR.name}), {args.tokens} greedy tokens after a code prompt")
    print(f"{'drafter':>8} {'tok/s':>8} {'vs plain':>9} {'tokens/forward':>15}  same tokens")
    params = SamplingParams(max_tokens=args.tokens, ignore_eos=True)
    plain = None
    for spec in ("none", "mtp", "ngram"):
        eng = Engine.from_pretrained(DEMO_DIR, device=args.device, dtype=dtype, speculative=spec)
        tok = eng.tokenizer
        ids = [tok.bos_token_id] + tok.encode(DEMO_PROMPT)
        rate, out, per_forward = best_rate(eng, ids, params, args.repeats)
        plain = plain or (rate, out)
        print(f"{spec:>8} {rate:>8.1f} {rate / plain[0]:>8.2f}x {per_forward:>15.2f}  {out == plain[1]}")


def static_step(args):
    """Plain path vs the static step, eager and compiled with inductor, on the demo model (1 thread)."""
    import os

    from dschat.engine.static import StaticDecoder

    torch.set_num_threads(1)
    tokens = args.tokens if args.tokens != 128 else 256
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="dschat-bench-inductor-")
    eng = Engine.from_pretrained(DEMO_DIR, speculative="none", compile="off", threads=1)
    tok = eng.tokenizer
    ids = [tok.bos_token_id] + tok.encode(DEMO_PROMPT)
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    load = os.getloadavg()
    rows = {}
    for name in ("plain", "eager", "compiled", "compiled (2nd start)"):
        t0 = time.perf_counter()
        if name == "plain":
            eng.static = None
        elif name == "eager":
            eng.static = StaticDecoder(eng.model, eng.cache, eng.device, eng.context_length, "eager")
        else:
            torch._dynamo.reset()  # a second start: dynamo traces again, inductor finds its code on disk
            eng.static = StaticDecoder(eng.model, eng.cache, eng.device, eng.context_length, "compiled")
        prepare = time.perf_counter() - t0
        eng.cache.clear()
        t1 = time.perf_counter()
        first = next(iter(eng.generate(ids, SamplingParams(max_tokens=1))))
        ttft = time.perf_counter() - t1
        rate, out, _ = best_rate(eng, ids, params, args.repeats)
        rows[name] = (rate, prepare, ttft, out)
    print(f"demo model, 1 thread, greedy, {tokens} tokens; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
          f"({os.cpu_count()} cores)")
    print(f"{'decode step':>22} {'tok/s':>8} {'vs plain':>9} {'compile s':>10} {'first token s':>14}  same tokens")
    base = rows["plain"]
    for name, (rate, prepare, ttft, out) in rows.items():
        print(f"{name:>22} {rate:>8.1f} {rate / base[0]:>8.2f}x {prepare:>10.1f} {ttft:>14.3f}  {out == base[3]}")


def measure(eng, ref, n_prompt, args):
    ids = torch.randint(0, args.vocab, (n_prompt,), generator=torch.Generator().manual_seed(n_prompt)).tolist()
    params = SamplingParams(max_tokens=args.tokens, ignore_eos=True)

    def run_engine():
        eng.cache.clear()  # a cold cache every run: nothing reused from the last one
        out = list(eng.generate(ids, params))
        return out, eng.stats.decode_s, len(out) - 1

    def run_reference():
        x = torch.tensor([ids], device=args.device)
        with torch.no_grad():
            t0 = time.perf_counter()
            ref.generate(x, max_new_tokens=1, do_sample=False, pad_token_id=0)
            t1 = time.perf_counter()
            out = ref.generate(x, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                               pad_token_id=0)
            t2 = time.perf_counter()
        # decode time = the whole generation minus a prefill and first token
        return out[0, n_prompt:].tolist(), (t2 - t1) - (t1 - t0), args.tokens - 1

    results = {}
    for name, fn in (("dschat", run_engine), ("transformers", run_reference)):
        fn()  # warm-up
        best = 0.0
        for _ in range(args.repeats):
            tokens, secs, n = fn()
            best = max(best, n / secs)
        results[name] = (tokens, best)
    return results["dschat"][1], results["transformers"][1], results["dschat"][0] == results["transformers"][0]


if __name__ == "__main__":
    main()
