"""Tensor parallelism: two real processes (torchrun, gloo on the CPU) split the heads, the MLP columns and
the routed experts; logits and greedy tokens equal a single process's on the same weights."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import call, free_port, run_ranks
from dschat.dev import tiny_checkpoints as tc
import torch

from dschat.engine import Engine, SamplingParams


CASES = [("v2_lite", "dequant"), ("v2", "dequant"), ("v3", "dequant"), ("v3_fp8", "dequant"), ("v3_fp8", "keep")]
IDS = torch.randint(2, 500, (24,), generator=torch.Generator().manual_seed(3)).tolist()


@pytest.fixture(scope="module")
def two_ranks(checkpoints, tmp_path_factory) -> dict:
    """What rank 0 computed for every case, from one torchrun (its start costs more than a case)."""
    out = tmp_path_factory.mktemp("ranks")
    cases = [{"path": checkpoints[kind], "out": out / f"{kind}-{fp8}.pt", "fp8": fp8} for kind, fp8 in CASES]
    return dict(zip(CASES, run_ranks(cases, IDS)))


@pytest.mark.parametrize("kind, fp8", CASES)
def test_two_ranks_compute_what_one_does(checkpoints, two_ranks, kind, fp8):
    ids = IDS
    got = two_ranks[kind, fp8]
    eng = Engine.from_pretrained(checkpoints[kind], device="cpu", dtype=torch.float32,
                                 speculative=tc.drafter(checkpoints[kind]))
    want = eng.logits(ids)
    assert got["ranks"] == 2
    assert float((got["logits"] - want).abs().max() / want.abs().max()) < 1e-4
    greedy = list(eng.generate(ids, SamplingParams(max_tokens=10)))
    assert got["greedy"] == greedy
    assert got["second"] == list(eng.generate(ids + greedy + [7, 8, 9], SamplingParams(max_tokens=6)))
    assert got["cached"] >= len(ids)  # the second turn reused the first one's latent cache on every rank
    first, *others = got["sampled"]
    assert all(o == first for o in others)  # an unseeded sample is the same draw on every rank


def torchrun_dschat(args, stdin: str, ranks: int = 2):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}", f"--master-port={free_port()}",
           "-m", "dschat", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=300, env=env)


def test_dschat_under_torchrun_answers_like_one_process_and_saves_once(chat_models):
    from dschat.history.store import Store

    args = ["--model", str(chat_models["v3"]), "-t", "0", "-n", "12"]
    r = torchrun_dschat(args, "What is MLA?")
    assert r.returncode == 0, r.stderr[-2000:]
    single = call(args, stdin="What is MLA?")  # one process: this one (the entry point; the same output as a run)
    assert single.returncode == 0
    assert r.stdout == single.stdout.decode() and r.stdout.strip()
    convs = Store().list()
    assert len(convs) == 2  # one from the two ranks (rank 0 saves), one from the single process
    # what cannot run on several ranks says so, once
    r = torchrun_dschat(["conversations"], "")
    assert r.returncode != 0
    assert r.stderr.count("dschat: error:") == 1 and "runs in one process" in r.stderr
