"""Device operations, Triton launches and host syncs per decoded token, counted on the CPU as CUDA would run them.

    python benchmarks/count_launches.py            # the demo model and the V2-Lite structure (27 layers)
    python benchmarks/count_launches.py --json     # one JSON line: {"demo": {...}, "v2-lite": {...}}
    python benchmarks/count_launches.py --smoke    # V2-Lite cut to 3 layers (seconds)

On a GPU a batch-1 decode step is bound by how many kernels it launches (~5 us each), not by their work, so
this counts what a step launches without one. The engine runs on the CPU in float32 with its kernels
dispatched as on CUDA: the Triton MoE and MLA wrappers instead of the CPU's host loop and PyTorch reference.
Their Triton launches are counted and not run (a GPU would run them; Triton's interpreter takes minutes), so
what the step computes is not checked here, only what it launches: nothing in a greedy step depends on the
values for that. A TorchDispatchMode sees every ATen operation:
  * ops_per_token: device operations, aten_ops_per_token + triton_launches_per_token;
  * aten_ops_per_token: ATen operations that run a kernel (views and other metadata-only results that share
    their input's storage, and allocations, are left out; a conversion that copies counts);
  * triton_launches_per_token: Triton kernel launches (each counted once, not the operations inside it);
    triton_kernels: the same by kernel;
  * syncs_per_token: what makes the host wait for the device, or the device for the host: .item(),
    .tolist(), bool()/int() of a tensor, nonzero, unique, masked_select, bincount, repeat_interleave by a
    tensor, and a tensor made from host data (torch.tensor(list): a blocking host-to-device copy);
  * syncs_in_step: those inside the decode step itself (engine/static.py's step function, as a CUDA graph
    would hold it), not the host's read of each new token.
  * "mtp" (a V3 structure with its MTP module, 2 drafts a step): syncs_per_forward, the host syncs per
    forward pass of the main model (each verifies up to 2 drafts) with the drafting in between, and
    syncs_in_step. The drafts stay on the device: the host reads them with the verification's outcome.
Counts are per decoded token: generation of N + K tokens minus generation of N, divided by K (greedy, no
drafter), after a warm-up generation of N + K, so the prefill, the first token and what is made once (the
MoE kernels' counters, the rotary table grown) are not in them. The V2-Lite structure is DeepSeek-V2-Lite's
(27 layers, 1 dense first; 64 routed experts top-6, 2 shared; 16 heads) at toy widths: the counts do not
depend on the widths.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ["DSCHAT_TRITON_COMPILE_ONLY"] = "1"  # kernels/ defines its Triton kernels without a GPU
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ["DSCHAT_CPU_STEP"] = "0"  # the CPU-only lean step (engine/cpu_step.py) never runs on CUDA

import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

SYNC_OPS = {"item", "_local_scalar_dense", "is_nonzero", "nonzero", "_unique", "_unique2", "unique_dim",
            "unique_consecutive", "masked_select", "bincount", "lift_fresh"}
NO_KERNEL = {"empty", "empty_like", "empty_strided", "detach", "detach_", "resolve_conj", "resolve_neg",
             "lift_fresh_copy", "set_", "_has_compatible_shallow_copy_type", "sym_size", "sym_stride",
             "sym_numel", "sym_storage_offset", "is_same_size"}


def _storages(x) -> set[int]:
    out = set()
    for t in torch.utils._pytree.tree_leaves(x):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            out.add(t.untyped_storage().data_ptr())
    return out


class Counts(TorchDispatchMode):
    """Counts ATen operations while `on`; Triton launches and .tolist() come from the hooks below."""

    def __init__(self):
        super().__init__()
        self.on = False
        self.ops: collections.Counter = collections.Counter()
        self.syncs: collections.Counter = collections.Counter()
        self.step_syncs = 0  # syncs while the static step runs
        self.in_step = False
        self.launches: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.on:
            name = func.overloadpacket.__name__
            repeats_by_tensor = func in (torch.ops.aten.repeat_interleave.Tensor,
                                         torch.ops.aten.repeat_interleave.self_Tensor) and "output_size" not in kwargs
            if name in SYNC_OPS or repeats_by_tensor:
                self.syncs[name] += 1
                self.step_syncs += self.in_step
                if name not in ("item", "_local_scalar_dense", "is_nonzero", "lift_fresh"):
                    self.ops[name] += 1  # it runs a kernel as well
            elif name not in NO_KERNEL and not name.startswith("_assert"):
                if func.is_view or any(a.alias_info is not None and not a.alias_info.is_write
                                       for a in func._schema.returns):
                    if not (_storages(out) - _storages((args, kwargs))):
                        return out  # a view (or a conversion that copied nothing): no kernel
                self.ops[name] += 1
        return out


class HostReads(TorchFunctionMode):
    """.tolist() (which reads a device tensor's data on the host) never reaches ATen on the CPU."""

    def __init__(self, counts: Counts):
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.counts.on and func is torch.Tensor.tolist:
            self.counts.syncs["tolist"] += 1
            self.counts.step_syncs += self.counts.in_step
        return func(*args, **(kwargs or {}))


def count_triton_launches(counts: Counts):
    """Each Triton launch counted and skipped (nothing compiles, nothing runs)."""
    from triton.runtime.jit import JITFunction

    def run(self, *args, grid, warmup, **kwargs):
        if counts.on and not warmup:
            counts.launches[self.fn.__name__] += 1

    JITFunction.run = run


_FORCED: set[str] = set()  # dispatchers already replaced in the engine's modules


def force_cuda_dispatch():
    """The engine's modules call the kernels' dispatchers, which pick the CPU paths for CPU tensors: point
    those names at what the dispatchers pick on CUDA."""
    from dschat.kernels import fused_moe, mla_decode, norm_rope, router

    def moe_experts(x, w13, w2, ids, weights, shared=None):
        if ids.shape[0] <= fused_moe.GATHER_MAX_TOKENS:
            return fused_moe.moe_experts_triton(x, w13, w2, ids, weights, shared=shared or None)
        return fused_moe._grouped(x, w13, w2, ids, weights, shared or None)

    def fuses_shared(x, ids):
        return ids.shape[0] <= fused_moe.GATHER_MAX_TOKENS

    def mla(q_lat, q_pe, cache, slots, q_pos, scale):
        return mla_decode.mla_decode_triton(q_lat, q_pe, cache, slots, q_pos, scale)

    def mla_paged(q_lat, q_pe, cache, table_slots, q_pos, scale):
        return mla_decode.mla_decode_triton(q_lat, q_pe, cache, table_slots, q_pos, scale)

    def rms_norm(x, weight, eps):
        return norm_rope.add_rms_norm_triton(x, None, weight, eps)[1]

    swaps = {fused_moe.moe_experts: moe_experts, fused_moe.fuses_shared: fuses_shared, mla_decode.mla_decode: mla,
             mla_decode.mla_decode_paged: mla_paged,
             norm_rope.rms_norm: rms_norm, norm_rope.add_rms_norm: norm_rope.add_rms_norm_triton,
             norm_rope.rope_latent_write: norm_rope.rope_latent_write_triton, router.route: router.route_triton,
             norm_rope.silu_mul: norm_rope.silu_mul_triton}
    done = set(_FORCED)
    for name, module in list(sys.modules.items()):
        if not name.startswith("dschat.engine") or module is None:
            continue
        for attr, value in list(vars(module).items()):
            if callable(value) and value in swaps:
                setattr(module, attr, swaps[value])
                done.add(value.__name__)
    _FORCED.update(done)
    missing = {f.__name__ for f in swaps} - done
    if missing:
        raise SystemExit(f"count_launches: error: no engine module calls {', '.join(sorted(missing))} any more")


def v2_lite_structure(layers: int) -> dict:
    from dschat.dev import tiny_checkpoints as tc
    c = tc.v2_lite_config(512)
    c.update({"num_hidden_layers": layers, "first_k_dense_replace": 1, "n_routed_experts": 64,
              "num_experts_per_tok": 6, "n_shared_experts": 2, "num_attention_heads": 16,
              "num_key_value_heads": 16})
    return c


def measure(path, counts: Counts, n: int, extra: int) -> dict:
    from dschat.engine import Engine, SamplingParams
    eng = Engine.from_pretrained(path, device="cpu", dtype=torch.float32, speculative="none")
    force_cuda_dispatch()
    ids = [0, 5, 9, 17, 33, 65, 129]
    step = eng.static._fn

    def in_step(*args):  # the syncs inside the step, apart from the host's read of each token
        counts.in_step = True
        try:
            return step(*args)
        finally:
            counts.in_step = False

    eng.static._fn = in_step

    def run(tokens):
        eng.cache.clear()
        counts.ops.clear()
        counts.syncs.clear()
        counts.launches.clear()
        counts.step_syncs = 0
        with counts, HostReads(counts):  # only around generation: loading under them is slow
            counts.on = True
            try:
                out = list(eng.generate(ids, SamplingParams(max_tokens=tokens, ignore_eos=True),
                                        reuse_cache=False))
            finally:
                counts.on = False
        assert len(out) == tokens
        return sum(counts.ops.values()), sum(counts.launches.values()), sum(counts.syncs.values()), \
            counts.step_syncs, dict(counts.ops), dict(counts.syncs), dict(counts.launches)

    run(n + extra)  # a warm-up (as before a CUDA graph's capture): what is made once (the MoE kernels'
    # counters, the rotary table grown to the longest position) is made before either counted run
    short, long = run(n), run(n + extra)
    per = [(b - a) / extra for a, b in zip(short[:4], long[:4])]
    layers = eng.config.num_hidden_layers
    top = sorted(((k, (v - short[4].get(k, 0)) / extra) for k, v in long[4].items()), key=lambda kv: -kv[1])
    syncs = {k: (v - short[5].get(k, 0)) / extra for k, v in long[5].items() if v != short[5].get(k, 0)}
    return {"ops_per_token": per[0] + per[1], "aten_ops_per_token": per[0], "triton_launches_per_token": per[1],
            "syncs_per_token": per[2], "syncs_in_step": per[3],
            "layers": eng.config.num_hidden_layers, "moe_layers": sum(map(eng.config.is_moe_layer, range(layers))),
            "q_lora": eng.config.q_lora_rank is not None, "top_ops": dict(top[:8]), "syncs": syncs,
            "triton_kernels": {k: (v - short[6].get(k, 0)) / extra for k, v in long[6].items()}}


def measure_mtp(path, counts: Counts, n: int, extra: int) -> dict:
    """Host syncs per forward pass with MTP drafting (2 drafts a step). The skipped launches leave the logits
    arbitrary, so how many drafts are kept varies: counted per forward pass, not per token."""
    from dschat.engine import Engine, SamplingParams
    eng = Engine.from_pretrained(path, device="cpu", dtype=torch.float32, speculative="mtp", draft_tokens=2)
    force_cuda_dispatch()
    ids = [0, 5, 9, 17, 33, 65, 129]

    def wrap(fn):
        def in_step(*args):
            counts.in_step = True
            try:
                return fn(*args)
            finally:
                counts.in_step = False
        return in_step

    eng.static._fn, eng.static._mtp_fn = wrap(eng.static._fn), wrap(eng.static._mtp_fn)

    def run(tokens):
        eng.cache.clear()
        counts.syncs.clear()
        counts.step_syncs = 0
        with counts, HostReads(counts):
            counts.on = True
            try:
                gen = eng.generate(ids, SamplingParams(max_tokens=tokens, ignore_eos=True), reuse_cache=False)
                list(gen)
            finally:
                counts.on = False
        return sum(counts.syncs.values()), counts.step_syncs, gen.stats.forwards, dict(counts.syncs)

    short, long = run(n), run(n + extra)
    forwards = long[2] - short[2]
    return {"syncs_per_forward": (long[0] - short[0]) / forwards, "syncs_in_step": (long[1] - short[1]) / forwards,
            "forwards": forwards, "syncs": {k: (v - short[3].get(k, 0)) / forwards for k, v in long[3].items()}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="one JSON line keyed by model")
    ap.add_argument("--smoke", action="store_true", help="V2-Lite cut to 3 layers, fewer tokens")
    ap.add_argument("--layers", type=int, default=27, help="layers of the V2-Lite structure (27: V2-Lite's)")
    args = ap.parse_args(argv)
    layers = 3 if args.smoke else args.layers
    if layers < 2:
        sys.stderr.write("count_launches: error: --layers must be at least 2 (one dense, one MoE)\n")
        return 2
    n, extra = (2, 2) if args.smoke else (3, 4)
    torch.set_num_threads(1)
    counts = Counts()
    count_triton_launches(counts)
    from dschat.dev import tiny_checkpoints as tc
    from dschat.runtime import DEMO_DIR
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        results["demo"] = measure(DEMO_DIR, counts, n, extra)
        path = tc.write_checkpoint(Path(tmp) / "v2-lite", v2_lite_structure(layers), seed=0, shards=1)
        results["v2-lite"] = measure(path, counts, n, extra)
        path = tc.write_checkpoint(Path(tmp) / "v3", tc.v3_config(), seed=0, shards=1)
        results["mtp"] = measure_mtp(path, counts, n, 3 * extra)
    if args.json:
        print(json.dumps(results))
        return 0
    print("per decoded token, batch 1, greedy, dispatched as on CUDA")
    print(f"{'model':8} {'layers':>6} {'device ops':>11} {'ATen ops':>9} {'Triton launches':>16} {'host syncs':>11} "
          f"{'in the step':>12}")
    mtp = results.pop("mtp")
    for model, r in results.items():
        print(f"{model:8} {r['layers']:>6} {r['ops_per_token']:>11.1f} {r['aten_ops_per_token']:>9.1f} "
              f"{r['triton_launches_per_token']:>16.1f} {r['syncs_per_token']:>11.1f} {r['syncs_in_step']:>12.1f}")
    for model, r in results.items():
        print(f"{model}: most frequent ops {', '.join(f'{k} {v:g}' for k, v in r['top_ops'].items())}; "
              f"syncs {', '.join(f'{k} {v:g}' for k, v in r['syncs'].items()) or 'none'}")
    print(f"MTP, 2 drafts a step (V3 structure): {mtp['syncs_per_forward']:g} host syncs per forward pass "
          f"({', '.join(f'{k} {v:g}' for k, v in mtp['syncs'].items())}), {mtp['syncs_in_step']:g} in the steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
