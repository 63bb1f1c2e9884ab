"""`dschat quantize MODEL --quant int4 -o DIR`: write a model's int8 / int4 form once; `--model DIR` then
loads the packed weights directly (no bf16 checkpoint in memory, no quantizing at every start)."""

from __future__ import annotations

import sys
from pathlib import Path

from dschat.cli.flags import command_parser
from dschat.runtime import DEMO_DIR, terminal_progress


def run_quantize(argv: list[str]) -> int:
    p = command_parser("quantize", (
        "Write MODEL with int8 or int4 weights into a new directory (safetensors shards, an index, its config "
        "saying how it is quantized, and the tokenizer files). `dschat --model DIR` loads it."))
    p.add_argument("model", help="model directory, hub repo id, or `demo`")
    p.add_argument("--quant", required=True, metavar="int8|int4", help="int8 (per output channel) or int4 "
                                                                      "(groups of 128 with zero points)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="the new directory (must not exist)")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    args = p.parse_args(argv)
    from dschat.engine import quantize_checkpoint  # deferred: torch

    src = str(DEMO_DIR) if args.model == "demo" else args.model
    f = quantize_checkpoint(src, args.output, args.quant, progress=terminal_progress("Quantizing " + Path(src).name))
    sys.stdout.write(f"wrote {args.output}: {args.quant}, {f['tensors']} tensors, {f['bytes_out'] / 1e9:.2f} GB "
                     f"(from {f['bytes_in'] / 1e9:.2f} GB); peak host memory {f['peak_host_bytes'] / 1e9:.2f} GB\n")
    return 0
