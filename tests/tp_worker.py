"""The ranks of a tensor-parallel run (started by torchrun from test_tensor_parallel.py and test_quant.py).

    tp_worker.py IDS CASES_JSON      IDS "1,2,3"; CASES_JSON [{"path", "out", "fp8", "quant", "kernel_rows"}, ...]

("kernel_rows": kernels/quant_cpu.py's CPU_KERNEL_MAX_ROWS for the case; "0" runs the quantized weights
dequantised, float32-exact, so that sharding is compared without bfloat16 activations.)

Every rank loads each case's checkpoint in turn and makes the same calls; rank 0 writes to the case's `out`
what the test compares with a single-process engine: the plain-path logits, greedy tokens through the
latent cache (drafting with MTP or n-gram lookup), a second turn that reuses the cache, and each rank's
tokens of an unseeded sampled generation (which must agree across ranks). Several cases share one
launch: starting torchrun and its ranks costs more than a case."""

import json
import sys

import torch
import torch.distributed as dist

from dschat.dev import tiny_checkpoints as tc
from dschat.engine import Engine, SamplingParams


def run_case(case: dict, ids: list[int]):
    path = case["path"]
    if "kernel_rows" in case:
        from dschat.kernels import quant_cpu
        quant_cpu.CPU_KERNEL_MAX_ROWS = int(case["kernel_rows"])
    eng = Engine.from_pretrained(path, device="cpu", dtype=torch.float32, fp8=case.get("fp8", "dequant"),
                                 quant=case.get("quant") or None, speculative=tc.drafter(path))
    logits = eng.logits(ids)
    greedy = list(eng.generate(ids, SamplingParams(max_tokens=10)))
    follow = ids + greedy + [7, 8, 9]
    second = list(eng.generate(follow, SamplingParams(max_tokens=6)))
    cached = eng.stats.cached_tokens
    sampled = list(eng.generate(ids, SamplingParams(temperature=1.0, max_tokens=10)))
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sampled)
    if dist.get_rank() == 0:
        torch.save({"logits": logits, "greedy": greedy, "second": second, "cached": cached,
                    "sampled": everyone, "ranks": dist.get_world_size()}, case["out"])


def main(ids: list[int], cases: list[dict]):
    dist.init_process_group("gloo")
    for case in cases:
        run_case(case, ids)
    dist.destroy_process_group()


if __name__ == "__main__":
    main([int(t) for t in sys.argv[1].split(",")], json.loads(sys.argv[2]))
