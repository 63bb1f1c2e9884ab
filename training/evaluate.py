"""Evaluation of a model directory on the CPU, through the app's own code paths.

  held-out loss     nats per token over 512-token windows of the held-out modules;
  FIM               holes cut in held-out files (fim_data's kinds), filled by `dschat fim`'s own `fill` (trim,
                    prompt, greedy, stops, suffix-repeat cut): exact match on single-line holes, and on
                    multi-line blocks, plus mean edit similarity (difflib ratio) of insertion and truth;
  MTP               acceptance of the drafts (greedy, K=1) continuing held-out code, and tokens per forward
                    pass of the main model;
  chat              the 20 held-out questions of chat_eval.json, asked as `echo Q | dschat -t 0` asks them;
                    an answer is right when it names one of the expected modules or functions;
  start-up          seconds from starting `echo hi | dschat -n 1` to its first byte out (median of 5).
"""

from __future__ import annotations

import difflib
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dschat.conversation.chat import Chat
from dschat.engine import Engine, SamplingParams
from dschat.fim.core import FimParams, fill

from .chat_data import eval_questions
from .fim_data import line_table, pick_hole

LOSS_SEQ = 512
CHAT_TOKENS = 128
STARTS = 5


@torch.no_grad()
def heldout_loss(model, tok, files, windows: int, seq: int = LOSS_SEQ) -> float:
    stream = [i for enc in tok.tk.encode_batch([t for _, t in files], add_special_tokens=False) for i in enc.ids]
    device = next(model.parameters()).device
    total = count = 0
    for k in range(windows):
        start = (k * 7919 * seq) % max(1, len(stream) - seq - 1)
        w = torch.tensor([stream[start:start + seq + 1]], device=device)
        if w.shape[1] < seq + 1:
            continue
        logits = model.head(model(w[:, :-1], torch.arange(seq, device=device)))
        total += float(F.cross_entropy(logits[0].float(), w[0, 1:]))
        count += 1
    return total / max(1, count)


def holes(files, n: int, kind: str, seed: int) -> list[tuple[str, int, int]]:
    """n holes of a kind in the held-out files, the same for every model evaluated with this seed."""
    rng, out = random.Random(f"{seed}/eval/{kind}"), []
    while len(out) < n:
        text = rng.choice(files)[1]
        hole = pick_hole(line_table(text), rng, kind)
        if hole:
            out.append((text, *hole))
    return out


def fim_scores(eng, cases, context: int) -> dict:
    """Each hole filled exactly as `dschat fim --context CONTEXT` fills it (greedy). Insertions are capped at
    twice the truth's tokens plus 16 (an insertion that long is wrong anyway; this keeps the CPU run short)."""
    tok = eng.tokenizer
    exact = first_line = 0
    similarity = []
    for text, a, b in cases:
        truth = text[a:b]
        cap = 2 * len(tok.encode(truth)) + 16
        params = FimParams(context=min(context, eng.context_length - cap - 8), max_tokens=cap)
        insertion, _ = fill(eng, tok, text[:a] + text[b:], a, params)
        exact += insertion == truth
        first_line += insertion.split("\n")[0].strip() == truth.split("\n")[0].strip()
        similarity.append(difflib.SequenceMatcher(None, insertion, truth).ratio())
    n = max(1, len(cases))
    return {"holes": len(cases), "exact_match": round(exact / n, 4), "first_line_match": round(first_line / n, 4),
            "edit_similarity": round(sum(similarity) / n, 4)}


def mtp_scores(eng, files, n: int, seed: int) -> dict:
    rng = random.Random(f"{seed}/eval/mtp")
    tok = eng.tokenizer
    generated = steps = drafts = accepted = 0
    for _ in range(n):
        text = rng.choice(files)[1]
        start = rng.randrange(0, max(1, len(text) - 1500))
        ids = [tok.bos_token_id] + tok.encode(text[start:start + 1500])[-400:]
        list(eng.generate(ids, SamplingParams(max_tokens=48, ignore_eos=True)))
        s = eng.stats
        generated, steps = generated + s.generated_tokens - 1, steps + s.forwards
        drafts, accepted = drafts + s.draft_tokens, accepted + s.accepted_tokens
    return {"prompts": n, "draft_tokens": drafts, "acceptance": round(accepted / max(1, drafts), 4),
            "tokens_per_forward": round(generated / max(1, steps), 4)}


def names_one(answer: str, expect: list[str]) -> bool:
    return any(name in answer for name in expect)


def chat_scores(eng, max_tokens: int = CHAT_TOKENS) -> dict:
    answers = []
    for q in eval_questions():
        chat = Chat(eng.tokenizer)
        turn = chat.turn(q["question"])
        tokens = eng.generate(turn.prompt_ids, SamplingParams(max_tokens=max_tokens))
        text = "".join(chat.stream(turn, tokens)).strip()
        answers.append({"question": q["question"], "answer": text, "right": names_one(text, q["expect"])})
    return {"right": sum(a["right"] for a in answers), "questions": len(answers), "answers": answers}


def first_token_seconds(model_dir: Path, runs: int = STARTS) -> dict:
    """`echo hi | dschat --model DIR -n 1 -t 0 --no-save --device cpu`, timed from start to its first byte on
    stdout, with empty config, data and cache directories (a cold start)."""
    times = []
    with tempfile.TemporaryDirectory() as home:
        env = dict(os.environ, HF_HUB_OFFLINE="1", XDG_CONFIG_HOME=f"{home}/c", XDG_DATA_HOME=f"{home}/d",
                   XDG_CACHE_HOME=f"{home}/k")
        cmd = [sys.executable, "-m", "dschat", "--model", str(model_dir), "-n", "1", "-t", "0", "--no-save",
               "--device", "cpu"]
        for _ in range(runs):
            with tempfile.TemporaryFile() as stdin, tempfile.TemporaryFile() as err:
                stdin.write(b"hi\n")
                stdin.seek(0)
                t0 = time.perf_counter()
                p = subprocess.Popen(cmd, stdin=stdin, stdout=subprocess.PIPE, stderr=err, env=env)
                p.stdout.read(1)
                times.append(time.perf_counter() - t0)
                p.stdout.read()
                if p.wait():
                    err.seek(0)
                    raise RuntimeError(f"dschat exited with {p.returncode}: {err.read().decode()[-300:]}")
    return {"median_s": round(statistics.median(times), 3), "runs_s": [round(t, 3) for t in times]}


def evaluate(model_dir: Path, files, n: int, seed: int, context: int, loss_windows: int = 64,
             starts: int = STARTS, chat_tokens: int = CHAT_TOKENS) -> dict:
    """Every figure for the model in `model_dir`, on the CPU in float32 (n holes of each kind, n MTP prompts)."""
    plain = Engine.from_pretrained(model_dir, dtype=torch.float32, speculative="none")
    mtp = Engine.from_pretrained(model_dir, dtype=torch.float32, speculative="mtp", draft_tokens=1)
    steps = {
        "heldout_loss": lambda: round(heldout_loss(plain.model, plain.tokenizer, files, loss_windows), 4),
        "fim_single_line": lambda: fim_scores(plain, holes(files, n, "line", seed), context),
        "fim_multi_line": lambda: fim_scores(plain, holes(files, n, "block", seed), context),
        "mtp_k1": lambda: mtp_scores(mtp, files, n, seed),
        "chat": lambda: chat_scores(plain, chat_tokens),
        "start_to_first_token": lambda: first_token_seconds(model_dir, starts),
    }
    report = {}
    for name, measure in steps.items():
        t0 = time.perf_counter()
        report[name] = measure()
        print(f"evaluate: {name} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
    return {
        **report,
        "evaluated_on": {"device": "cpu", "dtype": "float32", "python": sys.version.split()[0],
                         "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                         "load_average": round(os.getloadavg()[0], 1), "holes_per_kind": n, "seed": seed},
    }
