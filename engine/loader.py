"""Open a checkpoint in the Hugging Face layout and stream its tensors into a model.

* A local directory, or a hub repo id resolved through huggingface_hub and its cache.
* `model.safetensors.index.json` + shards, or a single `model.safetensors`.
* Every shard's header is checked against its size first, so a truncated download is named, not crashed on.
* Tensors are read one at a time from memory-mapped files and placed on the device, so host memory stays
  near one tensor, not the model. The model is built on the meta device and each parameter is created
  when its tensor arrives: nothing is allocated twice.
* FP8 e4m3 weights with `weight_scale_inv` (blocks of 128x128, partial edge blocks) are dequantised on load.
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from . import dist
from .errors import ModelError
from .model import Linear, Transformer, dequantize_fp8

Progress = Callable[[int, int], None]  # (bytes done, bytes total)

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(path_or_id: str | os.PathLike) -> Path:
    """A local model directory, or a hub repo id (from the local HF cache, downloading if allowed)."""
    p = Path(path_or_id).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ModelError(f"{p}: not a model directory")
        return p
    name = str(path_or_id)
    if not _REPO_ID.match(name) or name.startswith((".", "/", "~")):
        raise ModelError(f"{p}: no such model directory")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import HfHubHTTPError
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise ModelError(f"{name}: no such directory, and huggingface_hub is not installed") from None
    # Read the cache location and offline switch now, not when huggingface_hub was first imported.
    cache_dir = os.environ.get("HF_HUB_CACHE") or (
        os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None)
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        return Path(snapshot_download(
            name, cache_dir=cache_dir, local_files_only=offline,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja"]))
    except (HfHubHTTPError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{name}: not a local directory, and not found on the Hugging Face hub or in its "
                         f"cache ({first})") from None


class Checkpoint:
    """The safetensors files of a model directory and which tensor lives in which file."""

    def __init__(self, root: Path):
        self.root = root
        index = root / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ModelError(f"{index}: unreadable safetensors index ({e})") from None
            self.files = {name: root / f for name, f in weight_map.items()}
        else:
            shards = sorted(root.glob("*.safetensors"))
            if not shards:
                raise ModelError(f"{root}: no weights here (no *.safetensors files)")
            self.files = {}
            for shard in shards:
                for name in _read_header(shard):
                    self.files[name] = shard
        for shard in sorted(set(self.files.values())):
            if not shard.exists():
                raise ModelError(f"{shard}: shard listed in the index is missing")
            header = _read_header(shard)
            for name, f in self.files.items():
                if f == shard and name not in header:
                    raise ModelError(f"{shard}: tensor {name!r} listed in the index is not in this file")
        self._open: dict[Path, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def by_file(self) -> dict[Path, list[str]]:
        out: dict[Path, list[str]] = defaultdict(list)
        for name, f in self.files.items():
            out[f].append(name)
        return dict(sorted(out.items()))

    def get(self, name: str) -> torch.Tensor:
        f = self.files[name]
        if f not in self._open:
            self._open[f] = safe_open(str(f), framework="pt", device="cpu")
        try:
            return self._open[f].get_tensor(name)
        except Exception as e:  # safetensors raises its own error types
            raise ModelError(f"{f}: cannot read tensor {name!r} ({e})") from None

    def close(self):
        self._open.clear()

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in set(self.files.values()))


def _read_header(path: Path) -> dict:
    """The tensor table of a safetensors file, after checking that the file holds all its bytes."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise ModelError(f"{path}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise ModelError(f"{path}: truncated safetensors file (header of {n} bytes, file of {size})")
            header = json.loads(fh.read(n))
    except FileNotFoundError:
        raise ModelError(f"{path}: shard is missing") from None
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: not a readable safetensors file ({e})") from None
    header.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + n + end > size:
        raise ModelError(f"{path}: truncated safetensors file ({size} of {8 + n + end} bytes)")
    return header


def _shard(model: Transformer, local: str, t: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a tensor-parallel weight."""
    ws = dist.world_size()
    if ws == 1:
        return t
    owner = model.get_submodule(local.rsplit(".", 1)[0])
    if isinstance(owner, Linear) and owner.split:
        dim = 0 if owner.split == "col" else 1
        return t.chunk(ws, dim=dim)[dist.rank()]
    return t


def _set(model: Transformer, local: str, value: torch.Tensor | torch.nn.Parameter):
    mod_name, _, attr = local.rpartition(".")
    mod = model.get_submodule(mod_name)
    if attr in mod._buffers:
        mod._buffers[attr] = value
    else:
        mod._parameters[attr] = value if isinstance(value, torch.nn.Parameter) else torch.nn.Parameter(
            value, requires_grad=False)


def _fp8_slice(model: Transformer, local: str, w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]):
    """This rank's FP8 weight and block scales, when the weight can stay in FP8: a Linear whose split (if
    any) falls on block boundaries. kv_b_proj is read whole by the absorbed MLA path, so it never stays.
    None when it cannot."""
    owner = model.get_submodule(local.rsplit(".", 1)[0])
    if not isinstance(owner, Linear) or local.endswith("kv_b_proj.weight"):
        return None
    ws = dist.world_size()
    if ws == 1 or not owner.split:
        return owner, w, scale
    dim = 0 if owner.split == "col" else 1
    n = w.shape[dim] // ws
    if n % block[dim]:
        return None
    r = dist.rank()
    return owner, w.narrow(dim, r * n, n), scale.narrow(dim, r * n // block[dim], n // block[dim])


def load_model(root: Path, cfg, device: torch.device, dtype: torch.dtype, with_mtp: bool = True,
               progress: Progress | None = None, fp8: str = "dequant") -> Transformer:
    """fp8: "dequant" turns FP8 block weights into `dtype` on load; "keep" stores them as FP8 with their
    scales (half the memory of bf16) and dequantises each one when it is used."""
    ckpt = Checkpoint(root)
    with torch.device("meta"):
        model = Transformer(cfg, with_mtp=with_mtp)
    wanted = dict(model.named_parameters())
    wanted.update(model.named_buffers())
    total, done = ckpt.total_bytes(), 0
    if progress is None:
        progress = terminal_progress("Loading " + root.name)
    try:
        for shard, names in ckpt.by_file().items():
            for name in names:
                if name.endswith("_scale_inv"):
                    continue
                local = model.local_name(name)
                target = wanted.get(local)
                t = ckpt.get(name) if target is not None else None
                if t is not None:
                    done += t.numel() * t.element_size()
                    owner = None  # the Linear that keeps this weight in FP8 (with block scales `s`)
                    if t.dtype == torch.float8_e4m3fn:
                        scale = name + "_scale_inv"
                        if scale not in ckpt:
                            raise ModelError(f"{shard}: FP8 tensor {name!r} has no {scale!r}")
                        block = tuple(cfg.fp8_block_size or (128, 128))
                        s = ckpt.get(scale)
                        sliced = _fp8_slice(model, local, t, s, block) if fp8 == "keep" else None
                        if sliced is None:
                            t = dequantize_fp8(t, s, block)
                        else:
                            owner, t, s = sliced
                    if owner is None:
                        t = _shard(model, local, t)
                    if tuple(t.shape) != tuple(target.shape):
                        raise ModelError(f"{shard}: tensor {name!r} has shape {list(t.shape)}, "
                                         f"expected {list(target.shape)}")
                    if owner is not None:
                        _set(model, local, t.to(device))
                        owner.scale, owner.block = s.to(device=device, dtype=torch.float32), block
                    else:
                        keep_fp32 = local.endswith("e_score_correction_bias")
                        _set(model, local, t.to(device=device, dtype=torch.float32 if keep_fp32 else dtype))
                    progress(min(done, total), total)
        # Tied or shared weights the checkpoint leaves out.
        loaded = {n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if not p.is_meta}
        if "lm_head.weight" not in loaded and cfg.tie_word_embeddings:
            _set(model, "lm_head.weight", model.model.embed_tokens.weight)
        for i, m in enumerate(model.mtp):
            if m.embed_tokens.weight.is_meta:
                _set(model, f"mtp.{i}.embed_tokens.weight", model.model.embed_tokens.weight)
            if m.shared_head.head.weight.is_meta:
                _set(model, f"mtp.{i}.shared_head.head.weight", model.lm_head.weight)
        for n, p in list(model.named_parameters()) + list(model.named_buffers()):
            if p.is_meta:
                raise ModelError(f"{root}: tensor {_hub_name(model, n)!r} is missing from the checkpoint")
        progress(total, total)
    finally:
        ckpt.close()
    return model.eval()


def _hub_name(model: Transformer, local: str) -> str:
    if local.startswith("mtp."):
        i, _, rest = local[4:].partition(".")
        return f"model.layers.{model.cfg.num_hidden_layers + int(i)}.{rest}"
    return local


def terminal_progress(label: str) -> Progress:
    """A progress bar on stderr when it is a terminal (rank 0's, with several ranks); silent otherwise."""
    if not sys.stderr.isatty() or dist.rank() != 0:
        return lambda done, total: None
    start = time.monotonic()
    last = [0.0]

    def show(done: int, total: int):
        now = time.monotonic()
        if done < total and now - last[0] < 0.1:
            return
        last[0] = now
        frac = done / total if total else 1.0
        bar = "█" * int(frac * 30)
        sys.stderr.write(f"\r{label} {frac:4.0%} |{bar:<30}| {done / 1e9:.2f}/{total / 1e9:.2f} GB "
                         f"{now - start:4.0f}s")
        if done >= total:
            sys.stderr.write("\r\033[K")
        sys.stderr.flush()

    return show
