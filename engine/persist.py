"""Latent-cache pages on disk, so a saved conversation resumes in a new process without re-prefilling.

One safetensors file per saved prefix in `$XDG_CACHE_HOME/dschat/kv/` (or the directory given), named by a
hash of the model fingerprint and the token ids it was saved under. It holds the token ids and their latent
rows for every cached layer, and an HMAC-SHA256 of both in its metadata, keyed with a secret of the user's
(32 random bytes in `$XDG_DATA_HOME/dschat/cache.key`, 0600, made on first use): whoever can write the
cache directory but cannot read that file cannot make altered rows pass, and a file copied from another
user's cache does not pass either. The directory is capped in size; the least recently used files go
first. A missing file is a miss; a stale or corrupt one, or one whose rows do not match their checksum
(altered on disk), is ignored with a warning and the prefix is recomputed.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import dist
from .cache import LatentCache
from .files import read_bytes, regular

VERSION = "3"  # 2: the checksum; 3: keyed (HMAC)
KEY_BYTES = 32


class CacheWarning(UserWarning):
    """A persisted cache file that could not be used (it is ignored; the prefix is recomputed)."""


def default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dschat" / "kv"


def default_secret_file() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "dschat" / "cache.key"


def secret(path: Path | None) -> bytes:
    """The user's cache key in `path` (the default one for None), made on first use: 32 random bytes, 0600."""
    path = path or default_secret_file()
    try:
        data = read_bytes(path, 4096)
    except FileNotFoundError:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another dschat made it meanwhile
            return secret(path)
        data = secrets.token_bytes(KEY_BYTES)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    if len(data) != KEY_BYTES:
        raise ValueError(f"{path}: not a cache key ({len(data)} bytes, not {KEY_BYTES}); delete it to make a new one")
    return data


def save_prefix(cache: LatentCache, weights_key: str, ids: list[int], directory: Path | None = None,
                cap_bytes: int = 4 * 2**30, secret_file: Path | None = None) -> int:
    """Write the latent rows of the cached part of `ids` under `weights_key` (what the rows are only valid for:
    Engine.prefix_key) and `ids`, into `directory` (default_dir() for None). Returns the number of tokens
    written (0, with a CacheWarning, where the directory cannot be written)."""
    seq = cache.open(list(ids))
    try:
        n = seq.cached
        if n and dist.rank() == 0:  # every rank holds the same latent rows: one writes them
            slots = cache.slots(seq, n)
            rows = torch.stack([buf[slots] for buf in cache.layers])
            written = write(directory or default_dir(), weights_key, list(ids), seq.ids[:n], rows, cap_bytes,
                            secret_file, stacklevel=4)
            return n if written else 0
        return n
    finally:
        cache.close(seq, insert=False)


def load_prefix(cache: LatentCache, weights_key: str, ids: list[int], directory: Path | None = None,
                secret_file: Path | None = None) -> int:
    """Put the rows saved under `weights_key` and exactly `ids` back into the cache. Returns the number of
    tokens restored (0 when there is no usable file; a stale, corrupt or altered one gives a CacheWarning)."""
    got = read(directory or default_dir(), weights_key, list(ids), len(cache.layers), cache.latent_dim,
               secret_file, stacklevel=4)
    if got is None:
        return 0
    saved, rows = got
    seq = cache.open(saved)
    try:
        n0 = seq.cached
        if n0 < len(saved):
            cache.reserve(seq, len(saved))
            slots = cache.slots(seq, len(saved))[n0:]
            for layer, buf in enumerate(cache.layers):
                buf[slots] = rows[layer, n0:].to(device=buf.device, dtype=buf.dtype)
            seq.ids = list(saved)
    finally:
        cache.close(seq)
    return len(saved)


def key(fingerprint: str, ids: list[int]) -> str:
    h = hashlib.sha256(fingerprint.encode())
    h.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()[:40]


def write(directory: Path, fingerprint: str, key_ids: list[int], ids: list[int], rows: torch.Tensor,
          cap_bytes: int, secret_file: Path | None = None, stacklevel: int = 3) -> Path | None:
    """rows [n_layers, len(ids), latent_dim]. Atomic: a crash leaves the old file or the new one. Problems
    (the directory is a file, the disk is full) are warnings, never errors: None, and nothing is saved."""
    try:
        return _write(directory, fingerprint, key_ids, ids, rows, cap_bytes, secret(secret_file))
    except (OSError, SafetensorError, ValueError) as e:
        warnings.warn(f"the latent cache was not saved in {directory}: {e}", CacheWarning, stacklevel=stacklevel)
        return None


def _write(directory: Path, fingerprint: str, key_ids: list[int], ids: list[int], rows: torch.Tensor,
           cap_bytes: int, secret_key: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{key(fingerprint, key_ids)}.safetensors"
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    os.close(fd)
    try:
        tensors = {"ids": torch.tensor(ids, dtype=torch.int64), "rows": rows.contiguous().cpu()}
        save_file(tensors, tmp, metadata={"version": VERSION, "fingerprint": fingerprint,
                                          "hmac": checksum(tensors["ids"], tensors["rows"], secret_key)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _cap(directory, cap_bytes, keep=path)
    return path


def read(directory: Path, fingerprint: str, key_ids: list[int], n_layers: int, latent_dim: int,
         secret_file: Path | None = None, stacklevel: int = 3):
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
        if not hmac.compare_digest(checksum(data["ids"], data["rows"], secret(secret_file)), meta.get("hmac", "")):
            raise ValueError("its contents do not match their checksum (the file was altered, or written with "
                             "another cache key)")
        ids, rows = data["ids"].tolist(), data["rows"]
        if rows.shape != (n_layers, len(ids), latent_dim):
            raise ValueError(f"its rows have shape {list(rows.shape)}, this engine caches "
                             f"{n_layers} layers x {latent_dim} values")
        if ids != list(key_ids[: len(ids)]):
            raise ValueError("its tokens are not a prefix of the conversation")
        if not torch.isfinite(rows.float()).all():
            raise ValueError("it holds non-finite values")
    except Exception as e:  # corrupt, truncated, stale: recompute instead
        warnings.warn(f"ignoring cached prefix {path.name}: {e}", CacheWarning, stacklevel=stacklevel)
        return None
    os.utime(path)  # recently used
    return ids, rows


def checksum(ids: torch.Tensor, rows: torch.Tensor, secret_key: bytes) -> str:
    """HMAC-SHA256 under the user's key of the token ids and the rows' bytes, whatever their dtype."""
    h = hmac.new(secret_key, ids.numpy().tobytes(), hashlib.sha256)
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
