"""The command-line parsers' shared parts: a subcommand's parser and the option groups that the chat and the
subcommands (fim, replay, quantize, the history commands) share."""

from __future__ import annotations

import argparse


def command_parser(prog: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """The parser of `dschat PROG`. A description of several lines (examples in columns) is printed as written;
    a one-line one is wrapped to the terminal."""
    raw = "\n" in description
    return argparse.ArgumentParser(prog=f"dschat {prog}", description=description, epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter if raw else
                                   argparse.HelpFormatter)


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
    g.add_argument("--quant", metavar="int8|int4", default=None,
                   help="run the weights as int8 (about half of bf16) or int4 (about a quarter), quantized as "
                        "they load (on a CPU with AVX2 through dschat's own kernel, compiled once at first use; "
                        "on the CPU lm_head too, in int8, and where that kernel runs MLA's kv_b_proj); `none` "
                        "overrides the config file")
    g.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads (default: one for a small model such as the demo, else the cores not busy "
                        "with other processes; --stats says how many ran)")
    g.add_argument("--compile", choices=["auto", "on", "off"], default=None,
                   help="how the decode step runs: on the CPU `on` compiles it with torch.compile/inductor (a C++ "
                        "compiler needed; the first start compiles for minutes, later ones load the code cached "
                        "under ~/.cache/dschat/inductor), `auto` (default) and `off` run it as it is; on a GPU "
                        "`auto` and `on` capture it in CUDA graphs at load")
    g.add_argument("--cache-gb", type=float, default=None, metavar="GB",
                   help="size of the latent KV cache pool (default: a share of free memory)")
    g.add_argument("--speculative", choices=["auto", "mtp", "ngram", "none"], default=None,
                   help="draft tokens with V3's MTP module or by prompt lookup; `auto` (default): mtp when the "
                        "model has it, else ngram, on a GPU; on the CPU only where it pays for the model, "
                        "measured at its first load (--stats shows the figures)")
    g.add_argument("--draft-tokens", type=int, default=None, metavar="K", help="tokens drafted per step")


def add_sampling_options(p: argparse.ArgumentParser):
    g = p.add_argument_group("sampling (defaults: the model's generation_config.json, then the config file)")
    g.add_argument("-t", "--temperature", type=float, default=None, help="0 = greedy (so is anything below 1e-4)")
    g.add_argument("--top-p", type=float, default=None, help="in (0, 1]; below 1e-6 is greedy")
    g.add_argument("--top-k", type=int, default=None, help="0 = no limit")
    g.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    g.add_argument("-n", "--max-tokens", type=int, default=None, help="longest reply, in tokens")


def add_output_options(p: argparse.ArgumentParser):
    p.add_argument("--stats", action="store_true",
                   help="after each reply print one JSON line of statistics on stderr")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")


def add_server_options(p: argparse.ArgumentParser):
    g = p.add_argument_group("server (a running `dschat serve` instead of loading the model here)")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--server", metavar="URL", default=None,
                   help="run on this dschat serve, e.g. http://127.0.0.1:8012 (default: the one running on this "
                        "machine, if any: its discovery file in $XDG_RUNTIME_DIR/dschat)")
    x.add_argument("--no-server", action="store_true", help="load the model in this process even when a server runs")
