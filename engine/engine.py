"""The engine's public face: load a checkpoint, compute logits, stream generated tokens."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Iterator

import torch

from .cache import LatentCache, Sequence
from .config import ModelConfig
from .errors import ContextLengthError, ModelError
from .loader import Progress, load_model, resolve
from .model import ABSORB_MAX_TOKENS, Step, Transformer
from .sampling import Sampler, SamplingParams

PREFILL_CHUNK = 1024
PAGE_SIZE = 64


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


class Engine:
    def __init__(self, model: Transformer, cfg: ModelConfig, path: Path, device: torch.device,
                 dtype: torch.dtype, cache_gb: float | None = None):
        self.model, self.config, self.path = model, cfg, path
        self.device, self.dtype = device, dtype
        self.stats: dict = {}
        self.generation_config = _read_json(path / "generation_config.json")
        eos = cfg.eos_token_id if cfg.eos_token_id is not None else self.generation_config.get("eos_token_id")
        self.eos_token_ids = tuple(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.cache = self._make_cache(cache_gb)
        self._tokenizer = None

    # -- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype | str | None = None, cache_gb: float | None = None,
                        progress: Progress | None = None) -> "Engine":
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ModelError("--device cuda asked for, but PyTorch sees no CUDA GPU here")
        dtype = _parse_dtype(dtype, device)
        root = resolve(path_or_repo_id)
        cfg = ModelConfig.from_file(root / "config.json")
        model = load_model(root, cfg, device, dtype, progress=progress)
        return cls(model, cfg, root, device, dtype, cache_gb)

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
    def _forward(self, seq: Sequence, new: list[int]) -> torch.Tensor:
        """Run new tokens after seq's cached ones; returns their final hidden states [S, hidden]."""
        start, S = len(seq.ids), len(new)
        self.cache.reserve(seq, start + S)
        step = Step(positions=torch.arange(start, start + S, device=self.device),
                    slots=self.cache.slots(seq, start + S), cache=self.cache.layers,
                    absorb=S <= ABSORB_MAX_TOKENS)
        h = self.model(self._ids_tensor(new)[None], step.positions, step)[0]
        seq.ids.extend(new)
        return h

    def _prefill(self, seq: Sequence, new: list[int]) -> torch.Tensor:
        h = None
        for i in range(0, len(new), PREFILL_CHUNK):
            h = self._forward(seq, new[i:i + PREFILL_CHUNK])
        return h

    @torch.inference_mode()
    def generate(self, ids: list[int], params: SamplingParams | None = None) -> Iterator[int]:
        """Stream generated token ids. The prompt's longest cached prefix is reused; prompt and reply are
        cached for the next call. Stops at the model's end-of-sentence token (which is yielded), at any of
        params.stop_token_ids (yielded too), or after params.max_tokens."""
        params = params or SamplingParams()
        ids = [int(i) for i in ids]
        self._ids_tensor(ids)
        if len(ids) + params.max_tokens > self.context_length:
            raise ContextLengthError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context window "
                f"of {self.context_length} tokens")
        return self._generate(ids, params)

    def _generate(self, ids: list[int], params: SamplingParams) -> Iterator[int]:
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
        sampler = Sampler(params)
        stats = self.stats = dict(prompt_tokens=len(ids), cached_tokens=0, generated_tokens=0, prefill_s=0.0,
                                  decode_s=0.0, ttft_s=0.0, decode_tokens_per_s=0.0, draft_tokens=0,
                                  accepted_tokens=0, stop_reason=None)
        t0 = time.perf_counter()
        seq = self.cache.open(ids, limit=len(ids) - 1)
        stats["cached_tokens"] = seq.cached
        try:
            with torch.inference_mode():
                h = self._prefill(seq, ids[seq.cached:])
                logits = self.model.head(h[-1:])[0]
                token = sampler(logits)
            t1 = time.perf_counter()
            stats["prefill_s"] = stats["ttft_s"] = t1 - t0
            n = 0
            while True:
                n += 1
                stats["generated_tokens"] = n
                yield token
                if token in stops:
                    stats["stop_reason"] = "stop"
                    break
                if n >= params.max_tokens:
                    stats["stop_reason"] = "length"
                    break
                with torch.inference_mode():
                    h = self._forward(seq, [token])
                    token = sampler(self.model.head(h)[0])
        finally:
            self.cache.close(seq)
            stats["decode_s"] = time.perf_counter() - t0 - stats["prefill_s"]
            if stats["generated_tokens"] > 1 and stats["decode_s"] > 0:
                stats["decode_tokens_per_s"] = (stats["generated_tokens"] - 1) / stats["decode_s"]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}
