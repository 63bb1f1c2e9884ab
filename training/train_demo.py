"""Train dschat's bundled demo model: a small DeepSeek-V3-architecture model on Python's standard library.

    python training/train_demo.py --out dschat/demo_model --minutes 17 --device cuda   # the shipped model (GPU)
    python training/train_demo.py --tiny --steps 20 --out /tmp/demo                    # a smoke test on the CPU
    python training/train_demo.py --dry-run                                            # what would be trained
    python training/train_demo.py --dump-data 8 > rows.jsonl                           # the first 8 rows
    python training/train_demo.py --evaluate dschat/demo_model --report report.json    # figures, on the CPU

All from a seed: the corpus (corpus.py; every 20th module held out), a byte-level BPE tokenizer (tokens.py),
batches that are a pure function of (seed, step) (batches.py) mixing plain code, fill-in-the-middle examples
cut as `dschat fim` cuts files (fim_data.py) and chat generated from the library (chat_data.py); a V3-style
model with MTP (model.py); export in the hub layout (export.py); evaluation on the CPU (evaluate.py).
"""

from __future__ import annotations

import time

PROCESS_START = time.time()  # --minutes counts from here

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402


import torch  # noqa: E402

from dschat.engine.config import ModelConfig  # noqa: E402
from dschat.engine.errors import ModelError  # noqa: E402
from dschat.fim.core import FimParams  # noqa: E402
from dschat.training.batches import Data  # noqa: E402
from dschat.training.chat_data import CHAT_MODULES, TINY_MODULES, chat_pairs  # noqa: E402
from dschat.training.corpus import TINY_FILES, split, stdlib_files  # noqa: E402
from dschat.training.evaluate import evaluate  # noqa: E402
from dschat.training.export import export, shipped_bytes, write_json  # noqa: E402
from dschat.training.loop import Trainer, save_state  # noqa: E402
from dschat.training.model import MAX_POSITIONS, MAX_SHIPPED_MB, SIZES, build_model, model_config, n_params  # noqa: E402
from dschat.training.tokens import app_tokenizer, from_json, train_tokenizer  # noqa: E402

FIM_CONTEXT = FimParams.context  # what `dschat fim` sends by default
FIM_MIDDLE = FimParams.max_tokens
TINY = {"context": 96, "max_middle": 32}
EXPORT_SECONDS = 30  # kept back from --minutes for the export


class TrainError(Exception):
    pass


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="where the model is written (the hub layout)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", choices=list(SIZES), default="base", help="model size preset (default base)")
    ap.add_argument("--tiny", action="store_true", help="tiny model, corpus and contexts, for tests")
    ap.add_argument("--vocab", type=int, default=None, help="tokenizer size (default: the size preset's)")
    ap.add_argument("--context", type=int, default=None,
                    help=f"FIM prompt budget in tokens, as `dschat fim --context` (default {FIM_CONTEXT})")
    ap.add_argument("--max-middle", type=int, default=None,
                    help=f"longest FIM middle in tokens (default {FIM_MIDDLE}, `dschat fim`'s -n)")
    ap.add_argument("--seq", type=int, default=None, help="training sequence length (default context + middle + 8)")
    ap.add_argument("--batch", type=int, default=16, help="rows per step")
    ap.add_argument("--steps", type=int, default=100000, help="steps (an upper bound with --minutes)")
    ap.add_argument("--minutes", type=float, default=None,
                    help="time box for the whole run (setup and export included; the loop gets the rest)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100, help="warm-up steps")
    ap.add_argument("--workers", type=int, default=None, help="data worker processes (default on CUDA: up to 12, else 0)")
    ap.add_argument("--state", type=Path, default=None, help="resumable state file (default OUT.state.pt)")
    ap.add_argument("--resume", action="store_true", help="continue from the state file")
    ap.add_argument("--save-minutes", type=float, default=2.0, help="write the state file this often")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--dry-run", action="store_true", help="build the data and the model, print the plan, stop")
    ap.add_argument("--dump-data", type=int, metavar="N", help="print the first N training rows as JSON lines")
    ap.add_argument("--eval", type=int, default=0, help="after training, evaluate with N holes of each kind")
    ap.add_argument("--evaluate", type=Path, metavar="DIR", help="only evaluate the model in DIR (on the CPU)")
    ap.add_argument("--report", type=Path, help="with --evaluate: also write the figures into this JSON file")
    ap.add_argument("--starts", type=int, default=5, help="dschat start-ups timed by the evaluation")
    ap.add_argument("--chat-tokens", type=int, default=128, help="longest chat answer in the evaluation")
    return ap


def settle(args):
    """Fill in the defaults that depend on --tiny and the size preset; refuse sizes that do not fit."""
    if args.tiny:
        args.size = "tiny"
        torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and kind to a shared machine
    tiny = args.size == "tiny"
    args.vocab = args.vocab or SIZES[args.size]["vocab"]
    args.context = args.context or (TINY["context"] if tiny else FIM_CONTEXT)
    args.max_middle = args.max_middle or (TINY["max_middle"] if tiny else FIM_MIDDLE)
    args.seq = args.seq or args.context + args.max_middle + 8
    args.workers = args.workers if args.workers is not None else (
        min(12, (os.cpu_count() or 4) - 2) if args.device.startswith("cuda") else 0)
    if args.seq < args.context + args.max_middle + 8:
        raise TrainError(f"--seq {args.seq} cannot hold a FIM prompt of --context {args.context} tokens plus a "
                         f"middle of {args.max_middle}: use --seq {args.context + args.max_middle + 8} or more")
    if args.state is None and args.out:
        args.state = args.out.with_name(args.out.name + ".state.pt")
    if not (args.out or args.dry_run or args.dump_data):
        raise TrainError("--out DIR is needed (or --dry-run, --dump-data N, --evaluate DIR)")
    if args.resume and not (args.state and args.state.exists()):
        raise TrainError(f"--resume: no state file at {args.state}")


def log(text: str):
    """Progress goes to stderr; stdout carries only results (rows, the report)."""
    print(text, file=sys.stderr, flush=True)


def prepare(args, tokenizer_json: str | None = None):
    """(train files, held-out files, tokenizer, data) for the run."""
    files = stdlib_files(limit=TINY_FILES if args.tiny else None)
    train_files, test_files = split(files)
    log(f"corpus: {len(train_files)} training files, {len(test_files)} held out "
        f"({sum(len(t) for _, t in files) / 1e6:.1f} MB, Python {sys.version.split()[0]})")
    tok = from_json(tokenizer_json) if tokenizer_json else app_tokenizer(
        train_tokenizer([t for _, t in train_files], args.vocab))
    pairs = chat_pairs(TINY_MODULES if args.tiny else CHAT_MODULES, train_files)
    data = Data(tok, train_files, pairs, args.seq, args.context, args.max_middle, args.seed)
    log(f"tokenizer: {len(tok)} tokens; {len(data.stream) / 1e6:.2f}M training tokens; {len(pairs)} chat pairs; "
        f"rows of {args.seq} tokens, FIM prompts cut to {args.context}")
    return train_files, test_files, tok, data


def dump(data: Data, tok, n: int, steps: int, batch: int):
    for i in range(n):
        ids, labels, kind = data.row(i, data.stage(i // batch, steps))
        learnt = [t for t in labels if t != -100]
        print(json.dumps({"row": i, "step": i // batch, "kind": kind, "tokens": len(ids),
                          "text": tok.decode(ids), "learnt": tok.decode(learnt)}, ensure_ascii=False))


def plan(args, model, cfg_dict) -> dict:
    mb = shipped_bytes(model) / 2**20
    return {"size": args.size, "params_M": round(n_params(model) / 1e6, 2), "shipped_MB": round(mb, 1),
            "config": {k: cfg_dict[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "n_routed_experts",
                                                "max_position_embeddings")},
            "seq": args.seq, "batch": args.batch, "steps": args.steps, "minutes": args.minutes}


def train(args):
    state = torch.load(args.state, weights_only=False) if args.resume else None
    if state and state["run"] != run_key(args):
        raise TrainError(f"{args.state}: a different run ({state['run']}); drop --resume or match its options")
    t_start = PROCESS_START
    train_files, test_files, tok, data = prepare(args, state and state["tokenizer"])
    if args.dump_data:
        return dump(data, tok, args.dump_data, args.steps, args.batch)
    cfg_dict = model_config(args.size, len(tok), max(args.seq, MAX_POSITIONS))
    model = build_model(ModelConfig.from_dict(cfg_dict), torch.device(args.device), args.seed)
    info = plan(args, model, cfg_dict)
    log(f"model: {json.dumps(info)}")
    if info["shipped_MB"] > MAX_SHIPPED_MB:
        raise TrainError(f"--size {args.size}: {info['shipped_MB']} MB in bf16, over the {MAX_SHIPPED_MB} MB limit")
    if args.dry_run:
        return dry_run(data, args)
    trainer = Trainer(model, data, args, log, budget(args, t_start))
    if state:
        trainer.restore(state)
    extra = {"run": run_key(args), "tokenizer": tok.tk.to_str()}
    trainer.run(lambda t: save_state(args.state, t.state(extra)))
    report = training_report(info, trainer, args)
    export(model, tok.tk, cfg_dict, args.out, report)
    if args.eval:
        report.update(evaluate(args.out, test_files, args.eval, args.seed, args.context, 4 if args.tiny else 64,
                               args.starts, args.chat_tokens))
    report["total_seconds"] = round(time.time() - t_start, 1)
    write_json(args.out / "training_report.json", report)
    if args.state.exists():
        args.state.unlink()
    print(json.dumps({k: v for k, v in report.items() if k != "chat"}), flush=True)


def budget(args, t_start: float) -> float | None:
    """Seconds the training loop may take: --minutes covers the whole run, setup and export included."""
    if not args.minutes:
        return None
    left = 60 * args.minutes - (time.time() - t_start) - EXPORT_SECONDS
    if left <= 0:
        raise TrainError(f"--minutes {args.minutes}: setting up took {time.time() - t_start:.0f}s, which leaves "
                         "no time to train")
    return left


def dry_run(data: Data, args):
    counts = {}
    for _, _, kind in data.rows(0, args.steps, args.batch):
        counts[kind] = counts.get(kind, 0) + 1
    log(f"dry run: step 0 has rows {json.dumps(counts)}; nothing trained or written")


def training_report(info: dict, trainer: Trainer, args) -> dict:
    history = trainer.history
    return {**info, "steps": trainer.step, "planned_steps": trainer.steps, "stopped_early": trainer.stopped_early,
            "train_seconds": round(trainer.seconds, 1), "first_loss": history[0] if history else None,
            "last_loss": history[-1] if history else None, "seed": args.seed,
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "python": sys.version.split()[0], "reproduce": reproduce(args, trainer.steps)}


def run_key(args) -> dict:
    """What a resumed run must share with the one it continues."""
    return {k: getattr(args, k) for k in ("seed", "size", "tiny", "vocab", "context", "max_middle", "seq", "batch",
                                          "lr", "warmup")}


def reproduce(args, steps: int) -> str:
    """The command that repeats this run's data and schedule, without the time box."""
    flags = "--tiny" if args.tiny else f"--size {args.size}"
    return (f"python training/train_demo.py --out {args.out} {flags} --seed {args.seed} --steps {steps} "
            f"--batch {args.batch} --seq {args.seq} --context {args.context} --lr {args.lr} --warmup {args.warmup}")


def only_evaluate(args):
    if not (args.evaluate / "config.json").exists():
        raise TrainError(f"{args.evaluate}: not a model directory (no config.json)")
    if args.tiny:
        torch.set_num_threads(1)
    _, test_files = split(stdlib_files(limit=TINY_FILES if args.tiny else None, tests=False))
    report = evaluate(args.evaluate, test_files, args.eval or 200, args.seed, args.context or FIM_CONTEXT,
                      4 if args.tiny else 64, args.starts, args.chat_tokens)
    if args.report:  # merged into a report already there (a training report gains the figures)
        merged = json.loads(args.report.read_text(encoding="utf-8")) if args.report.exists() else {}
        write_json(args.report, {**merged, **report})
    print(json.dumps(report, indent=2, ensure_ascii=False))


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.evaluate:
            only_evaluate(args)
        else:
            settle(args)
            train(args)
    except (TrainError, ModelError, OSError, ValueError) as e:
        sys.stderr.write(f"train_demo: {e}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
