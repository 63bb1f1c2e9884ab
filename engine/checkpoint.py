"""The safetensors files of a model directory in the Hugging Face layout (`model.safetensors.index.json` +
shards, or shards alone). Every shard's header is checked against its size first, so a truncated download
is named, not crashed on; tensors are read one at a time with plain reads into memory the caller owns (not
mapped: a mapped shard's pages count in the process's resident memory until it is unmapped, a whole shard's
worth, which for V2-Lite's 8.6 GB shards is most of its int4 weights; read, they stay in the page cache,
which the kernel drops as it needs)."""

from __future__ import annotations

import json
import struct
from collections import defaultdict
from pathlib import Path, PurePosixPath

import torch
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
        self._entries: dict[str, dict] = {}  # dtype, shape and data_offsets (from the start of the data)
        for shard in sorted(set(self.files.values())):
            if not shard.exists():
                raise ModelError(f"{shard}: shard listed in the index is missing")
            header = _read_header(shard)
            for name, f in self.files.items():
                if f == shard and name not in header:
                    raise ModelError(f"{shard}: tensor {name!r} listed in the index is not in this file")
                if f == shard:
                    self.shapes[name] = header[name].get("shape")
                    self._entries[name] = header[name]
        self._open: dict[Path, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def by_file(self) -> dict[Path, list[str]]:
        out: dict[Path, list[str]] = defaultdict(list)
        for name, f in self.files.items():
            out[f].append(name)
        return dict(sorted(out.items()))

    def get(self, name: str) -> torch.Tensor:
        """The tensor `name`, read into a fresh CPU tensor (its own memory)."""
        f = self.files[name]
        if f not in self._open:
            files.regular(f)  # never a FIFO
            fh = open(f, "rb")
            (n,) = struct.unpack("<Q", fh.read(8))
            self._open[f] = (fh, 8 + n)
        fh, data_start = self._open[f]
        e = self._entries[name]
        dtype, shape, offsets = _DTYPES.get(e.get("dtype")), e.get("shape"), e.get("data_offsets")
        if dtype is None:
            raise ModelError(f"{f}: cannot read tensor {name!r} (unknown dtype {e.get('dtype')!r})")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
                and isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise ModelError(f"{f}: cannot read tensor {name!r} (malformed header entry)")
        begin, end = offsets
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if end - begin != nbytes:
            raise ModelError(f"{f}: cannot read tensor {name!r} ({end - begin} bytes stored for shape {shape} "
                             f"of {e.get('dtype')})")
        buf = torch.empty(nbytes, dtype=torch.uint8)
        try:
            fh.seek(data_start + begin)
            got = fh.readinto(memoryview(buf.numpy()))
        except OSError as err:
            raise ModelError(f"{f}: cannot read tensor {name!r} ({err.strerror or err})") from None
        if got != nbytes:
            raise ModelError(f"{f}: cannot read tensor {name!r} (file ends after {got} of {nbytes} bytes)")
        return buf.view(dtype).reshape(shape)

    def close(self):
        for fh, _ in self._open.values():
            fh.close()
        self._open.clear()

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in set(self.files.values()))


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
           "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64}


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
