"""How many threads the CPU runs a model on: few for a small model, never more than the cores free.

A decode step of a model whose weights fit in the caches is overhead-bound (the bundled demo model: ~2,000
small ops per token): a second thread buys nothing and, when another process holds a core, every op waits
for it (measured on 2 shared cores: 318-340 tok/s on one thread, 3-89 on two with one busy process beside
it). A bandwidth-bound model (hundreds of MB read per token) gains from every core that is really free.
`--threads N` / `threads = N` in the config file override the choice; `--stats` reports it (`threads`).
"""

from __future__ import annotations

import os

SMALL_MODEL_BYTES = 64 * 2**20  # weights read per token below this: one thread


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def free_cores(own: float = 1.0) -> int:
    """Cores not busy with other processes: this process's cores less the 1-minute load average, from which
    `own` (this process, loading the model meanwhile) is taken off first; at least 1."""
    try:
        others = max(0.0, os.getloadavg()[0] - own)
    except OSError:  # pragma: no cover
        others = 0.0
    return max(1, cores() - int(others + 0.5))


def choose_threads(bytes_per_token: int, requested: int | None = None) -> int:
    """The thread count for a model that reads `bytes_per_token` bytes of weights per decoded token."""
    if requested:
        return requested
    if bytes_per_token < SMALL_MODEL_BYTES:
        return 1
    return free_cores()
