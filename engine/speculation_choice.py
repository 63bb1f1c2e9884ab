"""Speculation where it pays, by measurement: what `speculative="auto"` (the default) picks on the CPU.

A drafted step checks 1+K tokens in one forward pass of the main model. It pays when the tokens that pass
yields (the token, plus the drafts kept) outnumber what it costs in plain steps. On a GPU the pass costs
about one token's (a step is launch- and latency-bound), so MTP, or n-gram lookup without MTP weights, is
the rule there. On a CPU it depends on the model: a bandwidth-bound MoE model reads the union of the
experts the 1+K tokens choose (V2-Lite shapes in int4: a 1+2 pass costs 2.3 plain steps), an overhead-bound
small one pays per op per token (the demo model: 1.45), so the engine measures it for the model it loaded:

* cost: a plain step, a 1+K verify step and, for MTP, one drafting step, timed on a scratch sequence after a
  short context, interleaved, the median of ROUNDS after a warm-up (`measure_cost`);
* acceptance: for MTP, the share of positions of a fixed code text where the module's draft equals the main
  model's own next argmax there (what greedy verification keeps; teacher-forced, so it reads the text, not the
  model's own reply: `mtp_acceptance`). For n-gram lookup acceptance is a property of the prompt (an edit
  that copies its input accepts long runs, a fresh answer proposes little), not of the model: NGRAM_ACCEPT
  is assumed, for the prompts lookup serves (code edits) — a step without a match costs a plain step anyway;
* decision: speculate when tokens per pass / relative cost >= MARGIN (`pays`), with per-draft acceptance a
  giving 1 + a + a^2 + ... + a^K tokens per pass.

The decision and its figures are kept in the cache directory (speculation.json), keyed by the checkpoint
(config.json's content, each shard's name, size and modification time), quantization, dtype, threads and
the CPU's model name, so a later start of the same setup measures nothing. `Engine.load_stats` reports them
(`speculative`, `verify_cost`, `draft_cost`, `draft_acceptance`, `speculation_probe_s`).
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from pathlib import Path

import torch

from . import files

MARGIN = 1.1  # a pass must yield 10% more tokens than it costs: timings on a busy machine wander that much
NGRAM_ACCEPT = 0.6  # assumed per-draft acceptance of a lookup match (prompt-lookup decoding on code edits)
ROUNDS = 3
CONTEXT = 32  # tokens cached before the timed steps
CACHE_FILE = "speculation.json"
VERSION = 2  # 2: the CPU kernel's verify rows got faster (1+4 rows: 4.3 -> 3.1 plain steps, V2-Lite int4)

# teacher-forced MTP acceptance is read over this text (code: what dschat's users mostly ask about)
SAMPLE_TEXT = '''def merge_intervals(intervals):
    """Merge overlapping [start, end] intervals; return them sorted by start."""
    intervals = sorted(intervals, key=lambda iv: iv[0])
    merged = []
    for start, end in intervals:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


class LRUCache:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self.items = {}

    def get(self, key):
        if key not in self.items:
            return None
        value = self.items.pop(key)
        self.items[key] = value
        return value
'''


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens a pass over a token and k drafts yields when each draft is kept with probability `acceptance`
    given the ones before it were: 1 + a + ... + a^k."""
    return sum(acceptance ** i for i in range(k + 1))


def pays(acceptance: float, k: int, verify_cost: float, draft_cost: float = 0.0) -> bool:
    """verify_cost: a 1+k pass over a plain step's time; draft_cost: one drafting step over it (MTP)."""
    return expected_tokens(acceptance, k) >= MARGIN * (verify_cost + k * draft_cost)


def cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dschat" / CACHE_FILE


def cpu_name() -> str:
    try:
        for line in files.read_text("/proc/cpuinfo", 16 * 2**20).splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine


def setup_key(path: Path, kind: str, k: int, quant: str | None, dtype: torch.dtype, threads: int,
              device: torch.device) -> str:
    """What a measurement holds for: the checkpoint (config.json's bytes, each shard's name, size and
    modification time), the drafter, quantization, dtype, threads and processor."""
    h = hashlib.sha256()
    h.update(files.read_bytes(path / "config.json"))
    for f in sorted(path.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(f"{VERSION}|{kind}|{k}|{quant}|{dtype}|{threads}|{device.type}|{cpu_name()}".encode())
    return h.hexdigest()[:24]


def remembered(key: str) -> dict | None:
    try:
        data = json.loads(files.read_text(cache_file()))
    except (OSError, ValueError):
        return None
    entry = data.get(key) if isinstance(data, dict) else None
    return entry if isinstance(entry, dict) and isinstance(entry.get("speculative"), str) else None


def remember(key: str, entry: dict):
    """Add entry under key, atomically; a cache that cannot be written only means measuring again."""
    f = cache_file()
    try:
        data = json.loads(files.read_text(f))
        data = data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        data = {}
    data[key] = entry
    files.write_json_quietly(f, data)


@torch.inference_mode()
def measure_cost(engine, k: int, mtp: bool) -> tuple[float, float]:
    """(a 1+k verify step / a plain step, one MTP drafting step / a plain step (0 without mtp)), timed
    through the engine's decode step on a scratch sequence, interleaved, medians of ROUNDS after a warm-up."""
    static = engine.static
    seq = engine.cache.open([], limit=0)
    try:
        engine._forward(seq, [(7 * i) % engine.config.vocab_size for i in range(1, CONTEXT + 1)])
        base = len(seq.ids)
        if static is not None:
            static.bind(seq)
        times: dict[str, list[float]] = {"one": [], "verify": [], "draft": []}
        h = torch.zeros(1, engine.config.hidden_size, device=engine.device, dtype=engine.dtype)

        def run(tokens: list[int]):
            if static is not None:
                static.run(seq, tokens)
            else:
                engine.model.head(engine._forward(seq, tokens))
            engine.cache.truncate(seq, base)
            if static is not None:
                static.set_length(base)

        for r in range(ROUNDS + 1):  # round 0 warms up
            for what in ("one", "verify", "draft") if mtp else ("one", "verify"):
                if engine.device.type == "cuda":
                    torch.cuda.synchronize(engine.device)
                t0 = time.perf_counter()
                if what == "draft":
                    engine._mtp(seq, base - 1, h, [1])
                else:
                    run([1] * (1 if what == "one" else k + 1))
                if engine.device.type == "cuda":
                    torch.cuda.synchronize(engine.device)
                if r:
                    times[what].append(time.perf_counter() - t0)
    finally:
        engine.cache.close(seq, insert=False)
    one = statistics.median(times["one"])
    return (statistics.median(times["verify"]) / one,
            statistics.median(times["draft"]) / one if mtp else 0.0)


@torch.inference_mode()
def mtp_acceptance(engine) -> float:
    """Teacher-forced over SAMPLE_TEXT: the share of positions i where the MTP module, fed the main model's
    state at i and the text's token i+1, drafts the main model's own argmax at i+1."""
    try:
        ids = engine.tokenizer.tk.encode(SAMPLE_TEXT, add_special_tokens=False).ids
    except Exception:  # no usable tokenizer: any ids will do for a random-weight checkpoint
        ids = []
    ids = [i for i in ids if 0 <= i < engine.config.vocab_size][:128]
    if len(ids) < 8:
        ids = [(11 * i) % engine.config.vocab_size for i in range(1, 65)]
    seq = engine.cache.open([], limit=0)
    try:
        h = engine._forward(seq, ids)
        main = engine.model.head(h).argmax(-1)  # main[i]: the model's next token after position i
        _, logits = engine._mtp(seq, 0, engine.model.model.norm(h[:-1]), ids[1:])
        drafts = logits.argmax(-1)  # drafts[i]: the module's guess for position i+2, i.e. main[i+1]
    finally:
        engine.cache.close(seq, insert=False)
    return float((drafts == main[1:]).float().mean())


def choose(engine, kind: str, k: int) -> tuple[str, dict]:
    """("mtp" / "ngram" / "none", the figures) for `kind`, the drafter this checkpoint can use, with k drafts.
    A setup measured before is not measured again."""
    key = setup_key(engine.path, kind, k, engine.quant, engine.dtype, torch.get_num_threads(), engine.device)
    entry = remembered(key)
    if entry is not None:
        return entry["speculative"], dict(entry, speculation_probe_s=0.0)
    t0 = time.perf_counter()
    mtp = kind == "mtp"
    verify_cost, draft_cost = measure_cost(engine, k, mtp)
    acceptance = mtp_acceptance(engine) if mtp else NGRAM_ACCEPT
    choice = kind if pays(acceptance, k, verify_cost, draft_cost) else "none"
    entry = {"speculative": choice, "candidate": kind, "draft_tokens": k, "verify_cost": round(verify_cost, 3),
             "draft_cost": round(draft_cost, 3), "draft_acceptance": round(acceptance, 3),
             "acceptance_measured": mtp}
    remember(key, entry)
    return choice, dict(entry, speculation_probe_s=round(time.perf_counter() - t0, 3))
