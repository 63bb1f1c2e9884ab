"""Latent KV reuse and MTP, in figures.

    python benchmarks/bench_reuse.py
    python benchmarks/bench_reuse.py --smoke    # every step at toy sizes, in seconds (a check, no figures)

1. Time to first token of a new turn after a history of 1K / 4K / 8K tokens: with the history in the
   latent cache (turn k of a chat) against a cold prefill of the same prompt, small model, CPU.
2. Cache bytes per token for the released V2-Lite and V3 configurations: MLA's latent (what dschat keeps)
   beside materialised per-head K/V.
3. Tokens per main-model forward pass with MTP drafting (K = 1, 2, 3) on the bundled demo model (trained,
   so its acceptance rate means something), and decode tokens/s beside plain decoding.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from dschat.dev import tiny_checkpoints as tc
from bench_decode import bench_config
from dschat.engine import Engine, SamplingParams
from dschat.runtime import DEMO_DIR

V2_LITE = dict(layers=27, heads=16, kv_lora=512, rope=64, nope=128, v=128)
V3 = dict(layers=61, heads=128, kv_lora=512, rope=64, nope=128, v=128, mtp=1)


def ttft(eng, ids) -> float:
    list(eng.generate(ids, SamplingParams(max_tokens=1)))
    return eng.stats.ttft_s


def reuse(smoke: bool):
    print("1. time to first token of a new 32-token turn (small model, CPU, float32)")
    print(f"{'history':>8} {'cold s':>8} {'reused s':>9} {'ratio':>7} {'cached tokens':>14}")
    vocab = 512 if smoke else 16000
    with tempfile.TemporaryDirectory() as tmp:
        path = tc.write_checkpoint(Path(tmp) / "m", bench_config(vocab), seed=0)
        eng = Engine.from_pretrained(path, dtype=torch.float32, speculative="none", cache_gb=1.0)
        g = torch.Generator().manual_seed(0)
        for n in (64, 128) if smoke else (1024, 4096, 8192):
            history = torch.randint(0, vocab, (n,), generator=g).tolist()
            turn = history + torch.randint(0, vocab, (32,), generator=g).tolist()
            eng.cache.clear()
            cold = ttft(eng, turn)
            eng.cache.clear()
            list(eng.generate(history, SamplingParams(max_tokens=1)))  # turn k-1 leaves the history cached
            warm = ttft(eng, turn)
            print(f"{n:>8} {cold:>8.3f} {warm:>9.3f} {warm / cold:>7.3f} {eng.stats.cached_tokens:>14}")


def bytes_per_token():
    print("\n2. cache bytes per token (bf16)")
    print(f"{'model':<10} {'latent (MLA)':>13} {'materialised K/V':>17} {'ratio':>6}")
    for name, c in (("V2-Lite", V2_LITE), ("V3", V3)):
        layers = c["layers"] + c.get("mtp", 0)
        latent = layers * (c["kv_lora"] + c["rope"]) * 2
        kv = layers * c["heads"] * ((c["nope"] + c["rope"]) + c["v"]) * 2
        print(f"{name:<10} {latent / 1024:>10.1f} KiB {kv / 1024:>13.1f} KiB {kv / latent:>5.1f}x")


def mtp(smoke: bool):
    n_tokens = 8 if smoke else 64
    print(f"\n3. MTP on the bundled demo model (CPU, float32, greedy, {'2' if smoke else '20'} code prompts x "
          f"{n_tokens} tokens)")
    demo = DEMO_DIR
    import sysconfig

    prompts = []
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for f in ("json/encoder.py", "textwrap.py", "shlex.py", "glob.py", "bisect.py"):
        text = (stdlib / f).read_text()
        for k in range(4):
            prompts.append(text[k * 1500: k * 1500 + 1200])
    prompts = prompts[:2] if smoke else prompts
    print(f"{'drafting':<10} {'tokens/forward':>15} {'acceptance':>11} {'decode tok/s':>13}")
    for spec, k in (("none", 1), ("mtp", 1), ("mtp", 2), ("mtp", 3)):
        eng = Engine.from_pretrained(demo, dtype=torch.float32, speculative=spec, draft_tokens=k)
        tok = eng.tokenizer
        gen = steps = drafts = acc = 0
        secs = 0.0
        for p in prompts:
            ids = [tok.bos_token_id] + tok.encode(p)
            list(eng.generate(ids, SamplingParams(max_tokens=n_tokens, ignore_eos=True)))
            s = eng.stats
            gen += s.generated_tokens - 1
            steps += s.forwards
            drafts += s.draft_tokens
            acc += s.accepted_tokens
            secs += s.decode_s
        label = "none" if spec == "none" else f"mtp K={k}"
        rate = f"{acc / drafts:.0%}" if drafts else "-"
        print(f"{label:<10} {gen / steps:>15.2f} {rate:>11} {gen / secs:>13.1f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="toy sizes: checks that every step runs (no figures)")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    reuse(args.smoke)
    bytes_per_token()
    mtp(args.smoke)


if __name__ == "__main__":
    main()
