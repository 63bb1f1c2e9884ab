"""The safetensors files of a model directory in the Hugging Face layout (`model.safetensors.index.json` +
shards, or shards alone). Every shard's header is checked against its size first, so a truncated download
is named, not crashed on; tensors are read one at a time from memory-mapped files."""

from __future__ import annotations

import json
import struct
from collections import defaultdict
from pathlib import Path, PurePosixPath

import torch
from safetensors import safe_open

from . import files
from .errors import ModelError


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
