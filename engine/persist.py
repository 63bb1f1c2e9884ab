"""Latent-cache pages on disk, so a saved conversation resumes in a new process without re-prefilling.

One safetensors file per saved prefix in `$XDG_CACHE_HOME/dschat/kv/` (or the directory given), named by a
hash of the model fingerprint and the token ids it was saved under. It holds the token ids and their latent
rows for every cached layer, and a SHA-256 of both in its metadata. The directory is capped in size; the
least recently used files go first. A missing file is a miss; a stale or corrupt one, or one whose rows no
longer match their checksum (altered on disk), is ignored with a warning and the prefix is recomputed.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .files import regular

VERSION = "2"  # 2: the checksum


class CacheWarning(UserWarning):
    """A persisted cache file that could not be used (it is ignored; the prefix is recomputed)."""


def default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dschat" / "kv"


def key(fingerprint: str, ids: list[int]) -> str:
    h = hashlib.sha256(fingerprint.encode())
    h.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()[:40]


def write(directory: Path, fingerprint: str, key_ids: list[int], ids: list[int], rows: torch.Tensor,
          cap_bytes: int) -> Path | None:
    """rows [n_layers, len(ids), latent_dim]. Atomic: a crash leaves the old file or the new one. Problems
    (the directory is a file, the disk is full) are warnings, never errors: None, and nothing is saved."""
    try:
        return _write(directory, fingerprint, key_ids, ids, rows, cap_bytes)
    except (OSError, SafetensorError) as e:
        warnings.warn(f"the latent cache was not saved in {directory}: {e}", CacheWarning, stacklevel=3)
        return None


def _write(directory: Path, fingerprint: str, key_ids: list[int], ids: list[int], rows: torch.Tensor,
           cap_bytes: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{key(fingerprint, key_ids)}.safetensors"
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    os.close(fd)
    try:
        tensors = {"ids": torch.tensor(ids, dtype=torch.int64), "rows": rows.contiguous().cpu()}
        save_file(tensors, tmp, metadata={"version": VERSION, "fingerprint": fingerprint,
                                          "sha256": checksum(tensors["ids"], tensors["rows"])})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _cap(directory, cap_bytes, keep=path)
    return path


def read(directory: Path, fingerprint: str, key_ids: list[int], n_layers: int, latent_dim: int):
    """(ids, rows) saved under key_ids, or None. Problems are warnings, never errors."""
    path = directory / f"{key(fingerprint, key_ids)}.safetensors"
    if not path.exists():
        return None
    try:
        from safetensors import safe_open

        regular(path)  # a FIFO named like a cache file: never opened (it would wait for a writer)
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("version") != VERSION or meta.get("fingerprint") != fingerprint:
            raise ValueError("it was written for other weights or by another version")
        data = load_file(str(path))
        if checksum(data["ids"], data["rows"]) != meta.get("sha256"):
            raise ValueError("its contents do not match their checksum (the file was altered)")
        ids, rows = data["ids"].tolist(), data["rows"]
        if rows.shape != (n_layers, len(ids), latent_dim):
            raise ValueError(f"its rows have shape {list(rows.shape)}, this engine caches "
                             f"{n_layers} layers x {latent_dim} values")
        if ids != list(key_ids[: len(ids)]):
            raise ValueError("its tokens are not a prefix of the conversation")
        if not torch.isfinite(rows.float()).all():
            raise ValueError("it holds non-finite values")
    except Exception as e:  # corrupt, truncated, stale: recompute instead
        warnings.warn(f"ignoring cached prefix {path.name}: {e}", CacheWarning, stacklevel=3)
        return None
    os.utime(path)  # recently used
    return ids, rows


def checksum(ids: torch.Tensor, rows: torch.Tensor) -> str:
    """SHA-256 of the token ids and the rows' bytes, whatever their dtype."""
    h = hashlib.sha256(ids.numpy().tobytes())
    h.update(rows.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _cap(directory: Path, cap_bytes: int, keep: Path):
    files = sorted((p for p in directory.glob("*.safetensors")), key=lambda p: p.stat().st_mtime)
    total = sum(p.stat().st_size for p in files)
    for p in files:
        if total <= cap_bytes:
            break
        if p != keep:
            total -= p.stat().st_size
            p.unlink(missing_ok=True)
