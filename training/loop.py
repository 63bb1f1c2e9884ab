"""The training loop: AdamW with warm-up then cosine decay, bf16 autocast on CUDA, batches from worker
processes, a time box, and a state file written every few minutes so that a cut-off run resumes where it was.

With a time box (`budget_s`, the seconds this process may spend in the loop) the run first measures its speed
over a few steps, then fixes the number of steps that fits; the data and the schedule depend only on the seed
and that number, which the report gives (rerunning with --steps N reproduces the run without the time box).
A run that still overruns stops at the end of its budget."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch

from .batches import Batches, Data
from .model import LoadBalancer, losses

MEASURE_AFTER, MEASURE_STEPS = 5, 20  # a time-boxed run times 20 steps after the first 5 to size itself
FILL = 0.97  # of the time left that the sized run plans to use
MTP_WEIGHT = 0.3


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine from lr to lr/10 at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def save_state(path: Path, state: dict):
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


class Trainer:
    def __init__(self, model, data: Data, args, log=print, budget_s: float | None = None):
        self.model, self.data, self.args, self.log, self.budget_s = model, data, args, log, budget_s
        self.device = next(model.parameters()).device
        self.opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
        self.balancer = LoadBalancer(model, rate=1e-3)
        self.step, self.steps, self.seconds, self.history = 0, args.steps, 0.0, []
        self.fixed = budget_s is None  # the number of steps is known (else it is measured first)
        self.stopped_early = False

    # -- state -----------------------------------------------------------------------------------------------
    def state(self, extra: dict) -> dict:
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "step": self.step,
                "steps": self.steps, "fixed": self.fixed, "seconds": self.seconds, "history": self.history, **extra}

    def restore(self, state: dict):
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.step, self.steps, self.fixed = state["step"], state["steps"], state["fixed"]
        self.seconds, self.history = state["seconds"], state["history"]
        self.log(f"resumed at step {self.step} of {self.steps} ({self.seconds:.0f}s trained)")

    # -- the loop ----------------------------------------------------------------------------------------------
    def batches(self):
        workers = self.args.workers
        return iter(torch.utils.data.DataLoader(Batches(self.data, self.step, self.steps, self.args.batch),
                                                batch_size=None, num_workers=workers,
                                                prefetch_factor=4 if workers else None))

    def size_run(self, per_step: float, left: float):
        """Fix the number of steps that fits the time left, from the measured seconds per step."""
        self.steps = min(self.args.steps, self.step + max(1, int(FILL * left / per_step)))
        self.fixed = True
        self.log(f"{per_step:.3f}s per step: {self.steps} steps fit in the {self.budget_s / 60:.1f} minutes")

    def train_step(self, x, y) -> tuple[float, float]:
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step, self.steps, self.args.lr, self.args.warmup)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            main, mtp = losses(self.model, x, y)
            loss = main + MTP_WEIGHT * mtp
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.balancer.step()
        return float(main.detach()), float(mtp.detach())

    def run(self, save):
        """Train to the last step (or the time box); `save(trainer)` writes the state file."""
        self.model.train()
        loader, now, mark = self.batches(), time.time(), None
        started, last_save = now - self.seconds, now  # started: as if never cut off, for the report
        first = max(self.step, MEASURE_AFTER)  # a run resumed before it was sized measures from there
        while self.step < self.steps:
            if not self.fixed and self.step == first:
                mark = time.time()
            if not self.fixed and self.step == first + MEASURE_STEPS:
                self.size_run((time.time() - mark) / MEASURE_STEPS, self.budget_s - (time.time() - now))
                loader = self.batches()
            if self.budget_s is not None and time.time() - now > self.budget_s:
                self.log(f"time is up at step {self.step} of {self.steps}")
                self.stopped_early = True
                break
            x, y = next(loader)
            main, mtp = self.train_step(x, y)
            self.history.append(main)
            self.step += 1
            self.seconds = time.time() - started
            if self.step % self.args.log_every == 0 or self.step == self.steps:
                self.log(f"step {self.step:6d}/{self.steps} {self.data.stage(self.step - 1, self.steps):4s} "
                         f"loss {main:.3f} mtp {mtp:.3f} {self.seconds:6.0f}s")
            if time.time() - last_save > 60 * self.args.save_minutes:
                save(self)
                last_save = time.time()
        self.model.eval()
