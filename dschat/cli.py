"""The `dschat` command: chat (TUI, line mode, pipe mode) and its subcommands."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
from pathlib import Path

DESCRIPTION = """\
dschat: chat with DeepSeek models (V2, V2-Lite, V2.5, Coder-V2, V3, R1) on a local engine.

  dschat                              full-screen chat (TUI) on a terminal
  dschat --plain                      line-mode chat in the terminal's scrollback
  echo "question" | dschat            pipe mode: stdin is the message, the answer goes to stdout
  git diff | dschat "review this"     stdin first, then the prompt
  dschat "what is MLA?"               one answer, then exit
"""

EPILOG = """\
subcommands:
  dschat fim FILE                     fill the <FILL> hole in a file (fill-in-the-middle)
  dschat sessions | export | import | rm | rename | replay
                                      saved conversations (`dschat COMMAND --help` for each)

models: --model takes a local directory in the Hugging Face layout or a hub repo id from the local
cache, e.g. `huggingface-cli download deepseek-ai/DeepSeek-V2-Lite-Chat` then
`dschat --model deepseek-ai/DeepSeek-V2-Lite-Chat`. DSCHAT_MODEL or `model = ...` in
~/.config/dschat/config.toml set a default. With none of these, dschat runs its bundled demo model
(`--model demo`): a 14M-parameter model of the DeepSeek-V3 architecture that we trained on Python's
standard library so that dschat works anywhere, offline, on a CPU. It is a toy, not a DeepSeek release.

several GPUs: `echo question | torchrun --nproc-per-node N -m dschat --model ...` splits the model over
N GPUs (tensor parallelism); rank 0 reads and answers (pipe mode and one-shot answers).
"""

NO_MODEL = (
    "no model given. Get one with `huggingface-cli download deepseek-ai/DeepSeek-V2-Lite-Chat`, then run "
    "`dschat --model deepseek-ai/DeepSeek-V2-Lite-Chat` (or a local directory), or set DSCHAT_MODEL"
)
DEMO_DIR = Path(__file__).resolve().parent / "demo_model"
DEMO_NOTE = (
    "using the bundled demo model (tiny, trained on Python's standard library; not a DeepSeek release). "
    "For a real one: `huggingface-cli download deepseek-ai/DeepSeek-V2-Lite-Chat`, then --model"
)

SUBCOMMANDS = ("fim", "sessions", "export", "import", "rm", "rename", "replay")


class UsageError(Exception):
    """A problem with how dschat was called (exit code 2)."""


# -- shared options ------------------------------------------------------------------------------------
def add_model_options(p: argparse.ArgumentParser):
    g = p.add_argument_group("model")
    g.add_argument("-m", "--model", help="model directory, hub repo id, or `demo` (default: $DSCHAT_MODEL, then the "
                                          "config file, then the bundled demo)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when there is a GPU)")
    g.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and activations (default: bfloat16 on GPU, float32 on CPU)")
    g.add_argument("--fp8", choices=["dequant", "keep"], default="dequant",
                   help="FP8 checkpoints (V3, R1): dequantise the weights on load (default; fastest), or keep "
                        "them in FP8, half the memory of bf16, dequantised as each layer runs")
    g.add_argument("--cache-gb", type=float, default=None, metavar="GB",
                   help="size of the latent KV cache pool (default: a share of free memory)")
    g.add_argument("--speculative", choices=["mtp", "ngram", "none"], default=None,
                   help="draft tokens with V3's MTP module or by prompt lookup (default: mtp when the model "
                        "has it, else ngram)")
    g.add_argument("--draft-tokens", type=int, default=None, metavar="K", help="tokens drafted per step")


def add_sampling_options(p: argparse.ArgumentParser):
    g = p.add_argument_group("sampling (defaults: the model's generation_config.json, then the config file)")
    g.add_argument("-t", "--temperature", type=float, default=None, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None, help="0 = no limit")
    g.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    g.add_argument("-n", "--max-tokens", type=int, default=None, help="longest reply, in tokens")


def add_output_options(p: argparse.ArgumentParser):
    p.add_argument("--stats", action="store_true",
                   help="after each reply print one JSON line of statistics on stderr")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")


def chat_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dschat", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="*", help="the message (after stdin, when stdin is piped)")
    p.add_argument("-s", "--system", metavar="TEXT", help="system prompt")
    p.add_argument("--raw", action="store_true", help="no chat template: plain text completion (base models)")
    p.add_argument("--show-prompt", action="store_true",
                   help='print the exact prompt as JSON {"text": ..., "ids": [...]} and exit')
    p.add_argument("--plain", action="store_true", help="line-mode chat instead of the full-screen TUI")
    p.add_argument("-c", "--continue", dest="cont", action="store_true",
                   help="continue the most recent conversation")
    p.add_argument("--session", metavar="ID", help="continue the conversation with this id")
    p.add_argument("--no-save", action="store_true", help="do not save this conversation in the history")
    p.add_argument("--theme", help="TUI theme")
    add_model_options(p)
    add_sampling_options(p)
    add_output_options(p)
    return p


# -- resolving settings ------------------------------------------------------------------------------------
def settings():
    from .config import Settings

    return Settings.load()


def model_name(args, conf) -> str:
    """--model, then $DSCHAT_MODEL, then the config file, then the bundled demo ("demo" names it)."""
    name = args.model or os.environ.get("DSCHAT_MODEL") or conf.model
    if name == "demo":
        return str(DEMO_DIR)
    if name:
        return name
    if os.environ.get("DSCHAT_NO_DEMO") or not (DEMO_DIR / "config.json").exists():
        raise UsageError(NO_MODEL)
    sys.stderr.write(f"dschat: {DEMO_NOTE}\n")
    return str(DEMO_DIR)


def is_demo(path) -> bool:
    return Path(path).resolve() == DEMO_DIR


def default_device(args, conf) -> str:
    dev = args.device or conf.device
    if dev and dev != "auto":
        return dev
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_engine(args, conf, progress=None):
    from dschat.engine import Engine

    return Engine.from_pretrained(model_name(args, conf), device=default_device(args, conf),
                                  dtype=args.dtype or conf.dtype, cache_gb=args.cache_gb,
                                  speculative=args.speculative, draft_tokens=args.draft_tokens,
                                  progress=progress, fp8=getattr(args, "fp8", "dequant"))


def sampling_params(args, conf, engine, prompt_len: int):
    """Flags, then the config file, then the model's generation_config.json, then built-in defaults."""
    from dschat.engine import SamplingParams

    gen = engine.generation_config

    def pick(flag, conf_value, gen_key, default):
        for v in (flag, conf_value, gen.get(gen_key) if gen_key else None):
            if v is not None:
                return v
        return default

    temperature = pick(args.temperature, conf.temperature, "temperature", 0.6)
    if args.temperature is None and conf.temperature is None and gen.get("do_sample") is False:
        temperature = 0.0
    room = engine.context_length - prompt_len
    max_tokens = pick(args.max_tokens, conf.max_tokens, "max_new_tokens", min(2048, room))
    if room < 1:
        from dschat.engine import ContextLengthError

        raise ContextLengthError(f"the prompt ({prompt_len} tokens) fills the context window "
                                 f"({engine.context_length} tokens)")
    return SamplingParams(temperature=float(temperature), top_p=float(pick(args.top_p, conf.top_p, "top_p", 1.0)),
                          top_k=int(pick(args.top_k, conf.top_k, "top_k", 0)), seed=args.seed,
                          max_tokens=int(min(max_tokens, room)))


def print_stats(engine, file=None):
    keys = ("prompt_tokens", "cached_tokens", "generated_tokens", "ttft_s", "decode_tokens_per_s", "draft_tokens",
            "accepted_tokens")
    s = engine.stats
    out = {k: (round(s[k], 4) if isinstance(s.get(k), float) else s.get(k)) for k in keys}
    print(json.dumps(out), file=file or sys.stderr, flush=True)


def read_stdin() -> str:
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"stdin is not valid UTF-8 text (byte {e.start})") from None


# -- chat: pipe mode / one-shot ------------------------------------------------------------------------------------
def run_chat(argv: list[str]) -> int:
    args = chat_parser().parse_args(argv)
    conf = settings()
    piped = not sys.stdin.isatty()
    prompt = " ".join(args.prompt)
    if piped:
        text = read_stdin()
        message = text.rstrip("\n") + ("\n\n" + prompt if prompt else "") if text.strip() else prompt
    else:
        message = prompt
    if not piped and not message and not args.show_prompt:
        if not sys.stdout.isatty():
            raise UsageError("the chat needs a terminal on stdout; to write an answer elsewhere, give the "
                             "message on stdin or as an argument")
        if args.plain:
            from .linemode import run_line_mode

            return run_line_mode(args, conf)
        from .tui import run_tui

        return run_tui(args, conf)
    if not message.strip():
        from .ranks import launched

        raise UsageError("under torchrun dschat answers a message on stdin or as an argument (the TUI and "
                         "line mode run in one process)" if launched() else
                         "nothing to answer: stdin and the prompt are empty")
    return answer_once(args, conf, message)


def answer_once(args, conf, message: str) -> int:
    from .chat import Chat
    from .sessions import open_conversation, save_turn

    system = args.system if args.system is not None else conf.system
    if args.show_prompt:
        return show_prompt(args, conf, message, system)
    engine = load_engine(args, conf)
    chat, conv = open_conversation(args, engine, system)
    turn = chat.turn(message)
    params = sampling_params(args, conf, engine, len(turn.prompt_ids))
    out = sys.stdout
    wrote_newline = True
    try:
        for piece in chat.stream(turn, params):
            out.write(piece)
            out.flush()
            wrote_newline = piece.endswith("\n")
    except KeyboardInterrupt:
        turn.interrupted = True
        raise
    finally:
        if turn.output_ids or turn.interrupted:
            chat.commit(turn)
            save_turn(args, conv, chat, turn, engine)
        if not wrote_newline:
            out.write("\n")
            out.flush()
    if args.stats:
        print_stats(engine)
    return 0


def show_prompt(args, conf, message, system) -> int:
    """The exact prompt that would run, without loading the weights."""
    from dschat.engine.loader import resolve
    from dschat.engine.tokenizer import Tokenizer

    from .chat import Chat

    class _NoWeights:  # the tokenizer is all Chat needs to build a prompt
        pass

    eng = _NoWeights()
    eng.tokenizer = Tokenizer.from_dir(resolve(model_name(args, conf)))
    chat = Chat(eng, system=system, raw=args.raw)
    turn = chat.turn(message)
    print(json.dumps({"text": turn.prompt_text, "ids": turn.prompt_ids}, ensure_ascii=False))
    return 0


# -- entry point ----------------------------------------------------------------------------------------------
def show_warning(message, category, filename, lineno, file=None, line=None):
    """Warnings (a stale cache file, say) as one line on stderr."""
    sys.stderr.write(f"dschat: warning: {message}\n")


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    if not debug:
        import warnings

        warnings.showwarning = show_warning
    from . import ranks

    try:
        if ranks.launched():
            argv = ranks.start(argv)
            if argv and argv[0] in SUBCOMMANDS:
                raise UsageError(f"`dschat {argv[0]}` runs in one process; under torchrun dschat answers a "
                                 "message on stdin or as an argument")
        if argv and argv[0] in SUBCOMMANDS:
            from . import commands

            code = commands.run(argv[0], argv[1:])
        else:
            code = run_chat(argv)
    except KeyboardInterrupt:
        sys.stderr.write("\ndschat: interrupted\n")
        code = 130
    except BrokenPipeError:
        # the reader went away (`dschat ... | head`): say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = 128 + signal.SIGPIPE
    except Exception as e:  # one readable line, no traceback (unless --debug)
        if debug:
            traceback.print_exc()
        code = 2 if isinstance(e, UsageError) else 1
        sys.stderr.write(f"dschat: error: {error_text(e)}\n")
    finally:
        ranks.finish()
    sys.exit(code)


def error_text(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return " ".join(text.split("\n")[0].split()) if "\n" in text else text
