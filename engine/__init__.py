"""dschat's local inference engine for DeepSeek-V2 / V2.5 / Coder-V2 / V3 / R1 checkpoints. It is installed as
the package `dschat.engine` and imports nothing of the app, only the kernels beside it (`..kernels`):

    eng = Engine.from_pretrained("deepseek-ai/DeepSeek-V2-Lite-Chat", device="cuda")
    gen = eng.generate(ids, SamplingParams(temperature=0.0, max_tokens=256))
    for token_id in gen:   # a Generation streams token ids
        ...
    gen.stats              # its GenerationStats: tokens, timings, stop reason

The public names load when first used (PEP 562), so importing a light submodule (`dschat.engine.files`, the
reader of untrusted files the app shares) does not import torch: the app imports torch only after its Ctrl+C
handling is set up.
"""

import importlib

_PUBLIC = {  # name -> the submodule that defines it
    "Engine": "engine", "Generation": "generation", "SamplingParams": "params", "ModelConfig": "config",
    "ModelError": "errors", "ContextLengthError": "errors", "GenerationStats": "stats",
    "quantize_checkpoint": "quantized_dir", "Tokenizer": "tokenizer", "resolve": "hub",
}

__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value  # once
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
