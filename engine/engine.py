"""The engine's public face: load a checkpoint, compute logits, stream generated tokens."""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Iterator

import torch

from .cache import LatentCache, Sequence
from .config import ModelConfig
from .errors import ContextLengthError, ModelError
from . import dist, persist
from .hub import resolve
from .loader import Progress, load_model
from .memory import load_peak_bytes, load_started, memory_report
from .mla import ABSORB_MAX_TOKENS
from .model import Transformer
from .step import Step
from .static import CompileWarning, StaticDecoder, TokenReader, choose_mode
from .quant import bytes_per_token
from .quant import saved_spec as saved_quant_spec
from .threads import choose_threads
from .quant import spec as quant_spec
from .sampling import Sampler, SamplingParams
from .generation import Generation
from .speculative import MTPDrafter, NgramDrafter, NoDrafter, verify, verify_on_device
from .stats import GenerationStats
from . import files

PREFILL_CHUNK = 1024
PAGE_SIZE = 64
SPECULATIVE = ("auto", "mtp", "ngram", "none")


def _parse_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r} (use float32, bfloat16 or float16)")
    return names[dtype]


def default_speculative(cfg: ModelConfig, device: torch.device) -> str:
    """The drafter `speculative="auto"` tries: MTP where the checkpoint has the module, n-gram lookup otherwise.
    On a GPU a forward pass over 1+K tokens costs about what one token does, so it drafts; on the CPU
    Engine.from_pretrained measures whether it pays for the loaded model (engine/speculation_choice.py)."""
    return "mtp" if cfg.num_nextn_predict_layers else "ngram"


class Engine:
    """One checkpoint loaded for inference (`from_pretrained`): its model, config, tokenizer and latent cache.
    `generate` streams a reply's token ids as a Generation, reusing the cache's longest prefix of the prompt;
    `logits` and `decode_logits` are the plain and cached paths for checking one against the other;
    `save_prefix` / `load_prefix` keep cached prefixes on disk between processes."""

    def __init__(self, model: Transformer, cfg: ModelConfig, path: Path, device: torch.device,
                 dtype: torch.dtype, cache_gb: float | None = None, speculative: str = "none",
                 draft_tokens: int = 1, quant: str | None = None, compile: str = "off"):
        self.model, self.config, self.path = model, cfg, path
        self.quant = quant  # "int8" / "int4" when the weights run packed
        self.load_stats: dict = {}  # weight_bytes, load_peak_host_bytes, load_peak_ratio, peak_host_bytes, ...
        self.device, self.dtype = device, dtype
        self.speculative, self.draft_tokens = speculative, draft_tokens
        self.stats: GenerationStats | None = None  # the last generation's (each Generation carries its own)
        self.generation_config = _read_json(path / "generation_config.json")
        eos = cfg.eos_token_id if cfg.eos_token_id is not None else self.generation_config.get("eos_token_id")
        self.eos_token_ids = tuple(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.cache = self._make_cache(cache_gb)
        self._tokenizer = None
        # the decode step over fixed buffers (engine/static.py), eager, compiled or CUDA graphs by `compile`;
        # None: the plain path decodes
        mode = choose_mode(compile, device, dist.world_size())
        shapes = (1,) if speculative == "none" else tuple(range(1, draft_tokens + 2))
        try:
            self.static: StaticDecoder | None = StaticDecoder(model, self.cache, device,
                                                              cfg.max_position_embeddings, mode, shapes=shapes)
        except Exception as e:  # a compiler or a capture that fails: the same step, run as it is
            if mode == "eager":
                raise
            warnings.warn(f"the decode step could not be {'compiled' if mode == 'compiled' else 'captured'} "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): it runs without",
                          CompileWarning, stacklevel=2)
            self.cache.clear()
            self.static = StaticDecoder(model, self.cache, device, cfg.max_position_embeddings, "eager")
        # queue the next step before reading a token (CUDA: the read overlaps it; an end is seen a step late)
        self.pipeline = device.type == "cuda"

    # -- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype | str | None = None, cache_gb: float | None = None,
                        speculative: str | None = None, draft_tokens: int | None = None,
                        progress: Progress | None = None, fp8: str = "dequant",
                        quant: str | None = None, threads: int | None = None,
                        compile: str = "auto") -> "Engine":
        """Load a checkpoint. speculative: "mtp" (V3's draft module), "ngram" (prompt lookup), "none", or "auto"
        (the default): MTP where the checkpoint has it, else n-gram lookup, on a GPU; on the CPU that drafter
        only where it pays for this model, by measurement at load (engine/speculation_choice.py: the verify
        cost and, for MTP, its acceptance; remembered in the cache directory; reported in load_stats
        ["speculative"], ["verify_cost"], ...; several ranks: none). draft_tokens: tokens proposed per
        step (default 1 for MTP, 4 for n-gram). fp8: "dequant" (FP8 block weights become `dtype` on load)
        or "keep" (they stay FP8 in memory, half of bf16, and are dequantised as each layer runs).
        quant: "int8" or "int4" weights (see engine/quant.py), quantized as they load; a directory written
        by `dschat quantize` loads packed without asking. threads: CPU threads (default: engine/threads.py
        chooses from the bytes read per token and the cores free; reported in load_stats["threads"]).
        compile: "auto", "on" or "off", how the decode step runs (engine/static.py): on the CPU "on" compiles it
        with inductor (a C++ compiler needed; compiled code cached under dschat's cache directory), "auto" and
        "off" run it eagerly; on CUDA "auto" and "on" capture it in CUDA graphs at load. Reported in
        load_stats["decode_step"] and, for the time it took, load_stats["compile_s"]."""
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError("threads must be a whole number >= 1")
        if fp8 not in ("dequant", "keep"):
            raise ValueError('fp8 must be "dequant" or "keep"')
        qspec = quant_spec(quant)
        if qspec is not None and fp8 == "keep":
            raise ValueError('`quant` and `fp8="keep"` do not combine: the FP8 weights are dequantised, then '
                             'quantized (leave `fp8="dequant"`)')
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ModelError('`device="cuda"` asked for, but PyTorch sees no CUDA GPU here')
        if device.type == "cuda" and device.index is None and dist.world_size() > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", dist.rank())))  # one GPU per rank
            torch.cuda.set_device(device)
        dtype = _parse_dtype(dtype, device)
        root = resolve(path_or_repo_id)
        cfg = ModelConfig.from_file(root / "config.json")
        if cfg.weight_quant is not None:
            saved = saved_quant_spec(cfg.weight_quant, root / "config.json")
            if qspec is not None and qspec.bits != saved.bits:
                raise ModelError(f"{root}: already quantized to {saved.name}; it cannot load as {qspec.name}")
            qspec = saved
        auto = speculative is None or speculative == "auto"
        if auto:
            speculative = default_speculative(cfg, device)
        if speculative not in SPECULATIVE:
            raise ValueError(f"speculative must be one of {', '.join(SPECULATIVE)}")
        if speculative == "mtp" and not cfg.num_nextn_predict_layers:
            raise ModelError(f"{root}: this model has no MTP layer (num_nextn_predict_layers is 0); "
                             'use `speculative="ngram"` or `speculative="none"`')
        if draft_tokens is None:
            draft_tokens = 4 if speculative == "ngram" else 1
        if draft_tokens < 1:
            raise ValueError("draft_tokens must be >= 1")
        if compile not in ("auto", "on", "off"):
            raise ValueError('compile must be "auto", "on" or "off"')
        mark = load_started()
        model = load_model(root, cfg, device, dtype, with_mtp=speculative == "mtp", progress=progress, fp8=fp8,
                           quantize=qspec)
        load_peak = load_peak_bytes(mark)
        if device.type == "cpu":  # before the decode step compiles: its code is built for these threads
            torch.set_num_threads(choose_threads(bytes_per_token(model), threads))
        eng = cls(model, cfg, root, device, dtype, cache_gb, speculative, draft_tokens,
                  qspec.name if qspec else None, compile)
        eng.load_stats = memory_report(model, device, load_peak)
        if auto and device.type != "cuda":
            eng.load_stats.update(eng._choose_speculation())
        eng.load_stats["speculative"] = eng.speculative
        eng.load_stats["bytes_per_token"] = bytes_per_token(model)
        eng.load_stats["threads"] = torch.get_num_threads()
        eng.load_stats["huge_page_bytes"] = getattr(model, "huge_page_bytes", 0)  # engine/hugepages.py
        eng.load_stats["decode_step"] = eng.static.mode if eng.static is not None else "plain"
        eng.load_stats["compile_s"] = round(eng.static.prepare_s, 3) if eng.static is not None else 0.0
        if eng.static is not None and eng.static.mode == "cuda-graph":
            eng.load_stats["graph_bytes"] = eng.static.graph_bytes
        return eng

    def _choose_speculation(self) -> dict:
        """speculative="auto" off a GPU: keep the drafter only where it pays here, by measurement."""
        if dist.world_size() > 1:  # ranks timing apart could choose apart, and then wait on each other
            self.speculative = "none"
            return {}
        from .speculation_choice import choose

        try:
            choice, figures = choose(self, self.speculative, self.draft_tokens)
        except Exception as e:  # a probe that fails must not fail the load: plain decoding is always right
            warnings.warn(f"could not measure whether speculation pays ({type(e).__name__}: {e}); decoding "
                          "without it", RuntimeWarning, stacklevel=3)
            choice, figures = "none", {}
        self.speculative = choice
        return figures

    def _make_cache(self, cache_gb: float | None) -> LatentCache:
        n_layers = self.model.n_cached_layers
        per_token = LatentCache.bytes_per_token(n_layers, self.config.latent_dim, self.dtype)
        useful = 4 * self.config.max_position_embeddings * per_token  # never more than a few full contexts
        if cache_gb is not None:
            budget = int(cache_gb * 2**30)
        elif self.device.type == "cuda":
            budget = min(int(0.8 * torch.cuda.mem_get_info(self.device)[0]), useful)
        else:
            budget = min(2 * 2**30, useful)  # host pages are committed only when written
        num_pages = max(2, budget // (per_token * PAGE_SIZE))
        return LatentCache(n_layers, self.config.latent_dim, num_pages, PAGE_SIZE, self.device, self.dtype)

    @property
    def tokenizer(self):
        """The checkpoint's tokenizer (tokenizer.json + tokenizer_config.json)."""
        if self._tokenizer is None:
            from .tokenizer import Tokenizer

            self._tokenizer = Tokenizer.from_dir(self.path)
        return self._tokenizer

    @property
    def context_length(self) -> int:
        return self.config.max_position_embeddings

    @property
    def fingerprint(self) -> str:
        """Identifies these weights: a hash of config.json, the tensor index and each shard's whole content
        (its safetensors header and every tensor), so that another model of the same shapes never shares a
        saved prefix or a replay's token ids. A shard is read once; its SHA-256 is remembered in the cache
        directory by device, inode, size and times (engine/files.py), so later runs only stat it."""
        if not hasattr(self, "_fingerprint"):
            h = hashlib.sha256()
            jsons = [self.path / "config.json", *sorted(self.path.glob("*.safetensors.index.json"))]
            shards = sorted(self.path.glob("*.safetensors"))
            hashes = files.sha256_of(shards, persist.default_dir().parent / files.HASHES_FILE)
            for f in jsons + shards:
                h.update(f.name.encode())
                h.update(files.read_bytes(f) if f.suffix == ".json" else hashes[f].encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    # -- persisted prefixes --------------------------------------------------------------------------------
    @property
    def prefix_key(self) -> str:
        """What a prefix saved on disk is keyed by: these weights (quantized or not), the latent rows' shape and
        dtype; a file saved under another key is not this cache's."""
        weights = self.fingerprint + (f"-{self.quant}" if self.quant else "")
        return f"{weights}-{self.model.n_cached_layers}x{self.config.latent_dim}-{self.dtype}"

    def save_prefix(self, ids: list[int], directory: str | os.PathLike | None = None, cap_gb: float = 4.0,
                    secret_file: str | os.PathLike | None = None) -> int:
        """Write the latent rows of the cached part of `ids` to disk, keyed by `ids` (see engine/persist.py),
        with a checksum keyed by the secret in `secret_file` (made on first use; by default
        $XDG_DATA_HOME/dschat/cache.key). Returns the number of tokens written (0, with a CacheWarning,
        where the directory cannot be written)."""
        return persist.save_prefix(self.cache, self.prefix_key, ids, Path(directory) if directory else None,
                                   int(cap_gb * 2**30), Path(secret_file) if secret_file else None)

    def load_prefix(self, ids: list[int], directory: str | os.PathLike | None = None,
                    secret_file: str | os.PathLike | None = None) -> int:
        """Put the rows saved under exactly `ids` back into the cache. Returns the number of tokens restored
        (0 when there is no usable file; a stale, corrupt or altered one gives a CacheWarning)."""
        return persist.load_prefix(self.cache, self.prefix_key, ids, Path(directory) if directory else None,
                                   Path(secret_file) if secret_file else None)

    # -- plain path -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, ids: list[int]) -> torch.Tensor:
        """Logits for every position of ids, [len(ids), vocab] float32, by plain full recomputation
        (materialised attention, no cache touched)."""
        t = self._ids_tensor(ids)
        h = self.model(t[None], torch.arange(len(ids), device=self.device))
        return self.model.head(h)[0]

    @torch.inference_mode()
    def decode_logits(self, ids: list[int], chunk: int = 1) -> torch.Tensor:
        """The same logits as `logits(ids)`, computed the way generation does: through a fresh latent-cache
        sequence, `chunk` tokens per forward pass (absorbed attention for chunks up to 128 tokens).
        For checking the optimised path against the plain one; nothing is left in the cache."""
        self._ids_tensor(ids)
        seq = self.cache.open([], limit=0)
        try:
            out = [self.model.head(self._forward(seq, ids[i:i + chunk])) for i in range(0, len(ids), chunk)]
        finally:
            self.cache.close(seq, insert=False)
        return torch.cat(out)

    def _ids_tensor(self, ids) -> torch.Tensor:
        ids = list(ids)
        if not ids:
            raise ValueError("ids is empty")
        vocab = self.config.vocab_size
        bad = [i for i in ids if not 0 <= int(i) < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (size {vocab})")
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    # -- cached path ---------------------------------------------------------------------------------------------
    def _step(self, seq: Sequence, start: int, n: int) -> Step:
        """Positions start..start+n-1 of seq, with room reserved in its pages."""
        self.cache.reserve(seq, start + n)
        return Step(positions=torch.arange(start, start + n, device=self.device),
                    slots=self.cache.slots(seq, start + n), cache=self.cache.layers,
                    absorb=n <= ABSORB_MAX_TOKENS)

    def _forward(self, seq: Sequence, new: list[int]) -> torch.Tensor:
        """Run new tokens after seq's cached ones; returns their final hidden states [S, hidden]."""
        step = self._step(seq, len(seq.ids), len(new))
        h = self.model(self._ids_tensor(new)[None], step.positions, step)[0]
        seq.ids.extend(new)
        return h

    def _prefill(self, seq: Sequence, new: list[int], stop=None, stats: GenerationStats | None = None):
        """Run `new` after seq's cached tokens, PREFILL_CHUNK at a time; their hidden states. None when `stop` (a
        threading.Event) was set between two chunks: seq holds the chunks done (whole rows), the rest is left."""
        hs = []
        for i in range(0, len(new), PREFILL_CHUNK):
            if stop is not None and stop.is_set():
                return None
            hs.append(self._forward(seq, new[i:i + PREFILL_CHUNK]))
            if stats is not None:
                stats.prefilled_tokens = i + len(hs[-1])
        return torch.cat(hs)

    def _mtp(self, seq: Sequence, start: int, h: torch.Tensor, next_ids: list[int] | torch.Tensor):
        """The MTP module over positions start..start+S-1: h [S, hidden] the depth-0 states there (main
        model, after its final norm), next_ids the tokens that follow each (host ids, or the module's own
        drafts still on the device). Writes its latent rows."""
        if self.static is not None and len(next_ids) in self.static.shapes and self.static.mtp:
            return self.static.run_mtp(seq, start, h, next_ids)
        step = self._step(seq, start, len(next_ids))
        ids = next_ids.view(1, -1) if isinstance(next_ids, torch.Tensor) else self._ids_tensor(next_ids)[None]
        h_out, logits = self.model.mtp_forward(0, h[None], ids, step.positions, step)
        return h_out[0], logits[0]

    @torch.inference_mode()
    def generate(self, ids: list[int], params: SamplingParams | None = None, reuse_cache: bool = True,
                 stop=None) -> Generation:
        """A Generation: iterating it streams the generated token ids, and its `stats` are its own. The prompt's
        longest cached prefix is reused (unless reuse_cache is False: then the whole prompt is prefilled); prompt
        and reply are cached for the next call. Stops at the model's end-of-sentence token (which is yielded), at
        any of params.stop_token_ids (yielded too), or after params.max_tokens. Closing it early stops the
        generation and keeps what it cached. `stop`, a threading.Event another thread may set (Esc in the TUI; anything
        with is_set()), ends it before its next forward pass: a long prefill stops between chunks of PREFILL_CHUNK
        tokens, and the cache keeps the part of the prompt prefilled (whole: the next prompt that starts the same reuses
        it); a generation stopped so is not `done`. A prompt and max_tokens that do not fit the context window are a
        ContextLengthError here, before anything runs."""
        params = params or SamplingParams()
        ids = [int(i) for i in ids]
        self._ids_tensor(ids)
        if len(ids) + params.max_tokens > self.context_length:
            raise ContextLengthError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context window "
                f"of {self.context_length} tokens")
        stats = GenerationStats(prompt_tokens=len(ids), load=dict(self.load_stats))
        return Generation(self._generate(ids, params, stats, reuse_cache, stop), stats)

    def _drafter(self, seq: Sequence, sampler: Sampler):
        if self.speculative == "mtp":
            return MTPDrafter(partial(self._mtp, seq), self.model.model.norm, seq, sampler, self.draft_tokens)
        return NgramDrafter(self.draft_tokens) if self.speculative == "ngram" else NoDrafter()

    def _generate(self, ids: list[int], params: SamplingParams, stats: GenerationStats,
                  reuse_cache: bool = True, stop=None) -> Iterator[int]:
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
        sampler = Sampler(params, self.device)
        t0 = time.perf_counter()
        seq = self.cache.open(ids, limit=len(ids) - 1 if reuse_cache else 0)
        drafter = self._drafter(seq, sampler)
        stats.cached_tokens, stats.drafter, stats.seed = seq.cached, drafter.name, sampler.seed
        self.stats = stats
        out: list[int] = []
        try:
            with torch.inference_mode():
                h = self._prefill(seq, ids[seq.cached:], stop, stats)
                if h is None:  # stopped mid-prefill: nothing generated; the prefilled rows stay cached
                    stats.prefill_s = time.perf_counter() - t0
                    return
                drafter.start(ids, h)
                first = sampler.sample(self.model.head(h[-1:])[0])
                if self.static is not None:
                    self.static.bind(seq)
            if self.static is not None and type(drafter) is NoDrafter:
                yield from self._static_plain(seq, first, sampler, params, stops, stats, out, t0, stop)
                return
            new = [int(first)]
            stats.prefill_s = time.perf_counter() - t0
            while True:
                for t in new:  # emit, watching for the end
                    out.append(t)
                    stats.generated_tokens = len(out)
                    if len(out) > 1:  # live figures, for a status line while the reply streams
                        stats.decode_s = time.perf_counter() - t0 - stats.prefill_s
                    yield t
                    if t in stops or len(out) >= params.max_tokens:
                        stats.stop_reason = "stop" if t in stops else "length"
                        break
                if stats.stop_reason or (stop is not None and stop.is_set()):
                    break
                with torch.inference_mode():
                    n_drafts, n_ok, new = self._decode_step(seq, new[-1], drafter, sampler,
                                                            params.max_tokens - len(out) - 1)
                stats.forwards += 1
                stats.draft_tokens += n_drafts
                stats.accepted_tokens += n_ok
            with torch.inference_mode():
                drafter.finish(out[-1])
        finally:
            # The cache keeps exactly the tokens that are now history: prompt + reply minus its last token,
            # whose latents were never computed (fed tokens past a stop are dropped).
            keep = min(len(seq.ids), len(ids) + max(0, len(out) - 1))
            self.cache.truncate(seq, drafter.whole(keep))
            self.cache.close(seq)
            stats.decode_s = time.perf_counter() - t0 - stats.prefill_s

    def _static_plain(self, seq: Sequence, first: torch.Tensor, sampler: Sampler, params: SamplingParams,
                      stops: set[int], stats: GenerationStats, out: list[int], t0: float,
                      stop=None) -> Iterator[int]:
        """Decode without drafts through the static step: each step feeds the token the last one left on the
        device (its argmax, or the sampler's draw), so nothing goes from the host to the device per token. With
        `pipeline` the next step is queued before the host reads a token: an end is then seen one step late,
        and that step's row is dropped with the rest past the reply (see _generate's `keep`)."""
        static, reader = self.static, TokenReader(self.device)
        with torch.inference_mode():
            static.feed(first)
            pending = reader.start(first)
        stats.prefill_s = time.perf_counter() - t0

        def queue():
            with torch.inference_mode():
                _, logits, tokens = static.run_fed(seq)
                tok = tokens[0] if sampler.params.greedy else sampler.sample(logits[0])
                if not sampler.params.greedy:
                    static.feed(tok)
                return reader.start(tok)

        while True:
            ahead = None
            if self.pipeline and len(out) + 1 < params.max_tokens:
                ahead = queue()
                stats.forwards += 1
            t = reader.wait(pending)
            if ahead is not None:
                seq.ids[-1] = t  # the queued step fed t, a placeholder until now
            out.append(t)
            stats.generated_tokens = len(out)
            if len(out) > 1:
                stats.decode_s = time.perf_counter() - t0 - stats.prefill_s
            yield t
            if t in stops or len(out) >= params.max_tokens:
                stats.stop_reason = "stop" if t in stops else "length"
                return
            if stop is not None and stop.is_set():  # as at an end: a step queued ahead is dropped with the rest
                return
            if ahead is None:
                ahead = queue()
                seq.ids[-1] = t
                stats.forwards += 1
            pending = ahead

    def _decode_step(self, seq: Sequence, token: int, drafter, sampler: Sampler, room: int):
        """Feed `token` (and the drafts proposed after it, up to `room`) in one forward pass of the main model;
        keep the drafts it agrees with. Returns (drafts proposed, drafts kept, the new tokens)."""
        drafts, draft_probs = drafter.propose(token, room)
        on_device = isinstance(drafts, torch.Tensor)  # MTP's: the static step feeds them without a host read
        if on_device and self.static is None:
            drafts, on_device = drafts.tolist(), False
        base = len(seq.ids)
        argmax = None
        if on_device:
            h, logits, argmax = self.static.run(seq, [token], drafts)
            n_ok, nxt, drafts = verify_on_device(drafts, draft_probs, logits, sampler, argmax)
            seq.ids[base + 1:] = drafts  # placeholders until the read
        else:
            if self.static is not None:
                h, logits, argmax = self.static.run(seq, [token] + drafts)
            else:
                h = self._forward(seq, [token] + drafts)
                logits = self.model.head(h)
            n_ok, nxt = verify(drafts, draft_probs, logits, sampler, argmax)
        self.cache.truncate(seq, base + 1 + n_ok)
        if self.static is not None and n_ok < len(drafts):
            self.static.set_length(len(seq.ids))
        drafter.accept(drafts[:n_ok], h[: 1 + n_ok])
        return len(drafts), n_ok, drafts[:n_ok] + [nxt]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(files.read_text(path))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}
