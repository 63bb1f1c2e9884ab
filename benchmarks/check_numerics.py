"""bf16 numerics on a GPU: the engine in bfloat16 against transformers in float32 on the same weights.

    python benchmarks/check_numerics.py [--device cuda]

Prints, for tiny random V2-Lite-, V3- and FP8-V3-like checkpoints, the relative logit error of the plain
path and of the cached decode path (Triton MLA kernel on CUDA) in bf16 and in float32, and how many greedy
tokens agree with the float32 reference; transformers itself in bf16 is the peer row.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from dschat.dev import reference
from dschat.dev import tiny_checkpoints as tc
from dschat.engine import Engine, SamplingParams


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true", help="the V2-Lite-like model only, 4 greedy tokens (a check)")
    args = ap.parse_args(argv)
    from safetensors.torch import save_file

    n_new = 4 if args.smoke else 32
    models = (("v2_lite", tc.v2_lite_config()), ("v3", tc.v3_config()), ("v3_fp8", tc.v3_fp8_config()))
    tmp = Path(tempfile.mkdtemp())
    print(f"device {args.device}" + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""))
    print(f"{'model':<8} {'dtype':<9} {'plain rel err':>14} {'decode rel err':>15} {'greedy agree':>13}")
    for name, cfg in models[:1] if args.smoke else models:
        path = tc.write_checkpoint(tmp / name, cfg, seed=1)
        ref_dir = tmp / (name + "_ref")
        ref_dir.mkdir()
        c = dict(cfg)
        c.pop("quantization_config", None)
        (ref_dir / "config.json").write_text(json.dumps(c))
        save_file(tc.dequantized_weights(path), str(ref_dir / "model.safetensors"))
        try:
            ref = reference.load(ref_dir, torch.float32, args.device)
            ref16 = reference.load(ref_dir, torch.bfloat16, args.device)
        except reference.ReferenceUnavailable as e:
            raise SystemExit(f"check_numerics: no reference: {e}") from None
        ids = torch.randint(0, 512, (64,), generator=torch.Generator().manual_seed(0)).tolist()
        with torch.no_grad():
            want = ref(torch.tensor([ids], device=args.device)).logits[0].float()
            greedy_ref = ref.generate(torch.tensor([ids], device=args.device), max_new_tokens=n_new, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        with torch.no_grad():
            peer = ref16(torch.tensor([ids], device=args.device)).logits[0].float()
            greedy16 = ref16.generate(torch.tensor([ids], device=args.device), max_new_tokens=n_new, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        e = float((peer - want).abs().max() / want.abs().max())
        agree = next((i for i, (a, b) in enumerate(zip(greedy16, greedy_ref)) if a != b), n_new)
        print(f"{name:<8} {'bfloat16':<9} {e:>14.2e} {'(transformers)':>15} {agree:>10}/{n_new}")
        for dtype in (torch.float32, torch.bfloat16):
            eng = Engine.from_pretrained(path, device=args.device, dtype=dtype, speculative="none")
            plain = eng.logits(ids)
            decode = eng.decode_logits(ids, chunk=1)
            e1 = float((plain - want).abs().max() / want.abs().max())
            e2 = float((decode - want).abs().max() / want.abs().max())
            out = list(eng.generate(ids, SamplingParams(max_tokens=n_new, ignore_eos=True)))
            agree = next((i for i, (a, b) in enumerate(zip(out, greedy_ref)) if a != b), len(out))
            print(f"{name:<8} {str(dtype)[6:]:<9} {e1:>14.2e} {e2:>15.2e} {agree:>10}/{n_new}")


if __name__ == "__main__":
    main()
