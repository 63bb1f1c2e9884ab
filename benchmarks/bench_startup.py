"""Start-up of a new `dschat` command, two checkouts against each other in the same run.

    python benchmarks/bench_startup.py /path/to/before-checkout [/path/to/after-checkout] [--pairs 7]

Each side is a checkout with its own `.venv` (its `dschat` is `.venv/bin/dschat`) or a `dschat` executable;
the second defaults to this checkout. The command timed is `echo hi | dschat -n 1` (change it with
--args and --input): import, load the bundled demo model, answer one token, save the conversation.
Runs are interleaved (before, after, then after, before, ...), so load from other processes on a shared
machine falls on both sides alike, after one untimed warm-up run per side (Python's bytecode caches, the
history database). For each side it prints the median wall time and the median CPU time (user + sys of
the process and its threads, less sensitive to other load), and the after/before ratios of the medians,
with the load average when the runs began and ended. Each side gets its own fresh data, config and cache
directories, offline. On a busy machine PyTorch's worker threads wait for each other far longer than the
work takes; --threads 1 (OMP_NUM_THREADS for both sides) shows the work itself.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def executable(side: str) -> Path:
    """A checkout's `.venv/bin/dschat`, or the path itself when it is a file."""
    path = Path(side)
    exe = path / ".venv" / "bin" / "dschat" if path.is_dir() else path
    if not exe.is_file():
        sys.exit(f"bench_startup: no dschat at {exe}")
    return exe


def side_env(home: Path, threads: int | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DSCHAT_MODEL"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    env.update(HF_HUB_OFFLINE="1", XDG_DATA_HOME=str(home / "data"), XDG_CONFIG_HOME=str(home / "config"),
               XDG_CACHE_HOME=str(home / "cache"))
    return env


def run_once(exe: Path, args: list[str], stdin: bytes, env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + sys) of one run."""
    start = time.perf_counter()
    proc = subprocess.Popen([str(exe), *args], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env)
    proc.stdin.write(stdin)
    proc.stdin.close()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"bench_startup: {exe} exited {proc.returncode}: {err.decode(errors='replace').strip()}")
    return wall, usage.ru_utime + usage.ru_stime


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", help="a checkout with a .venv, or a dschat executable")
    ap.add_argument("after", nargs="?", default=str(ROOT), help="the same (default: this checkout)")
    ap.add_argument("--pairs", type=int, default=7)
    ap.add_argument("--args", default="-n 1", help="dschat's arguments (default: %(default)s)")
    ap.add_argument("--input", default="hi\n", help="what goes to stdin (default: 'hi')")
    ap.add_argument("--threads", type=int, help="PyTorch's threads on both sides (default: its own choice)")
    opts = ap.parse_args(argv)
    sides = {"before": executable(opts.before), "after": executable(opts.after)}
    args, stdin = shlex.split(opts.args), opts.input.encode()
    with tempfile.TemporaryDirectory() as tmp:
        envs = {name: side_env(Path(tmp) / name, opts.threads) for name in sides}
        for name, exe in sides.items():
            run_once(exe, args, stdin, envs[name])
        threads = f", OMP_NUM_THREADS={opts.threads}" if opts.threads else ""
        print(f"{opts.pairs} pairs of `{shlex.join(['dschat', *args])}`{threads}, load average at start {load()}")
        results = {name: [] for name in sides}
        for i in range(opts.pairs):
            for name in (("before", "after") if i % 2 == 0 else ("after", "before")):
                results[name].append(run_once(sides[name], args, stdin, envs[name]))
    print(f"load average at end {load()}")
    print(f"{'':8} {'wall median s':>14} {'wall min s':>11} {'cpu median s':>13}")
    medians = {}
    for name, runs in results.items():
        walls, cpus = [w for w, _ in runs], [c for _, c in runs]
        medians[name] = statistics.median(walls), statistics.median(cpus)
        print(f"{name:8} {medians[name][0]:>14.3f} {min(walls):>11.3f} {medians[name][1]:>13.3f}")
    (wb, cb), (wa, ca) = medians["before"], medians["after"]
    print(f"after / before: wall {wa / wb:.3f}, cpu {ca / cb:.3f}")


if __name__ == "__main__":
    main()
