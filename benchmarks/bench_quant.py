"""int8 / int4 weights against bf16: quality on the CPU, speed and memory on a GPU.

    python benchmarks/bench_quant.py                 # quality: demo model + tiny V2-Lite-like model (CPU)
    python benchmarks/bench_quant.py --gpu           # plus V2-Lite shapes on CUDA: tok/s and GPU memory
    python benchmarks/bench_quant.py --smoke         # everything at toy sizes, on the CPU (a check, no figures)

Quality, each precision against the bf16 weights in the same run: top-1 agreement of next-token
predictions and mean KL(bf16 || quantized) over windows of held-out text (the demo model's held-out standard
library modules; random ids for the random model), perplexity on the held-out text, and greedy agreement
over 256 generated tokens (the share of positions with the same token, and where the first difference
falls). int4 is measured with zero points (what --quant int4 runs) and symmetric.

--gpu: the packed matmul at V2-Lite's decode shapes (error and time per call against bf16), then
DeepSeek-V2-Lite's shapes (27 layers, 64 experts, vocab 102400) with random weights made directly on
the GPU, batch-1 greedy decode tok/s and GPU memory at bf16, int8 and int4, and the device's copy bandwidth
measured in the same run (bytes read per token / bandwidth is the roofline).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from dschat.dev import tiny_checkpoints as tc
from dschat.engine import Engine, SamplingParams
from dschat.runtime import DEMO_DIR
from dschat.engine.config import ModelConfig
from dschat.engine.hub import resolve
from dschat.engine.loader import Placer, load_model
from dschat.engine.model import Transformer
from dschat.engine.quant import QuantSpec, convert, is_quantized, packed_layout, quantize
from dschat.kernels.quant_matmul import quant_matmul, quant_matmul_reference
from dschat.training.corpus import split, stdlib_files

PRECISIONS = {"bf16": None, "int8": QuantSpec(8), "int4": QuantSpec(4), "int4-sym": QuantSpec(4, symmetric=True)}
DEMO = DEMO_DIR


def engine(path: Path, name: str, device="cpu", dtype=torch.float32) -> Engine:
    """The checkpoint at one precision (bf16: the weights as stored; the CPU computes in float32)."""
    root = resolve(path)
    cfg = ModelConfig.from_file(root / "config.json")
    model = load_model(root, cfg, torch.device(device), dtype, with_mtp=False, progress=lambda d, t: None,
                       quantize=PRECISIONS[name])
    return Engine(model, cfg, root, torch.device(device), dtype, cache_gb=0.25, speculative="none",
                  quant=None if name == "bf16" else name)


def held_out_windows(tok, n: int, seq: int) -> list[list[int]]:
    files = split(stdlib_files(tests=False))[1]
    stream: list[int] = []
    for _, text in files:
        stream += tok.encode(text)
        if len(stream) >= n * seq:
            break
    return [stream[i * seq:(i + 1) * seq] for i in range(n)]


def stored_bytes(eng: Engine) -> int:
    """Weights as stored: parameters (the unquantized weights) at 2 bytes, packed buffers at their size."""
    return (sum(p.numel() * 2 for p in eng.model.parameters())
            + sum(b.numel() * b.element_size() for b in eng.model.buffers()))


def quality(ref: Engine, eng: Engine, windows, prompts, reference: list[list[int]]) -> dict:
    nll = agree = kl = count = 0.0
    for w in windows:
        r, q = ref.logits(w).log_softmax(-1), eng.logits(w).log_softmax(-1)
        target = torch.tensor(w[1:])
        nll += float(-q[:-1].gather(1, target[:, None]).sum())
        agree += float((q.argmax(-1) == r.argmax(-1)).sum())
        kl += float((r.exp() * (r - q)).sum())
        count += len(w)
    same = first = 0.0
    tokens = len(reference[0])
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    for p, a in zip(prompts, reference):
        b = list(eng.generate(p, params))
        same += sum(x == y for x, y in zip(a, b)) / tokens
        first += next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), tokens)
    rate = eng.stats.decode_tokens_per_s
    return {"ppl": float(torch.exp(torch.tensor(nll / (count - len(windows))))), "top1": agree / count,
            "kl": kl / count, "greedy": same / len(prompts), "first_diff": first / len(prompts),
            "weights_mb": stored_bytes(eng) / 1e6, "cpu_tok_s": rate}


def quality_table(label: str, path: Path, windows, prompts, tokens: int, names):
    ref = engine(path, "bf16")
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    reference = [list(ref.generate(p, params)) for p in prompts]
    print(f"\n{label}: {len(windows)} windows of {len(windows[0])} tokens, greedy over {tokens} tokens "
          f"from {len(prompts)} prompts")
    print("| precision | perplexity | vs bf16 | top-1 agreement | mean KL | greedy agreement | first difference "
          "| weights MB (bf16 = 2 B) | CPU decode tok/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = None
    for name in names:
        eng = ref if name == "bf16" else engine(path, name)
        f = quality(ref, eng, windows, prompts, reference)
        base = base or f["ppl"]
        print(f"| {name} | {f['ppl']:.3f} | {100 * (f['ppl'] / base - 1):+.2f}% | {100 * f['top1']:.2f}% | "
              f"{f['kl']:.5f} | {100 * f['greedy']:.1f}% | {f['first_diff']:.0f} | {f['weights_mb']:.1f} | "
              f"{f['cpu_tok_s']:.1f} |", flush=True)


def v2_lite_like(tmp: Path, smoke: bool) -> Path:
    """A tiny random V2-Lite-shaped checkpoint: every quantized dimension a multiple of the group."""
    c = tc.v2_lite_config(vocab=2048)
    if not smoke:
        c.update(hidden_size=256, intermediate_size=768, moe_intermediate_size=128, num_hidden_layers=4,
                 n_routed_experts=16, num_experts_per_tok=6, kv_lora_rank=128)
    return tc.write_checkpoint(tmp / "v2_lite_like", c, seed=11)


# -- GPU: V2-Lite shapes ---------------------------------------------------------------------------------------
def v2_lite_config(layers: int, smoke: bool) -> dict:
    c = tc.v2_lite_config(vocab=102400)
    c.update(hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=layers,
             num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512, qk_nope_head_dim=128,
             qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2)
    if smoke:
        c.update(vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                 num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=64, qk_nope_head_dim=32,
                 qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8, num_experts_per_tok=2)
    return c


def weight_table(c: dict):
    """The weights' bytes at each precision, computed from the shapes (what the loader will hold)."""
    print(f"\nV2-Lite / Coder-V2-Lite weights, computed from the shapes ({c['num_hidden_layers']} layers):")
    print("| precision | weights GB |")
    print("|---|---|")
    for name in ("bf16", "int8", "int4"):
        s, total = PRECISIONS[name], 0
        for hub, shape in tc.tensor_shapes(c).items():
            if s is not None and hub.endswith(".weight") and len(shape) == 2 and is_quantized(hub[:-len(".weight")]):
                total += sum(torch.empty(0, dtype=dt).element_size() * math.prod(sh)
                             for dt, sh in filter(None, packed_layout(s, *shape).values()))
            else:
                total += 2 * math.prod(shape)
        print(f"| {name} | {total / 1e9:.2f} |")


def random_engine(c: dict, name: str, device: torch.device, dtype) -> Engine:
    """Random weights made tensor by tensor on the device and placed as the loader places them (quantized
    as they arrive), so that no checkpoint of 31 GB needs writing."""
    cfg = ModelConfig.from_dict(c, "V2-Lite-shaped config")
    with torch.device("meta"):
        model = Transformer(cfg, with_mtp=False)
    if PRECISIONS[name] is not None:
        convert(model, PRECISIONS[name])
    placer = Placer(model, device, dtype, (128, 128), False)
    g = torch.Generator(device=device).manual_seed(0)
    for hub, shape in tc.tensor_shapes(c).items():
        local = model.local_name(hub)
        t = torch.randn(shape, generator=g, device=device, dtype=torch.float32)
        t = (1 + 0.1 * t) if hub.endswith("norm.weight") else t / shape[-1] ** 0.5
        placer.put(placer.target(local), t.to(dtype), None, hub)
        del t
    return Engine(model.eval(), cfg, ROOT, device, dtype, cache_gb=1.0, speculative="none",
                  quant=None if name == "bf16" else name)


def bandwidth(device: torch.device) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + written)."""
    a = torch.empty(2**28, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    sync(device)
    t = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    sync(device)
    return 2 * 10 * a.numel() / (time.perf_counter() - t) / 1e9


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kernel_table(device: torch.device, smoke: bool):
    """The packed matmul at V2-Lite's decode shapes (one row): error against dequantise-then-matmul, and
    time per call against the bf16 matmul, on this device's path (Triton on CUDA)."""
    shapes = [(1408, 2048), (2048, 1408), (10944, 2048), (3072, 2048)] if not smoke else [(128, 256)]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"\npacked matmul, one row, on {device}: error vs dequantise-then-matmul, µs per call (bf16 F.linear = 1)")
    print("| N x K | precision | max rel. error | µs | vs bf16 |")
    print("|---|---|---|---|---|")
    for n, k in shapes:
        w = torch.randn(n, k, device=device) / k ** 0.5
        x = torch.randn(1, k, device=device, dtype=dtype)
        dense = w.to(dtype)
        base = timed(lambda: torch.nn.functional.linear(x, dense), device)
        for name in ("int8", "int4"):
            p = quantize(w, PRECISIONS[name])
            err = float((quant_matmul(x, p).float() - quant_matmul_reference(x, p).float()).abs().max()
                        / quant_matmul_reference(x, p).float().abs().max())
            t = timed(lambda: quant_matmul(x, p), device)
            print(f"| {n} x {k} | {name} | {err:.1e} | {t:.1f} | {base / t:.2f}x |", flush=True)


def timed(fn, device, n: int = 50) -> float:
    fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - t) / n * 1e6


def gpu_table(device: torch.device, layers: int, tokens: int, smoke: bool):
    c = v2_lite_config(layers, smoke)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"\nV2-Lite shapes ({layers} layers, random weights) on {device}: batch-1 greedy decode of {tokens} "
          f"tokens after a 32-token prompt; copy bandwidth {bandwidth(device):.0f} GB/s")
    print("| precision | weights GB | peak GPU memory GB | decode tok/s | vs bf16 |")
    print("|---|---|---|---|---|")
    base = None
    for name in ("bf16", "int8", "int4"):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        eng = random_engine(c, name, device, dtype)
        weights = sum(t.numel() * t.element_size() for t in list(eng.model.parameters()) + list(eng.model.buffers()))
        prompt = list(range(100, 132))
        params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
        list(eng.generate(prompt, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)))  # warm up
        list(eng.generate([p + 1 for p in prompt], params))
        rate = eng.stats.decode_tokens_per_s
        peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan")
        base = base or rate
        print(f"| {name} | {weights / 1e9:.2f} | {peak:.2f} | {rate:.1f} | {rate / base:.2f}x |", flush=True)
        del eng


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=8, help="held-out windows for top-1 / KL / perplexity")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=1, help="prompts for greedy agreement")
    ap.add_argument("--tokens", type=int, default=256, help="greedy tokens per prompt")
    ap.add_argument("--gpu", action="store_true", help="V2-Lite shapes on CUDA: tok/s and memory")
    ap.add_argument("--layers", type=int, default=27, help="layers of the V2-Lite-shaped model (--gpu)")
    ap.add_argument("--smoke", action="store_true", help="toy sizes on the CPU, to check the script runs")
    args = ap.parse_args()
    # The smoke run takes each step once at toy sizes: one window, one quantized precision per model
    names = ("bf16", "int4") if args.smoke else tuple(PRECISIONS)
    if args.smoke:
        args.windows, args.seq, args.prompts, args.tokens, args.layers = 1, 16, 1, 4, 1
    torch.manual_seed(0)
    demo_tok = Engine.from_pretrained(DEMO, speculative="none").tokenizer
    windows = held_out_windows(demo_tok, args.windows, args.seq)
    prompts = [w[:16] for w in windows[: args.prompts]]
    quality_table("demo model (bundled, trained)", DEMO, windows, prompts, args.tokens, names)
    with tempfile.TemporaryDirectory() as tmp:
        path = v2_lite_like(Path(tmp), args.smoke)
        g = torch.Generator().manual_seed(1)
        rand = [torch.randint(2, 2048, (args.seq,), generator=g).tolist() for _ in range(args.windows)]
        quality_table("tiny V2-Lite-like model (random weights; perplexity is not meaningful)", path, rand,
                      [w[:16] for w in rand[: args.prompts]], args.tokens,
                      ("bf16", "int8") if args.smoke else ("bf16", "int8", "int4"))
    weight_table(v2_lite_config(27, smoke=False))
    if args.gpu or args.smoke:
        if args.smoke:
            kernel_table(torch.device("cpu"), smoke=True)
            gpu_table(torch.device("cpu"), args.layers, args.tokens, smoke=True)
        elif torch.cuda.is_available():
            kernel_table(torch.device("cuda"), smoke=False)
            gpu_table(torch.device("cuda"), args.layers, args.tokens, smoke=False)
        else:
            print("\n--gpu: no CUDA device here; the GPU figures are not measured")


if __name__ == "__main__":
    main()
