"""The `dschat` command: its parser and its dispatch to the chat (TUI, line mode, pipe mode) and the
subcommands. Nothing imports this module."""

from __future__ import annotations

import argparse
import difflib
import os
import signal
import sys
import traceback

from dschat.cli import commands
from dschat.cli import quantize
from dschat.cli import ranks
from dschat.settings.config import Settings
from dschat.errors import UsageError, error_text
from dschat.cli.flags import add_model_options, add_output_options, add_sampling_options, add_server_options
from dschat.runtime import Options
from dschat.signals import exit_code, stop_on_signals, stop_received
from dschat.terminal.text import say

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
  dschat serve                        an HTTP server (OpenAI, llama.cpp and ollama APIs) for editors
  dschat conversations | export | import | rm | rename | replay
                                      saved conversations (`dschat COMMAND --help` for each)
  dschat quantize MODEL --quant int4 -o DIR
                                      write MODEL with int8 / int4 weights; --model DIR loads it

models: --model takes a local directory in the Hugging Face layout or a hub repo id from the local
cache, e.g. `hf download deepseek-ai/DeepSeek-V2-Lite-Chat` then
`dschat --model deepseek-ai/DeepSeek-V2-Lite-Chat`. DSCHAT_MODEL or `model = ...` in
~/.config/dschat/config.toml set a default. With none of these, dschat runs its bundled demo model
(`--model demo`): a 14M-parameter model of the DeepSeek-V3 architecture that we trained on Python's
standard library so that dschat works anywhere, offline, on a CPU. It is a toy, not a DeepSeek release.

several GPUs: `echo question | torchrun --nproc-per-node N -m dschat --model ...` splits the model over
N GPUs (tensor parallelism); rank 0 reads and answers (pipe mode and one-shot answers).
"""

SUBCOMMANDS = ("fim", "serve", "conversations", "sessions", "export", "import", "rm", "rename", "replay",  # sessions:
               "quantize")  # the old name of conversations


# One word that is not a command but looks like one was probably meant as one (the model is not asked).
MEANT = {"show": "export", "list": "conversations", "ls": "conversations", "history": "conversations",
         "delete": "rm", "remove": "rm", "del": "rm", "mv": "rename", "server": "serve", "fill": "fim",
         "quantise": "quantize"}


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as dist_version

    try:
        return dist_version("dschat")
    except PackageNotFoundError:  # pragma: no cover - running from a tree that was never installed
        return "unknown"


def meant_command(argv: list[str], prompt: list[str]) -> str | None:
    """The subcommand a lone word was probably meant to be (`dschat conversation`), or None. After `--` the
    word is a message."""
    if len(prompt) != 1 or "--" in argv:
        return None
    word = prompt[0].strip().lower()
    if word in MEANT:
        return MEANT[word]
    names = [n for n in SUBCOMMANDS if n != "sessions"]
    close = difflib.get_close_matches(word, names, n=1, cutoff=0.8)
    return close[0] if close else None


def chat_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dschat", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"dschat {version()}")
    p.add_argument("prompt", nargs="*", help="the message (after stdin, when stdin is piped)")
    p.add_argument("-s", "--system", metavar="TEXT", help="system prompt")
    p.add_argument("--raw", action="store_true", help="no chat template: plain text completion (base models)")
    p.add_argument("--show-prompt", action="store_true",
                   help='print the exact prompt as JSON {"text": ..., "ids": [...]} and exit')
    p.add_argument("--plain", action="store_true", help="line-mode chat instead of the full-screen TUI")
    p.add_argument("--show-thinking", action="store_true",
                   help="pipe mode: a reasoning model's thinking (R1's <think> part) on stderr; stdout stays "
                        "the answer")
    p.add_argument("-c", "--continue", dest="continue_latest", action="store_true",
                   help="continue the most recent conversation")
    p.add_argument("-f", "--file", dest="files", action="append", metavar="PATH",
                   help="put a file into the message as a fenced block with its path (repeatable; a folder brings "
                        "its text files, .gitignore respected; - is stdin); in line mode, into the first message")
    p.add_argument("--conversation", metavar="ID", help="continue the conversation with this id")
    p.add_argument("--session", dest="conversation", help=argparse.SUPPRESS)  # the old name
    p.add_argument("--no-save", action="store_true", help="do not save this conversation in the history")
    p.add_argument("--theme", help="TUI theme")
    add_model_options(p)
    add_server_options(p)
    add_sampling_options(p)
    add_output_options(p)
    return p


def read_stdin() -> str:
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"stdin is not valid UTF-8 text (byte {e.start})") from None


def run_chat(argv: list[str]) -> int:
    args = chat_parser().parse_args(argv)
    meant = meant_command(argv, args.prompt)
    if meant:
        word = args.prompt[0]
        raise UsageError(f"{word!r} is not a command; did you mean `dschat {meant}`? (to send {word!r} to the "
                         f"model as a message: dschat -- {word})")
    opts = Options.from_args(args, Settings.load())
    piped = not sys.stdin.isatty() and "-" not in (args.files or [])  # `-f -`: stdin is a file, not the message
    prompt = " ".join(args.prompt)
    if piped:
        text = read_stdin()
        message = text.rstrip("\n") + ("\n\n" + prompt if prompt else "") if text.strip() else prompt
    else:
        message = prompt
    if args.files and (piped or message):
        from dschat.conversation.attachments import read_all, with_files

        message = with_files(message, read_all(args.files))  # read now, when the message is sent
    if not args.show_prompt and (piped or message):
        from dschat.conversation.session import check_history

        check_history(opts)  # before the model loads: a turn that could not be saved is never generated
    if not piped and not message and not args.show_prompt:
        if args.files and not args.plain:
            raise UsageError("-f puts files into a message: give the message too, or use line mode (--plain), "
                             "where they go into the first one (and /add attaches more)")
        if not sys.stdout.isatty():
            raise UsageError("the chat needs a terminal on stdout; to write an answer elsewhere, give the "
                             "message on stdin or as an argument")
        from dschat.conversation.session import check_history

        check_history(opts)
        return run_interactive(opts, args.plain)
    if not message.strip():
        raise UsageError("under torchrun dschat answers a message on stdin or as an argument (the TUI and "
                         "line mode run in one process)" if ranks.launched() else
                         "nothing to answer: stdin and the prompt are empty")
    from dschat.cli import pipe  # deferred: it loads torch

    return pipe.show_prompt(opts, message) if args.show_prompt else pipe.answer(opts, message)


def run_interactive(opts: Options, plain: bool) -> int:
    if plain:
        from dschat.cli.linemode import run_line_mode  # deferred: torch

        return run_line_mode(opts)
    from dschat.tui import run_tui  # deferred: torch and Textual

    return run_tui(opts)


def run_subcommand(name: str, argv: list[str]) -> int:
    if name == "fim":
        from dschat.fim.command import run_fim  # deferred: torch

        return run_fim(argv)
    if name == "serve":
        from dschat.serve.command import run_serve  # deferred: torch and the server's libraries

        return run_serve(argv)
    if name == "replay":
        from dschat.cli.replay import run_replay  # deferred: torch

        return run_replay(argv)
    if name == "quantize":
        return quantize.run_quantize(argv)
    return commands.run(name, argv)


# -- entry point ----------------------------------------------------------------------------------------------
def show_warning(message, category, filename, lineno, file=None, line=None):
    """Warnings (a stale cache file, say) as one line on stderr."""
    say(f"dschat: warning: {message}")


def interrupted(e: KeyboardInterrupt) -> int:
    try:
        sys.stderr.write("\n")
        say(f"dschat: interrupted{f' ({e})' if str(e) else ''}")
    except OSError:  # the terminal was closed (SIGHUP): nobody to tell, and the exit code still says it
        pass
    return exit_code(e)


def failed(e: Exception, debug: bool) -> int:
    """One readable line, no traceback (unless --debug)."""
    if debug:
        traceback.print_exc()
    say(f"dschat: error: {error_text(e)}")
    return 2 if isinstance(e, UsageError) else 1


def main(argv: list[str] | None = None):
    stop_on_signals()
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    if not debug:
        import warnings

        warnings.showwarning = show_warning
    try:
        if ranks.launched():
            argv = ranks.start(argv)
            if argv and argv[0] in SUBCOMMANDS:
                raise UsageError(f"`dschat {argv[0]}` runs in one process; under torchrun dschat answers a "
                                 "message on stdin or as an argument")
        code = run_subcommand(argv[0], argv[1:]) if argv and argv[0] in SUBCOMMANDS else run_chat(argv)
    except KeyboardInterrupt as e:  # Ctrl+C, SIGTERM, SIGHUP
        code = interrupted(e)
    except BrokenPipeError:
        # the reader went away (`dschat ... | head`): say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = 128 + signal.SIGPIPE
    except Exception as e:  # one readable line, no traceback (unless --debug)
        stop = stop_received()  # an error a signal caused (torch half imported) is the signal's
        code = interrupted(stop) if stop else failed(e, debug)
    finally:
        ranks.finish()
    sys.exit(code)

