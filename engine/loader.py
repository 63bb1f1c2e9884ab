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
import resource
import struct
import sys
import time
from collections import defaultdict
from pathlib import Path, PurePosixPath
from typing import Callable

import torch
from safetensors import safe_open

from . import dist, quant
from .config_check import check_config
from .errors import ModelError
from ..kernels.fp8_matmul import dequantize_fp8
from .layers.linear import Linear
from .model import Transformer
from .moe import Experts, MoE
from . import files

Progress = Callable[[int, int], None]  # (bytes done, bytes total)

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_EXPERT = re.compile(r"^(.+)\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")


TOKENIZER_FILES = ["tokenizer*", "*.jinja"]
MODEL_FILES = ["*.json", "*.safetensors", *TOKENIZER_FILES]


def resolve(path_or_id: str | os.PathLike, tokenizer_only: bool = False, download: bool = True) -> Path:
    """A local model directory, or a hub repo id: from the local HF cache, else downloaded (unless offline,
    or `download` is False), saying first what will be fetched. tokenizer_only: the tokenizer's files are all
    that is wanted (a hub id then never starts a download of the weights)."""
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
        from huggingface_hub.utils import HfHubHTTPError, RepositoryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise ModelError(f"{name}: no such directory, and huggingface_hub is not installed") from None
    # Read the cache location and offline switch now, not when huggingface_hub was first imported.
    cache_dir = os.environ.get("HF_HUB_CACHE") or (
        os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None)
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    patterns = TOKENIZER_FILES if tokenizer_only else MODEL_FILES
    wanted = "tokenizer.json" if tokenizer_only else "config.json"

    def fetch(**kw) -> Path | list:
        return snapshot_download(name, cache_dir=cache_dir, allow_patterns=patterns, **kw)

    try:
        cached = Path(fetch(local_files_only=True))
        if (cached / wanted).exists() and (tokenizer_only or any(cached.glob("*.safetensors"))):
            return cached
    except (HfHubHTTPError, OSError, ValueError):
        pass  # not cached (in full)
    if offline:
        raise ModelError(f"{name}: not a local directory, and not in the local Hugging Face cache (HF_HUB_OFFLINE "
                         f"is set; looked for {', '.join(patterns)})")
    if not download:
        raise ModelError(f"{name}: not a local directory, and not in the Hugging Face cache")
    try:
        if dist.rank() == 0:
            sys.stderr.write(_download_note(name, fetch, tokenizer_only))
        return Path(fetch())
    except (HfHubHTTPError, OSError, ValueError) as e:
        if _cause(e, lambda c: isinstance(c, RepositoryNotFoundError)) is not None:
            raise ModelError(f"{name}: not a local directory, and no such model on the Hugging Face hub (or it is "
                             f"private: log in with `hf auth login`)") from None
        cause = _cause(e, lambda c: any(k.__name__ in _NETWORK_ERRORS for k in type(c).__mro__))
        if cause is not None:
            raise ModelError(f"{name}: not a local directory or in the local Hugging Face cache, and the hub could "
                             f"not be reached ({type(cause).__name__}: {_first_line(cause)})") from None
        raise ModelError(f"{name}: not a local directory, and the Hugging Face hub could not provide it "
                         f"({_first_line(e)})") from None


_NETWORK_ERRORS = {"TransportError", "ConnectionError", "Timeout", "TimeoutException", "timeout", "gaierror"}


def _cause(e: BaseException | None, matches) -> BaseException | None:
    """`e` or the first error under it (huggingface_hub raises its own errors from the real ones) that matches:
    a missing repository, or a network error (httpx's or requests' connection errors, a timeout, a name that
    did not resolve: _NETWORK_ERRORS)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if matches(e):
            return e
        e = e.__cause__ or e.__context__
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _download_note(name: str, fetch, tokenizer_only: bool) -> str:
    """What a download of `name` will fetch: its files and their size (when the hub can say)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    what = "its tokenizer" if tokenizer_only else "its config, tokenizer and weights"
    quiet = are_progress_bars_disabled()
    disable_progress_bars()  # a dry run needs no progress bar
    try:
        plan = [f for f in fetch(dry_run=True) if f.will_download]
    except TypeError:  # a huggingface_hub without dry runs
        return f"Downloading {name} ({what}) from the Hugging Face hub\n"
    finally:
        if not quiet:
            enable_progress_bars()
    size = sum(f.file_size or 0 for f in plan)
    return f"Downloading {name} ({what}) from the Hugging Face hub: {len(plan)} files, {_bytes(size)}\n"


def _bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


class Checkpoint:
    """The safetensors files of a model directory and which tensor lives in which file."""

    def __init__(self, root: Path):
        self.root = root
        index = root / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(files.read_text(index))["weight_map"]
            except files.UnreadableFile as e:
                raise ModelError(str(e)) from None
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ModelError(f"{index}: unreadable safetensors index ({e})") from None
            if not isinstance(weight_map, dict):
                raise ModelError(f"{index}: unreadable safetensors index (its weight_map is not an object)")
            for f in weight_map.values():  # a file of this directory: never ../elsewhere or /etc/...
                if not isinstance(f, str) or not f or PurePosixPath(f).is_absolute() or ".." in PurePosixPath(f).parts \
                        or "\\" in f:
                    raise ModelError(f"{index}: shard name {f!r} is not a file of this directory")
            self.files = {name: root / f for name, f in weight_map.items()}
        else:
            shards = sorted(root.glob("*.safetensors"))
            if not shards:
                raise ModelError(f"{root}: no weights here (no *.safetensors files)")
            self.files = {}
            for shard in shards:
                for name in _read_header(shard):
                    self.files[name] = shard
        self.shapes: dict[str, list[int]] = {}  # from the headers, before any tensor is read
        for shard in sorted(set(self.files.values())):
            if not shard.exists():
                raise ModelError(f"{shard}: shard listed in the index is missing")
            header = _read_header(shard)
            for name, f in self.files.items():
                if f == shard and name not in header:
                    raise ModelError(f"{shard}: tensor {name!r} listed in the index is not in this file")
                if f == shard:
                    self.shapes[name] = header[name].get("shape")
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
            files.regular(f)  # safetensors opens it: never a FIFO
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
        size = files.regular(path).st_size
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
    except files.UnreadableFile as e:
        raise ModelError(str(e)) from None
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


class Placer:
    """Puts checkpoint tensors into the model built on the meta device: this rank's slice, on the device,
    in the model's dtype; FP8 block weights dequantised, or kept FP8 with their scales (`keep_fp8`) by the
    Linear or the expert stack that owns them. Routed experts fill their layer's stacks (moe.Experts),
    allocated when the first expert arrives."""

    def __init__(self, model: Transformer, device: torch.device, dtype: torch.dtype, block: tuple[int, int],
                 keep_fp8: bool):
        self.model, self.device, self.dtype, self.block, self.keep_fp8 = model, device, dtype, block, keep_fp8
        self.wanted = dict(model.named_parameters())
        self.wanted.update(model.named_buffers())
        self.loaded: set[tuple[int, int, str]] = set()  # (id of the stack's module, expert, projection)

    def wants(self, local: str):
        """The routed expert's (Experts, index in the stack, projection) for an expert tensor, True for
        any other tensor the model holds, None for one this model or this rank does not hold."""
        m = _EXPERT.match(local)
        if m is None:
            return True if local in self.wanted else None
        try:
            moe = self.model.get_submodule(m[1])
        except AttributeError:  # a layer this model does not build (MTP when it is off)
            return None
        if not isinstance(moe, MoE):
            return None
        e = int(m[2]) - moe.first
        return (moe.experts, e, m[3]) if 0 <= e < moe.experts.w13.shape[0] else None

    def put(self, local: str, target, t: torch.Tensor | quant.Packed, scale: torch.Tensor | None, where: str):
        if scale is not None and not self.keep_fp8:
            t, scale = dequantize_fp8(t, scale, self.block), None
        packs = quant.owner(self.model, local, target)
        if packs is not None:
            quant.place(packs, target, t, self.device, where)
            return
        if target is True:
            self._tensor(local, t, scale, where)
        else:
            self._expert(*target, t, scale, where)

    def _tensor(self, local, t, scale, where):
        sliced = _fp8_slice(self.model, local, t, scale, self.block) if scale is not None else None
        if scale is not None and sliced is None:
            t = dequantize_fp8(t, scale, self.block)
        t = _shard(self.model, local, t) if sliced is None else sliced[1]
        _check_shape(t, self.wanted[local].shape, where)
        if sliced is not None:
            owner = sliced[0]
            _set(self.model, local, t.to(self.device))
            owner.scale, owner.block = sliced[2].to(device=self.device, dtype=torch.float32), self.block
        else:
            keep_fp32 = local.endswith("e_score_correction_bias")
            _set(self.model, local, t.to(device=self.device, dtype=torch.float32 if keep_fp32 else self.dtype))

    def _expert(self, experts: Experts, e: int, proj: str, t, scale, where):
        attr = "w2" if proj == "down" else "w13"
        stack = getattr(experts, attr)
        E, rows, cols = stack.shape
        rows //= 1 if proj == "down" else 2
        _check_shape(t, (rows, cols), where)
        if stack.is_meta:  # the first of this stack: FP8 if it is
            stack = torch.empty(stack.shape, device=self.device, dtype=self.dtype if scale is None else t.dtype)
            experts._parameters[attr] = torch.nn.Parameter(stack, requires_grad=False)
            if scale is not None:
                blocks = (scale.shape[0] * (1 if proj == "down" else 2), scale.shape[1])
                setattr(experts, attr + "_scale", torch.empty(E, *blocks, device=self.device))
                experts.block = self.block
        scales = getattr(experts, attr + "_scale")
        if (scales is None) != (scale is None) or stack.dtype != (self.dtype if scale is None else t.dtype):
            raise ModelError(f"{where}: the routed experts of one layer mix FP8 and unquantised weights")
        half = 1 if proj == "up" else 0
        stack[e, half * rows:(half + 1) * rows] = t.to(device=self.device, dtype=stack.dtype)
        if scale is not None:
            n = scale.shape[0]
            scales[e, half * n:(half + 1) * n] = scale.to(device=self.device, dtype=torch.float32)
        self.loaded.add((id(experts), e, proj))

    def missing(self) -> str | None:
        """The local name of a tensor that never arrived, if any."""
        for name, mod in self.model.named_modules():
            if isinstance(mod, Experts):
                first = self.model.get_submodule(name.rpartition(".")[0]).first
                for e in range(mod.w13.shape[0]):
                    for proj in ("gate", "up", "down"):
                        if (id(mod), e, proj) not in self.loaded:
                            return f"{name}.{first + e}.{proj}_proj.weight"
        return quant.missing(self.model) or next(iter(_still_meta(self.model)), None)


def _still_meta(model: Transformer) -> list[str]:
    return [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]


def _check_shape(t: torch.Tensor, shape, where: str):
    if tuple(t.shape) != tuple(shape):
        raise ModelError(f"{where} has shape {list(t.shape)}, expected {list(shape)}")


def load_model(root: Path, cfg, device: torch.device, dtype: torch.dtype, with_mtp: bool = True,
               progress: Progress | None = None, fp8: str = "dequant",
               quantize: quant.QuantSpec | None = None) -> Transformer:
    """fp8: "dequant" turns FP8 block weights into `dtype` on load; "keep" stores them as FP8 with their
    scales (half the memory of bf16) and dequantises each one when it is used. quantize: int8 / int4 the
    weights engine/quant.py names, one tensor at a time as they are read (a directory written by
    `dschat quantize` says so in its config and loads packed)."""
    ckpt = Checkpoint(root)
    check_config(cfg, ckpt.shapes, str(root))
    with torch.device("meta"):
        model = Transformer(cfg, with_mtp=with_mtp)
    if quantize is not None:
        head = quant.HEAD if device.type == "cpu" and not cfg.tie_word_embeddings else None
        quant.convert(model, quantize, head)
    placer = Placer(model, device, dtype, tuple(cfg.fp8_block_size or (128, 128)), fp8 == "keep")
    total, done = ckpt.total_bytes(), 0
    if progress is None:
        progress = terminal_progress("Loading " + root.name)
    try:
        for shard, names in ckpt.by_file().items():
            for name in names:
                skip = name.endswith(("_scale_inv",) + quant.COMPANIONS)
                target = None if skip else placer.wants(model.local_name(name))
                if target is None:
                    continue
                t = ckpt.get(name)
                done += t.numel() * t.element_size()
                scale = None
                where = f"{shard}: tensor {name!r}"
                if t.dtype == torch.float8_e4m3fn:
                    if name + "_scale_inv" not in ckpt:
                        raise ModelError(f"{shard}: FP8 tensor {name!r} has no {name + '_scale_inv'!r}")
                    scale = ckpt.get(name + "_scale_inv")
                elif cfg.weight_quant is not None or not t.is_floating_point():
                    t = _packed(ckpt, model, name, t, target, cfg, where)
                placer.put(model.local_name(name), target, t, scale, where)
                progress(min(done, total), total)
            ckpt.close()  # unmap the shard just read: host memory holds one shard's pages at most
        # Tied or shared weights the checkpoint leaves out.
        if "lm_head.weight" in _still_meta(model) and cfg.tie_word_embeddings:
            _set(model, "lm_head.weight", model.model.embed_tokens.weight)
        for i, m in enumerate(model.mtp):
            if m.embed_tokens.weight.is_meta:
                _set(model, f"mtp.{i}.embed_tokens.weight", model.model.embed_tokens.weight)
            if isinstance(model.lm_head, quant.QuantLinear) and not isinstance(m.shared_head.head, quant.QuantLinear) \
                    and m.shared_head.head.weight.is_meta:
                m.shared_head.head = model.lm_head
            elif m.shared_head.head.weight.is_meta:
                _set(model, f"mtp.{i}.shared_head.head.weight", model.lm_head.weight)
        missing = placer.missing()
        if missing:
            raise ModelError(f"{root}: tensor {model.hub_name(missing)!r} is missing from the checkpoint")
        quant.repack_for_cpu(model)
        progress(total, total)
    finally:
        ckpt.close()
    return model.eval()


def _packed(ckpt: Checkpoint, model: Transformer, name: str, t: torch.Tensor, target, cfg, where: str):
    """In a directory `dschat quantize` wrote, the packed form of a weight that runs packed (checked against
    its config); integers anywhere else are an error."""
    packs = quant.owner(model, model.local_name(name), target) if cfg.weight_quant is not None else None
    if packs is not None and not (t.is_floating_point() and getattr(packs, "quantize_on_load", False)):
        return quant.read_packed(name, t, lambda n: ckpt.get(n) if n in ckpt else None, packs, target, where)
    if not t.is_floating_point():
        raise ModelError(f"{where} holds {t.dtype} values, but config.json says nothing of a quantization")
    return t


def peak_host_bytes() -> int:
    """This process's peak resident memory so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_report(model: Transformer, device: torch.device) -> dict:
    """Bytes of the loaded weights, this process's peak resident host memory so far (the loader holds one
    tensor and one shard's mapped pages beyond the model), and the peak GPU memory allocated (None off CUDA)."""
    return {"weight_bytes": quant.weight_bytes(model), "peak_host_bytes": peak_host_bytes(),
            "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}


def terminal_progress(label: str) -> Progress:
    """A progress bar on stderr when it is a terminal (rank 0's, with several ranks); silent otherwise."""
    if not sys.stderr.isatty() or dist.rank() != 0:
        return lambda done, total: None
    start = time.monotonic()
    last = [0.0]
    label = "".join(c if c.isprintable() else "?" for c in label)  # a directory's name: no escape sequences

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
