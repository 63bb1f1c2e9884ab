"""The engine on one GPU against the physical limit and against transformers, in one run (issue 12).

    python benchmarks/bench_gpu.py            # on a CUDA GPU: prints a table, writes benchmarks/results/<gpu>-<date>.json
    python benchmarks/bench_gpu.py --smoke    # tiny shapes on the CPU, every step of the run (the tests run this)

1. Random weights with DeepSeek-V2-Lite's real shapes (27 layers, hidden 2048, 64 routed experts top-6 + 2
   shared, kv_lora 512, bf16), built on the device (no disk round trip).
2. Batch-1 greedy decode tok/s at 1K and 8K context: dschat vs transformers on the same weights (transformers
   shares the tensors), same tokens.
3. The roofline: bytes read per token (active weights + latent cache) / the bandwidth of a large
   device-to-device copy measured in this run -> `roofline_fraction`.
4. Verify cost: a forward pass over 1+K tokens / a 1-token pass (K = 1, 2, 3); the demo model's MTP tok/s
   vs plain.
5. A DeepSeek-V3-shaped slice (V3's real dims, FP8 128x128 blocks): decode time per layer, weights
   dequantised to bf16 vs `--fp8 keep`. Sized to fit 80 GB (or the device, if less) by an estimate it prints:
   `--fp8 keep` dequantises every expert a prefill pass chooses to float32, so the context is prefilled in
   the largest chunk whose estimated peak fits (a 1,024-token pass would need about 170 GB).
6. Prefill tok/s at 8K and 32K.
The JSON is written after every section, so a run that fails part-way keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from dschat.dev import reference
from dschat.dev import tiny_checkpoints as tc
from dschat.runtime import DEMO_DIR
from dschat.engine import Engine, ModelConfig, SamplingParams
from dschat.engine.cache import LatentCache
from dschat.engine.layers.linear import Linear
from dschat.engine.model import Transformer
from dschat.engine.moe import Experts

FULL = dict(contexts=[1024, 8192], prefill=[8192, 32768], tokens=64, demo_tokens=128, v3_layers=3, copy_gb=4.0,
            cache_gb=4.0)
SMOKE = dict(contexts=[32, 64], prefill=[64, 128], tokens=6, demo_tokens=8, v3_layers=2, copy_gb=0.01,
             cache_gb=0.05)


def v2_lite_shapes(smoke: bool) -> dict:
    c = tc.v2_lite_config(102400)
    c.update(hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27,
             num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512, qk_nope_head_dim=128,
             qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, num_experts_per_tok=6,
             n_shared_experts=2, max_position_embeddings=163840)
    if smoke:
        c.update(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                 num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32,
                 qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8)
    return c


def v3_slice_shapes(layers: int, smoke: bool) -> dict:
    c = tc.v3_fp8_config(129280)
    c.update(hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=layers,
             num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512,
             qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256,
             num_experts_per_tok=8, n_group=8, topk_group=4, first_k_dense_replace=1,
             num_nextn_predict_layers=0)
    if smoke:
        c.update(vocab_size=512, hidden_size=256, intermediate_size=256, moe_intermediate_size=128,
                 num_attention_heads=2, num_key_value_heads=2, q_lora_rank=128, kv_lora_rank=64,
                 qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, n_routed_experts=8,
                 num_experts_per_tok=2, n_group=2, topk_group=1)
    return c


# -- building models on the device ---------------------------------------------------------------------
@torch.no_grad()
def random_engine(config: dict, device: torch.device, dtype: torch.dtype, cache_gb: float,
                  fp8_keep: bool = False) -> Engine:
    """An Engine over random weights made where they run, in `dtype` from the start. fp8_keep: Linear
    weights and expert stacks in FP8 with 128x128 block scales, as `--fp8 keep` holds a V3 checkpoint."""
    cfg = ModelConfig.from_dict(config)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Transformer(cfg, with_mtp=False)
    finally:
        torch.set_default_dtype(default)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0, 0.02 if p.dim() < 3 else 1 / math.sqrt(p.shape[-1]))
    if fp8_keep:
        to_fp8(model)
    empty = Path(tempfile.mkdtemp())  # no generation_config, no tokenizer: ids only
    return Engine(model.eval(), cfg, empty, device, dtype, cache_gb=cache_gb, speculative="none")


def quantize(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., out, in] -> FP8 e4m3 and float32 scales [..., ceil(out/128), ceil(in/128)], on w's device."""
    *lead, o, i = w.shape
    po, pi = -o % block, -i % block
    padded = torch.nn.functional.pad(w.float(), (0, pi, 0, po))
    tiles = padded.unflatten(-2, (-1, block)).unflatten(-1, (-1, block))  # [..., bo, block, bi, block]
    scale = tiles.abs().amax(dim=(-3, -1)).clamp(min=1e-12) / 448.0
    q = (tiles / scale[..., :, None, :, None]).flatten(-4, -3).flatten(-2, -1)[..., :o, :i]
    return q.to(torch.float8_e4m3fn), scale


def quantize_each(stack: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize() expert by expert (a whole V3 stack in float32 would not fit beside the model)."""
    parts = [quantize(w) for w in stack]
    return torch.stack([q for q, _ in parts]), torch.stack([s for _, s in parts])


def to_fp8(model: Transformer):
    for name, m in model.named_modules():
        if isinstance(m, Linear) and not name.endswith(("kv_b_proj", "lm_head")):
            q, m.scale = quantize(m.weight)
            m.weight = torch.nn.Parameter(q, requires_grad=False)
        elif isinstance(m, Experts):
            inter = m.w2.shape[-1]
            (g, sg), (u, su) = quantize_each(m.w13[:, :inter]), quantize_each(m.w13[:, inter:])
            m.w13 = torch.nn.Parameter(torch.cat([g, u], dim=1), requires_grad=False)
            m.w13_scale = torch.cat([sg, su], dim=1)
            q, m.w2_scale = quantize_each(m.w2)
            m.w2 = torch.nn.Parameter(q, requires_grad=False)


def transformers_twin(eng: Engine, config: dict):
    """transformers' DeepseekV2ForCausalLM of this hub config over the engine's own tensors (assigned, not
    copied)."""
    return reference.twin(eng.model.state_dict(), config, eng.dtype, eng.device)


# -- measuring -----------------------------------------------------------------------------------------------
def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats=3) -> float:
    """Best wall time of `repeats` calls after one warm-up."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def prompt(n: int, vocab: int) -> list[int]:
    return torch.randint(2, vocab, (n,), generator=torch.Generator().manual_seed(n)).tolist()


def decode(eng: Engine, ctx: int, tokens: int) -> tuple[float, list[int]]:
    ids = prompt(ctx, eng.config.vocab_size)
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    rate, out = 0.0, []
    for i in range(3):
        eng.cache.clear()
        out = list(eng.generate(ids, params))
        rate = max(rate, eng.stats.decode_tokens_per_s) if i else rate
    return rate, out


def decode_transformers(ref, eng: Engine, ctx: int, tokens: int) -> tuple[float, list[int]]:
    x = torch.tensor([prompt(ctx, eng.config.vocab_size)], device=eng.device)
    with torch.no_grad():
        one = timed(lambda: ref.generate(x, max_new_tokens=1, do_sample=False, pad_token_id=0), eng.device, 1)
        out = []

        def run():
            out[:] = ref.generate(x, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                  pad_token_id=0)[0, ctx:].tolist()

        full = timed(run, eng.device, 1)
    return (tokens - 1) / max(full - one, 1e-9), out


def bandwidth(device: torch.device, gb: float) -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    src = torch.empty(int(gb * 2**30) // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 2 / timed(lambda: dst.copy_(src), device, 5)


def bytes_per_token(eng: Engine, ctx: int) -> int:
    """What one batch-1 decode step reads: every weight except the routed experts that are not chosen and
    the embedding table (one row), plus the latent cache of ctx tokens."""
    cfg, total = eng.config, 0
    for name, t in list(eng.model.named_parameters()) + list(eng.model.named_buffers()):
        size = t.numel() * t.element_size()
        if name.endswith(("experts.w13", "experts.w2", "w13_scale", "w2_scale")):
            size = size * cfg.num_experts_per_tok // cfg.n_routed_experts
        elif "embed_tokens" in name:
            size = t.shape[-1] * t.element_size()
        total += size
    return total + ctx * LatentCache.bytes_per_token(eng.model.n_cached_layers, cfg.latent_dim, eng.dtype)


def forward_time(eng: Engine, ctx: int, n: int, chunk: int | None = None) -> float:
    """Seconds for one cached forward pass of n new tokens after ctx cached ones (the verify shape); the
    context is prefilled `chunk` tokens a pass (default: the engine's prefill)."""
    ids = prompt(ctx + n, eng.config.vocab_size)
    seq = eng.cache.open([], limit=0)
    try:
        with torch.inference_mode():
            if chunk is None:
                eng._prefill(seq, ids[:ctx])
            else:
                for i in range(0, ctx, chunk):
                    eng._forward(seq, ids[i:min(i + chunk, ctx)])

            def step():
                eng._forward(seq, ids[ctx:])
                eng.cache.truncate(seq, ctx)

            return timed(step, eng.device, 5)
    finally:
        eng.cache.close(seq, insert=False)


def prefill_rate(eng: Engine, n: int) -> float:
    ids = prompt(n, eng.config.vocab_size)

    def run():
        eng.cache.clear()
        list(eng.generate(ids, SamplingParams(max_tokens=1, ignore_eos=True)))

    return n / timed(run, eng.device, 1)


def demo_mtp(device: torch.device, dtype: torch.dtype, tokens: int) -> dict:
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    rates, outs = {}, {}
    for spec in ("none", "mtp"):
        eng = Engine.from_pretrained(DEMO_DIR, device=device, dtype=dtype, speculative=spec)
        ids = [eng.tokenizer.bos_token_id] + eng.tokenizer.encode("import os\nimport sys\n\n\ndef main():\n    ")
        rates[spec] = 0.0
        for i in range(3):
            eng.cache.clear()
            outs[spec] = list(eng.generate(ids, params))
            rates[spec] = max(rates[spec], eng.stats.decode_tokens_per_s) if i else 0.0
    return {"demo_plain_tok_s": rates["none"], "demo_mtp_tok_s": rates["mtp"],
            "demo_mtp_vs_plain": rates["mtp"] / rates["none"], "demo_mtp_same_tokens": outs["mtp"] == outs["none"]}


# -- sizing the V3 slice to the device ------------------------------------------------------------------------
GIB = 2**30
MEMORY_BUDGET = 80e9  # an H100's 80 GB; less where the device has less (a tenth kept for the allocator)


def weight_bytes(config: dict, dtype: torch.dtype, fp8_keep: bool) -> tuple[int, int]:
    """(bytes the model's weights take, bytes of the largest routed-expert stack pair of one layer), from a
    model built on the meta device: what random_engine will hold."""
    cfg = ModelConfig.from_dict(config)
    with torch.device("meta"):
        model = Transformer(cfg, with_mtp=False)
    total, experts = 0, 0
    for name, p in model.named_parameters():
        n = p.numel()
        fp8 = fp8_keep and (p.dim() == 3 or (name.endswith(".weight") and p.dim() == 2
                                             and not name.endswith(("kv_b_proj.weight", "lm_head.weight",
                                                                    "embed_tokens.weight", "gate.weight"))))
        size = n * (1 if fp8 else torch.finfo(dtype).bits // 8)
        if fp8:  # float32 scales, one per 128x128 block
            size += 4 * math.ceil(p.shape[-2] / 128) * math.ceil(p.shape[-1] / 128) * (n // (p.shape[-2] * p.shape[-1]))
        if p.dim() == 3:
            experts = max(experts, n)
        total += size
    return total, experts


def fp8_keep_pass_bytes(config: dict, tokens: int) -> int:
    """Temporaries of one `--fp8 keep` MoE layer over `tokens` tokens at most (engine/moe.py's Experts):
    the chosen experts (at most E, at most tokens * k of them) gathered in FP8 (1 B a weight), dequantised to
    float32 (4 B) with float32 block scales spread over every weight while it runs (4 B, plus the float32
    copy it makes of the FP8: 4 B more, gate and up at a time: 2/3 of the weights), gate and up
    concatenated in float32 (2/3 x 4 B) and both stacks cast to the activations' dtype (2 B)."""
    E, k = config["n_routed_experts"], config["num_experts_per_tok"]
    per_expert = 3 * config["moe_intermediate_size"] * config["hidden_size"]
    used = min(E, tokens * k)
    return int(used * per_expert * (1 + 4 + 2 / 3 * 8 + 2 / 3 * 4 + 2))


def size_v3_section(config: dict, dtype: torch.dtype, cache_gb: float, budget: float, ctx: int) -> dict:
    """The largest prefill chunk (tokens a forward pass, a power of two up to ctx) whose estimated peak fits
    `budget` bytes in both kinds: weights + latent cache + one MoE layer's FP8 temporaries; and the peak of
    building the FP8 model (the bf16 model and the FP8 copy of its largest expert stacks)."""
    bf16_weights, experts = weight_bytes(config, dtype, False)
    fp8_weights, _ = weight_bytes(config, dtype, True)
    cache = cache_gb * GIB
    build = bf16_weights + experts * 1 + cache
    chunk, peak = None, None
    c = 1
    while c <= ctx:
        need = max(bf16_weights + cache, fp8_weights + cache + fp8_keep_pass_bytes(config, c), build)
        if need > budget:
            break
        chunk, peak = c, need
        c *= 2
    return {"bf16_weights_bytes": bf16_weights, "fp8_weights_bytes": fp8_weights, "cache_bytes": int(cache),
            "budget_bytes": int(budget), "prefill_chunk": chunk, "peak_bytes_estimate": peak,
            "fits": chunk is not None}


# -- the run -----------------------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def run(device: torch.device, dtype: torch.dtype, sizes: dict, smoke: bool, with_transformers: bool,
        save=lambda r: None) -> dict:
    """Every section's figures into one dict, which `save` writes after each section (a run that dies later
    keeps what it measured)."""
    r: dict = {"device": device_name(device),
               "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""), "smoke": smoke}
    try:
        import triton
        r["triton"] = triton.__version__
    except ImportError:
        r["triton"] = None
    r["copy_bytes_per_s"] = bw = bandwidth(device, sizes["copy_gb"])
    save(r)
    shapes = v2_lite_shapes(smoke)
    eng = random_engine(shapes, device, dtype, sizes["cache_gb"])
    ref = None
    if with_transformers:
        try:  # one GPU run measures everything: a transformers failure is recorded, not fatal
            ref = transformers_twin(eng, shapes)
        except Exception as e:  # noqa: BLE001
            r["transformers_error"] = f"{type(e).__name__}: {e}"
    for ctx in sizes["contexts"]:
        rate, ours = decode(eng, ctx, sizes["tokens"])
        row = {"dschat_tok_s": rate, "bytes_per_token": bytes_per_token(eng, ctx)}
        row["roofline_tok_s"] = bw / row["bytes_per_token"]
        row["roofline_fraction"] = rate / row["roofline_tok_s"]
        if ref is not None:
            theirs_rate, theirs = decode_transformers(ref, eng, ctx, sizes["tokens"])
            row.update(transformers_tok_s=theirs_rate, vs_transformers=rate / theirs_rate, same_tokens=ours == theirs)
        r[f"v2_lite_decode_{ctx}"] = row
        save(r)
    first = r[f"v2_lite_decode_{sizes['contexts'][0]}"]
    r["roofline_fraction"] = first["roofline_fraction"]
    r["vs_transformers"] = first.get("vs_transformers")
    one = forward_time(eng, sizes["contexts"][0], 1)
    r["verify_cost"] = {f"1+{k}": forward_time(eng, sizes["contexts"][0], 1 + k) / one for k in (1, 2, 3)}
    save(r)
    r["prefill_tok_s"] = {str(n): prefill_rate(eng, n) for n in sizes["prefill"]}
    save(r)
    del eng, ref
    r.update(demo_mtp(device, dtype, sizes["demo_tokens"]))
    save(r)
    v3_shapes = v3_slice_shapes(sizes["v3_layers"], smoke)
    budget = MEMORY_BUDGET
    if device.type == "cuda":
        budget = min(budget, torch.cuda.get_device_properties(device).total_memory)
    ctx = sizes["contexts"][0]
    r["v3_sizing"] = plan = size_v3_section(v3_shapes, dtype, sizes["cache_gb"], 0.9 * budget, ctx)
    print(f"V3 slice ({sizes['v3_layers']} layers): weights bf16 {plan['bf16_weights_bytes'] / GIB:.1f} GiB, "
          f"fp8 {plan['fp8_weights_bytes'] / GIB:.1f} GiB, cache {plan['cache_bytes'] / GIB:.1f} GiB; "
          + (f"a {ctx}-token context prefilled {plan['prefill_chunk']} tokens a pass: estimated peak "
             f"{plan['peak_bytes_estimate'] / GIB:.1f} GiB of {plan['budget_bytes'] / GIB:.1f} GiB"
             if plan["fits"] else f"does not fit {plan['budget_bytes'] / GIB:.1f} GiB: skipped"), flush=True)
    save(r)
    if plan["fits"]:
        per_layer = {}
        for kind in ("bf16", "fp8_keep"):
            v3 = random_engine(v3_shapes, device, dtype, sizes["cache_gb"], fp8_keep=kind == "fp8_keep")
            per_layer[kind] = forward_time(v3, ctx, 1, chunk=plan["prefill_chunk"]) / sizes["v3_layers"]
            del v3
            if device.type == "cuda":
                r.setdefault("v3_peak_bytes", {})[kind] = torch.cuda.max_memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
        r["v3_slice_layer_s"] = per_layer
        r["v3_fp8_vs_bf16"] = per_layer["fp8_keep"] / per_layer["bf16"]
        save(r)
    return r


def show(r: dict):
    print(f"{r['device']}  torch {r['torch']}  triton {r['triton']}  {r['dtype']}  "
          f"copy {r['copy_bytes_per_s'] / 1e9:.0f} GB/s")
    for key, row in r.items():
        if key.startswith("v2_lite_decode_"):
            theirs = f"  transformers {row['transformers_tok_s']:.1f} ({row['vs_transformers']:.1f}x, same tokens " \
                     f"{row['same_tokens']})" if "transformers_tok_s" in row else ""
            print(f"V2-Lite decode at {key.rsplit('_', 1)[1]:>5}: {row['dschat_tok_s']:8.1f} tok/s = "
                  f"{row['roofline_fraction']:.0%} of the roofline ({row['roofline_tok_s']:.0f}){theirs}")
    if "transformers_error" in r:
        print(f"transformers: not compared ({r['transformers_error']})")
    print("verify 1+K / 1: " + "  ".join(f"{k} {v:.2f}x" for k, v in r["verify_cost"].items()))
    print("prefill: " + "  ".join(f"{n} {v:.0f} tok/s" for n, v in r["prefill_tok_s"].items()))
    print(f"demo MTP {r['demo_mtp_tok_s']:.1f} vs plain {r['demo_plain_tok_s']:.1f} tok/s "
          f"({r['demo_mtp_vs_plain']:.2f}x, same tokens {r['demo_mtp_same_tokens']})")
    if "v3_slice_layer_s" not in r:
        return
    s = r["v3_slice_layer_s"]
    print(f"V3 slice per layer: bf16 {s['bf16'] * 1e3:.2f} ms, fp8 keep {s['fp8_keep'] * 1e3:.2f} ms "
          f"({r['v3_fp8_vs_bf16']:.2f}x)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (no GPU needed)")
    ap.add_argument("--no-transformers", action="store_true", help="skip the transformers comparison")
    ap.add_argument("--out", type=Path, default=None, help="the JSON file (default benchmarks/results/<gpu>-<date>.json)")
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        sys.stderr.write("bench_gpu: no CUDA GPU here (run with --smoke to exercise it on the CPU)\n")
        return 2
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    out = args.out or ROOT / "benchmarks" / "results" / (
        f"{device_name(device).replace(' ', '-').lower()}-{date.today().isoformat()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(r: dict):
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(r, indent=2) + "\n")
        tmp.replace(out)

    r = run(device, dtype, SMOKE if args.smoke else FULL, args.smoke, not args.no_transformers, save)
    show(r)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
