"""`dschat serve` in figures, each against its peer measured in the same run.

    python benchmarks/bench_serve.py [--model DIR] [--smoke] [--out FILE.json]

1. Decode tokens/s streamed over HTTP (/completion, SSE, on loopback) against the in-process engine, same
   model, same prompt, same number of tokens; the ratio is HTTP / in-process (the issue asks >= 0.95).
2. An editor's keystroke pattern: a file of about 2,000 tokens, a line in its middle being typed, 20 successive
   /infill requests each a few characters further into it, as llama.vim sends them: median time to the response and median
   prefilled tokens per request with the shared prefix cache (cache_prompt true) against cache_prompt false.

3. `dschat "..."` (a one-shot answer, as `dschat -c "..."` is) from its start to the first byte of the answer on
   stdout: against the running server (`--server URL`) and loading the model in the process (`--no-server`),
   alternated, the machine's load average recorded before and after.

--smoke: a few tokens and requests, to check that every step runs (the tests run it).
"""

from __future__ import annotations

import argparse
import http.client
import inspect
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

from dschat.dev.serving import ServerThread
from dschat.engine import Engine, SamplingParams
from dschat.runtime import DEMO_DIR
from dschat.conversation.template import completion_prompt

FULL = {"decode_tokens": 200, "repeats": 3, "file_tokens": 2000, "keystrokes": 20, "starts": 5}
SMOKE = {"decode_tokens": 8, "repeats": 1, "file_tokens": 150, "keystrokes": 3, "starts": 1}


def post(port: int, path: str, body: dict) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    data = json.loads(r.read())
    conn.close()
    if r.status != 200:
        raise RuntimeError(f"{path}: {r.status} {data}")
    return data


def http_decode(port: int, prompt: str, n: int) -> float:
    """Tokens/s after the first, as a streaming client sees them arrive."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = {"prompt": prompt, "n_predict": n, "ignore_eos": True, "temperature": 0, "stream": True}
    conn.request("POST", "/completion", body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    first = last = None
    tokens = 0
    for line in r:
        if not line.startswith(b"data: "):
            continue
        event = json.loads(line[6:])
        now = time.perf_counter()
        first = first or now
        if event.get("stop"):
            tokens = event["tokens_predicted"]
        else:
            last = now
    conn.close()
    return (tokens - 1) / (last - first) if last and last > first else 0.0


def engine_decode(engine, ids: list[int], n: int) -> float:
    first = None
    count = 0
    for _ in engine.generate(ids, SamplingParams(max_tokens=n, ignore_eos=True)):
        count += 1
        first = first or time.perf_counter()
    return (count - 1) / (time.perf_counter() - first)


def source_file(tok, n_tokens: int) -> str:
    """Real Python of about n_tokens tokens (the standard library's textwrap, argparse, ...)."""
    import argparse as a
    text = inspect.getsource(textwrap) + inspect.getsource(a)
    lines, out = text.split("\n"), []
    while lines and len(tok.encode_plain("\n".join(out))) < n_tokens:
        out.extend(lines[:20])
        del lines[:20]
    return "\n".join(out) + "\n"


def keystrokes(port: int, text: str, steps: int, cache: bool) -> tuple[float, float]:
    """(median seconds to the response, median prefilled tokens) of llama.vim-shaped /infill requests while
    a line in the middle of the file is typed: each request a few characters further into it."""
    lines = text.split("\n")
    row = len(lines) // 2
    while len(lines[row]) < 3 * steps + 4:
        row += 1
    before, line, after = "\n".join(lines[:row]) + "\n", lines[row], "\n".join(lines[row + 1:])
    times, prefilled = [], []
    for k in range(steps):
        col = 4 + 3 * k
        body = {"input_prefix": before, "prompt": line[:col], "input_suffix": "\n" + after,
                "input_extra": [], "n_predict": 16, "top_k": 40, "top_p": 0.99, "stream": False,
                "samplers": ["top_k", "top_p", "infill"], "cache_prompt": cache, "t_max_prompt_ms": 500,
                "t_max_predict_ms": 1000}
        t0 = time.perf_counter()
        res = post(port, "/infill", body)
        times.append(time.perf_counter() - t0)
        prefilled.append(res["timings"]["prompt_n"])
    return statistics.median(times), statistics.median(prefilled)


def dschat_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "dschat"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "dschat"]


def first_byte_s(args: list[str]) -> float:
    """Seconds from starting `dschat ARGS` to the first byte of its answer on stdout (it then runs to its end)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(dschat_cmd() + args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    first = p.stdout.read(1)
    t = time.perf_counter() - t0
    rest, err = p.communicate()
    if p.returncode != 0 or not first:
        raise RuntimeError(f"dschat {' '.join(args)}: exit {p.returncode}: {err.decode()[-500:]}")
    return t


def starts(url: str, model: str, n: int) -> tuple[float, float]:
    """(median start-to-first-byte on the server, loading the model here) of a one-shot answer, alternated."""
    ask = ["--no-save", "-t", "0", "-n", "4", "what does os.walk do?"]
    remote, local = [], []
    for _ in range(n):
        remote.append(first_byte_s(["--server", url, *ask]))
        local.append(first_byte_s(["--no-server", "--model", model, *ask]))
    return statistics.median(remote), statistics.median(local)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEMO_DIR), help="model directory (default: the bundled demo)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--smoke", action="store_true", help="a few tokens and requests: check that every step runs")
    ap.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = ap.parse_args(argv)
    cfg = SMOKE if args.smoke else FULL
    engine = Engine.from_pretrained(args.model, device=args.device, speculative="none")
    tok = engine.tokenizer
    results = {"model": Path(args.model).name, "device": args.device, "smoke": args.smoke, **cfg}
    prompt = "import os\n\n\ndef "
    ids = completion_prompt(tok, prompt)[1]
    with ServerThread(engine, names=("bench",), max_tokens=max(4096, cfg["decode_tokens"])) as server:
        print(f"1. decode tokens/s, {cfg['decode_tokens']} tokens ({results['model']}, {args.device})")
        local, remote = [], []
        for _ in range(cfg["repeats"]):  # alternated, so both see the same machine
            local.append(engine_decode(engine, ids, cfg["decode_tokens"]))
            remote.append(http_decode(server.port, prompt, cfg["decode_tokens"]))
        results["in_process_tok_s"] = statistics.median(local)
        results["http_tok_s"] = statistics.median(remote)
        results["http_vs_in_process"] = results["http_tok_s"] / results["in_process_tok_s"]
        print(f"   in-process {results['in_process_tok_s']:8.1f}   HTTP streaming {results['http_tok_s']:8.1f}   "
              f"ratio {results['http_vs_in_process']:.3f}")
        if tok.fim is not None:
            text = source_file(tok, cfg["file_tokens"])
            results["file_tokens"] = len(tok.encode_plain(text))
            print(f"2. editor keystrokes: {cfg['keystrokes']} /infill requests on a {results['file_tokens']}-token "
                  "file")
            for cache in (False, True):
                t, n = keystrokes(server.port, text, cfg["keystrokes"], cache)
                key = "cached" if cache else "uncached"
                results[f"keystroke_{key}_median_s"], results[f"keystroke_{key}_prefilled"] = t, n
                print(f"   cache_prompt {str(cache).lower():5}  median {1000 * t:8.1f} ms  prefilled {n:6.0f} tokens")
            results["keystroke_speedup"] = results["keystroke_uncached_median_s"] / results["keystroke_cached_median_s"]
            print(f"   speed-up with the shared cache: {results['keystroke_speedup']:.2f}x")
        else:
            print("2. skipped: this model's tokenizer has no FIM tokens")
        print(f"3. `dschat \"...\"` start to first token, median of {cfg['starts']}, alternated")
        results["loadavg_before"] = os.getloadavg()[0]
        remote, local = starts(server.url, args.model, cfg["starts"])
        results["loadavg_after"] = os.getloadavg()[0]
        results["start_server_s"], results["start_in_process_s"] = remote, local
        results["start_speedup"] = local / remote
        print(f"   on the server {remote:6.2f} s   loading the model here {local:6.2f} s   "
              f"speed-up {results['start_speedup']:.2f}x   (load average {results['loadavg_before']:.1f} -> "
              f"{results['loadavg_after']:.1f})")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
