"""Large CPU tensors in transparent huge pages (Linux).

A CPU decode step streams every weight it uses once a token. In 4 KiB pages each 4 KiB read may miss the TLB
(in a virtual machine a two-level page walk); in 2 MiB pages 512 times fewer do, and the page tables of a
9 GB model shrink from 18 MB to 36 KB. Linux gives anonymous memory huge pages only where the process asks
(`/sys/kernel/mm/transparent_hugepage/enabled` is "madvise" on most distributions), and PyTorch's allocator does
not ask (unless THP_MEM_ALLOC_ENABLE=1 is set before torch is imported). So after loading, a CPU model's weights
move into memory that asks: a private anonymous mapping advised MADV_HUGEPAGE before it is written, one storage
at a time (the load's peak grows by one to two of the largest storages, measured), every tensor over it (views
too) set onto the new one.
Measured: docs/benchmarks.md ("Huge pages"). DSCHAT_HUGE_PAGES=0 turns it off; where the kernel has no THP
(or "never") nothing moves.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import sys

import torch
from torch import nn

from .layers.embedding import Embedding

HUGE = 2 << 20  # bytes of a huge page (x86-64, arm64 with 4 KiB base pages)
MIN_BYTES = 2 * HUGE  # smaller storages may hold no whole aligned huge page: left where they are
ENV = "DSCHAT_HUGE_PAGES"
_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def available() -> bool:
    """Whether moved memory can get huge pages here: Linux with THP not "never", not turned off by ENV."""
    if not sys.platform.startswith("linux") or os.environ.get(ENV, "1") == "0" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        with open(_MODE) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def storage(nbytes: int) -> torch.UntypedStorage:
    """Uninitialised memory of `nbytes` (> 0) starting on a 2 MiB boundary (the mapping reserves one huge page
    more: address space, not memory), its whole 2 MiB pieces advised for huge pages (they get them as they are
    first written; the last partial piece stays in 4 KiB pages: a huge page there would hold up to 2 MiB more
    than the tensor). The storage keeps its mapping alive. Where the kernel refuses the advice (some
    sandboxes), plain anonymous memory."""
    size = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE + HUGE
    mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # private: shared memory is shmem's THP
    off = (-torch.frombuffer(mm, dtype=torch.uint8, count=1).data_ptr()) % HUGE
    if nbytes >= HUGE:
        try:
            mm.madvise(mmap.MADV_HUGEPAGE, off, nbytes // HUGE * HUGE)
        except OSError:
            pass
    return torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=off).untyped_storage()


def empty(shape, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """torch.empty(shape, dtype, device): on the CPU in huge pages where available() and it is large enough."""
    nbytes = math.prod(shape) * dtype.itemsize
    if torch.device(device).type != "cpu" or nbytes == 0 or nbytes < MIN_BYTES or not available():
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.empty(0, dtype=dtype).set_(storage(nbytes), 0, tuple(shape))


def copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of the CPU tensor t, in huge pages as `empty` places it."""
    out = empty(t.shape, t.dtype)
    out.copy_(t)
    return out


def _malloc_trim():
    """glibc's malloc_trim (None elsewhere): hands freed heap memory back to the system. A moved storage's old
    memory, freed, would otherwise stay resident in the heap beside its copy."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def move(model: nn.Module) -> int:
    """The model's CPU parameters and buffers (MIN_BYTES or more a storage) moved into huge pages; embedding
    tables stay (a token reads one row of them). Every tensor over a moved storage is set onto the new one: the
    modules' own and the views they were made from (`_base`: a buffer read from a checkpoint is a view of the
    bytes read), so nothing holds the old memory. Returns the bytes moved (0 where not available())."""
    if not available():
        return 0
    owners = _owners(model)  # gathered in a helper: none of its loop's names keeps a storage alive here
    moved, trim = 0, _malloc_trim()
    with torch.no_grad():
        while owners:
            st, tensors, embedding = owners.popitem()[1]
            if all(embedding):
                continue
            new = storage(st.nbytes())
            torch.empty(0, dtype=torch.uint8).set_(new).copy_(torch.empty(0, dtype=torch.uint8).set_(st))
            for t in tensors:
                t.set_(new, t.storage_offset(), t.size(), t.stride())
            moved += st.nbytes()
            del st, tensors  # the old memory freed (nothing else holds it) before the next copy is made
            if trim is not None:
                trim(0)
    return moved


def _owners(model: nn.Module) -> dict[int, tuple[torch.UntypedStorage, list[torch.Tensor], list[bool]]]:
    """By storage (MIN_BYTES or more, on the CPU): the storage, the tensors over it (the modules' parameters and
    buffers, and the views they were made from), and for each module holding one whether it is an embedding."""
    owners: dict[int, tuple[torch.UntypedStorage, list[torch.Tensor], list[bool]]] = {}
    for m in model.modules():
        for t in list(m._parameters.values()) + list(m._buffers.values()):
            if t is None or t.device.type != "cpu" or t.is_meta:
                continue
            st = t.untyped_storage()
            if st.nbytes() == 0 or st.nbytes() < MIN_BYTES:
                continue
            entry = owners.setdefault(st.data_ptr(), (st, [], []))
            base = t._base
            for u in (t, base) if base is not None and base.untyped_storage().data_ptr() == st.data_ptr() else (t,):
                if not any(u is v for v in entry[1]):
                    entry[1].append(u)
            entry[2].append(isinstance(m, (Embedding, nn.Embedding)))
    return owners
