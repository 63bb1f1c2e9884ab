"""One rank of a tensor-parallel run (started by torchrun from test_tensor_parallel.py).

Every rank loads the same checkpoint and makes the same calls; rank 0 writes what the test compares with a
single-process engine: the plain-path logits, greedy tokens through the latent cache (drafting with MTP
or n-gram lookup), a second turn that reuses the cache, and each rank's tokens of an unseeded sampled
generation (which must agree across ranks)."""

import os
import sys

import torch
import torch.distributed as dist

from dschat.engine import Engine, SamplingParams

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_checkpoints as tc  # noqa: E402


def main(path: str, out: str, ids: list[int]):
    dist.init_process_group("gloo")
    eng = Engine.from_pretrained(path, device="cpu", dtype=torch.float32, fp8=os.environ.get("TP_TEST_FP8", "dequant"),
                                 quant=os.environ.get("TP_TEST_QUANT") or None, speculative=tc.drafter(path))
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
                    "sampled": everyone, "ranks": dist.get_world_size()}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], [int(t) for t in sys.argv[3].split(",")])
