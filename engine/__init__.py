"""dschat's local inference engine for DeepSeek-V2 / V2.5 / Coder-V2 / V3 / R1 checkpoints. It is installed as
the package `dschat.engine` and imports nothing of the app, only the kernels beside it (`..kernels`):

    eng = Engine.from_pretrained("deepseek-ai/DeepSeek-V2-Lite-Chat", device="cuda")
    gen = eng.generate(ids, SamplingParams(temperature=0.0, max_tokens=256))
    for token_id in gen:   # a Generation streams token ids
        ...
    gen.stats              # its GenerationStats: tokens, timings, stop reason
"""

from .config import ModelConfig
from .engine import Engine
from .errors import ContextLengthError, ModelError
from .generation import Generation
from .hub import resolve
from .quantized_dir import quantize_checkpoint
from .sampling import SamplingParams
from .stats import GenerationStats
from .tokenizer import Tokenizer

__all__ = ["Engine", "Generation", "SamplingParams", "ModelConfig", "ModelError", "ContextLengthError",
           "GenerationStats", "quantize_checkpoint", "Tokenizer", "resolve"]
