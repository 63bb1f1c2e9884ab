"""The independent reference every exactness check compares with: transformers' DeepSeek modeling.

Loading it either works or raises `ReferenceUnavailable` saying why, so no test or benchmark silently goes
without its comparison (a `None` where a ratio should be, or a skip)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

class ReferenceUnavailable(RuntimeError):
    """transformers could not be imported, or could not build the reference model."""


def _shadowed() -> str:
    """Why `import kernels` (which transformers does) might have found this repository's kernels/ folder."""
    spec = importlib.util.find_spec("kernels")
    if spec is not None and spec.origin and (Path(spec.origin).parent / "fused_moe.py").exists():
        return (f" (`kernels` resolves to {Path(spec.origin).parent}, dschat's own kernels folder: the repository "
                f"root is on sys.path; run from elsewhere, or `pytest` rather than `python -m pytest`)")
    return ""


def _unavailable(what: str, e: Exception) -> ReferenceUnavailable:
    return ReferenceUnavailable(f"{what}: {type(e).__name__}: {e}{_shadowed()}")


def transformers():
    """The transformers module, quiet; ReferenceUnavailable with the reason when it cannot be imported."""
    try:
        import transformers as tf
    except Exception as e:  # noqa: BLE001 - any failure to import is the reason to report
        raise _unavailable("transformers cannot be imported", e) from e
    tf.logging.set_verbosity_error()
    tf.logging.disable_progress_bar()
    return tf


def load(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """transformers' model of a checkpoint directory, in eval mode."""
    tf = transformers()
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except Exception as e:  # noqa: BLE001
        raise _unavailable(f"transformers {tf.__version__} cannot build the model of {path}", e) from e
    return model.to(device).eval()


def twin(state: dict[str, torch.Tensor], config: dict, dtype: torch.dtype, device: torch.device):
    """transformers' model of a hub config over given tensors (the engine's own, assigned, not copied):
    `state` uses the engine's names, whose stacked experts transformers calls gate_up_proj / down_proj."""
    tf = transformers()
    try:
        cfg = tf.AutoConfig.for_model(**json.loads(json.dumps(config)))
        with torch.device("meta"):
            ref = tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        state = {k.replace("experts.w13", "experts.gate_up_proj").replace("experts.w2", "experts.down_proj"): v
                 for k, v in state.items()}
        missing = ref.load_state_dict(state, strict=False, assign=True).missing_keys
        if missing:
            raise ValueError(f"it wants tensors the engine does not have: {missing[:3]}")
        with torch.device(device):  # its rotary tables are buffers made at construction
            ref.model.rotary_emb = type(ref.model.rotary_emb)(config=ref.config)
    except Exception as e:  # noqa: BLE001
        raise _unavailable(f"transformers {tf.__version__} cannot build the reference model", e) from e
    return ref.eval()
