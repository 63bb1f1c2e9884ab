"""GGUF files of a dschat checkpoint for bench_cpu.py's llama.cpp column: llama.cpp's own converter, then
llama-quantize, from one llama.cpp source tree (the one llama-cpp-python vendors is what was measured).

    python benchmarks/make_gguf.py CHECKPOINT --name v2lite2 --out DIR --llama-src SRC \
        [--quantize PATH/llama-quantize] [--types bf16,q8_0,q4_0]

SRC is a llama.cpp source tree (convert_hf_to_gguf.py, conversion/, gguf-py/), e.g. the `vendor/llama.cpp` of
`pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36`. Its converter is copied to a temporary
directory and patched there with benchmarks/llama_converter.patch (two changes, llama.cpp's C++ untouched):
the demo model's tokenizer hash is llama.cpp's `gpt-2` pre-tokenizer (it stops with "BPE pre-tokenizer was not
recognized" otherwise), and a config without q-LoRA (V2-Lite) writes `deepseek2.attention.q_lora_rank = 0`
(llama.cpp recognises V2-Lite without it only by its 27 layers, so a cut-down V2-Lite fails to load). Writes
DIR/<name>-bf16.gguf with the converter, then each other type with `llama-quantize` from it; files already
there are kept. The converter runs in this python (it needs torch, numpy, transformers and safetensors).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PATCH = Path(__file__).resolve().parent / "llama_converter.patch"
TYPES = {"bf16": "BF16", "f16": "F16", "f32": "F32", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_k_m": "Q4_K_M"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--name", required=True, help="file name stem: v2lite<layers> or demo (what bench_cpu looks for)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--llama-src", required=True, help="llama.cpp source tree holding convert_hf_to_gguf.py")
    ap.add_argument("--quantize", help="llama-quantize executable (needed for types other than bf16/f16/f32)")
    ap.add_argument("--types", default="bf16,q8_0,q4_0")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    src, out = Path(args.llama_src), Path(args.out)
    types = [t for t in args.types.split(",") if t]
    bad = [t for t in types if t not in TYPES]
    if bad or not (src / "convert_hf_to_gguf.py").is_file():
        sys.exit(f"make_gguf: error: {'unknown type ' + bad[0] if bad else f'no convert_hf_to_gguf.py in {src}'}")
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"{args.name}-bf16.gguf"
    with tempfile.TemporaryDirectory() as tmp:
        conv = Path(tmp)
        for part in ("convert_hf_to_gguf.py", "conversion", "gguf-py"):
            if (src / part).is_dir():
                shutil.copytree(src / part, conv / part)
            elif (src / part).exists():
                shutil.copy(src / part, conv / part)
        r = subprocess.run(["patch", "-p1", "--forward", "-s", "-d", str(conv), "-i", str(PATCH)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"make_gguf: error: {PATCH.name} does not apply to {src}: {(r.stdout + r.stderr).strip()}")
        for t in [t for t in ("bf16", "f16", "f32") if t in types or t == "bf16"]:
            f = out / f"{args.name}-{t}.gguf"
            if not f.exists():
                subprocess.run([sys.executable, str(conv / "convert_hf_to_gguf.py"), args.checkpoint, "--outtype", t,
                                "--outfile", str(f)], check=True)
            print(f"{f}: {f.stat().st_size / 1e9:.2f} GB")
    for t in [t for t in types if t not in ("bf16", "f16", "f32")]:
        f = out / f"{args.name}-{t}.gguf"
        if not f.exists():
            if not args.quantize:
                sys.exit(f"make_gguf: error: {t} needs --quantize PATH (llama-quantize)")
            subprocess.run([args.quantize, str(base), str(f), TYPES[t], str(args.threads)], check=True)
        print(f"{f}: {f.stat().st_size / 1e9:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
