"""`torchrun --nproc-per-node N -m dschat ...`: one process per GPU, the model split over them (tensor
parallelism, see engine/dist.py).

Rank 0 is the one the user talks to: it reads stdin and the command line, writes the answer and the
history. The other ranks receive rank 0's input and make the same engine calls without a word: their
stdout and stderr go to /dev/null and they save nothing. Every rank's engine gives the same tokens (the
sums across ranks are identical everywhere, and an unseeded sample uses rank 0's seed)."""

from __future__ import annotations

import io
import os
import sys


def launched() -> bool:
    """Started by torchrun (or anything that sets WORLD_SIZE) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(argv: list[str]) -> list[str]:
    """Join the process group and give every rank rank 0's command line and stdin; returns the argv to run."""
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    box = [None]
    if rank == 0:
        box = [(argv, b"" if sys.stdin.isatty() else sys.stdin.buffer.read())]
    dist.broadcast_object_list(box, src=0, group=dist.new_group(backend="gloo"))
    argv, data = box[0]
    sys.stdin = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8")
    if rank != 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")
        argv = argv + ["--no-save"]
    return argv


def finish():
    dist = sys.modules.get("torch.distributed")  # never import torch just to find out
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
