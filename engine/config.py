"""Model configuration, read from a hub `config.json` of model_type deepseek_v2 or deepseek_v3.

The file is taken exactly as DeepSeek ships it: legacy `rope_theta` + `rope_scaling`, or the newer
`rope_parameters` form; `q_lora_rank` null (V2-Lite) or set; every gate variant of the released models.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelError
from . import files

MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


@dataclass(frozen=True)
class Rope:
    """The rotary embedding's settings (`rope_theta` and `rope_scaling` of config.json; YaRN when kind is "yarn")."""

    theta: float = 10000.0
    kind: str = "default"  # "default" or "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclass(frozen=True)
class ModelConfig:
    """A checkpoint's config.json, checked: the shapes of every part of the model, the router's variant, RoPE,
    the FP8 block size and an int8 / int4 quantization of its weights (`weight_quant`). Either family (V2 or
    V3) and every variant the released models use."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: Rope
    # MoE
    n_routed_experts: int | None
    n_shared_experts: int | None
    num_experts_per_tok: int | None
    moe_intermediate_size: int
    first_k_dense_replace: int
    moe_layer_freq: int
    topk_method: str
    scoring_func: str
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    tie_word_embeddings: bool
    num_nextn_predict_layers: int
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    fp8_block_size: tuple[int, int] | None = None  # quantization_config fp8 weight_block_size
    weight_quant: dict | None = None  # quantization_config of an int8 / int4 directory (`dschat quantize`)

    # -- derived -------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Values cached per token per layer by absorbed MLA: the normalised latent plus rotary key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale^2 when YaRN applies (mscale from mscale_all_dim)."""
        scale = self.qk_head_dim ** -0.5
        if self.rope.kind == "yarn" and self.rope.mscale_all_dim:
            m = yarn_mscale(self.rope.factor, self.rope.mscale_all_dim)
            scale *= m * m
        return scale

    @property
    def v3_gate(self) -> bool:
        """V3 normalises the top-k weights and then always scales them; V2 scales only when it doesn't
        normalise (as the modeling_deepseek.py each family shipped with does)."""
        return self.model_type == "deepseek_v3"

    def is_moe_layer(self, layer: int) -> bool:
        return (
            bool(self.n_routed_experts)
            and layer >= self.first_k_dense_replace
            and layer % self.moe_layer_freq == 0
        )

    # -- reading ---------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            text = files.read_text(path)
        except FileNotFoundError:
            raise ModelError(f"{path}: no config.json here") from None
        except files.UnreadableFile as e:  # a FIFO, say
            raise ModelError(str(e)) from None
        except (OSError, UnicodeDecodeError) as e:
            raise ModelError(f"{path}: cannot read config.json ({e})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ModelError(f"{path}: config.json is not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(data, dict):
            raise ModelError(f"{path}: config.json is not a JSON object")
        return cls.from_dict(data, where=str(path))

    @classmethod
    def from_dict(cls, d: dict, where: str = "config.json") -> "ModelConfig":
        model_type = d.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ModelError(
                f"{where}: unsupported model_type {model_type!r} (dschat runs {', '.join(MODEL_TYPES)})"
            )

        f = _Fields(d, where)
        n_routed = f.int("n_routed_experts", 0, MAX_EXPERTS, default=None, null=True) or None
        topk_method = d.get("topk_method", "greedy")
        if topk_method == "gready":  # the spelling of early DeepSeek-V2 remote code
            topk_method = "greedy"
        if n_routed and topk_method not in TOPK_METHODS:
            raise ModelError(f"{where}: unsupported topk_method {topk_method!r}")
        scoring = d.get("scoring_func", "softmax")
        if scoring not in ("softmax", "sigmoid"):
            raise ModelError(f"{where}: unsupported scoring_func {scoring!r}")

        fp8 = weight_quant = None
        q = d.get("quantization_config")
        if q:
            if not isinstance(q, dict):
                raise ModelError(f"{where}: quantization_config must be an object, not {json.dumps(q)}")
            if q.get("quant_method") == "dschat":  # written by `dschat quantize` (engine/quant.py reads it)
                weight_quant = q
            elif q.get("quant_method") != "fp8":
                raise ModelError(f"{where}: unsupported quantization {q.get('quant_method')!r}")
            else:
                fp8 = tuple(q.get("weight_block_size") or (128, 128))

        layers = f.int("num_hidden_layers", 1, MAX_LAYERS)
        n_group = f.int("n_group", 1, MAX_EXPERTS, default=None, null=True) or 1
        cfg = cls(
            model_type=model_type,
            vocab_size=f.int("vocab_size"),
            hidden_size=f.int("hidden_size"),
            intermediate_size=f.int("intermediate_size"),
            num_hidden_layers=layers,
            num_attention_heads=f.int("num_attention_heads", 1, MAX_HEADS),
            q_lora_rank=f.int("q_lora_rank", null=True),
            kv_lora_rank=f.int("kv_lora_rank"),
            qk_nope_head_dim=f.int("qk_nope_head_dim"),
            qk_rope_head_dim=f.int("qk_rope_head_dim"),
            v_head_dim=f.int("v_head_dim"),
            max_position_embeddings=f.int("max_position_embeddings", default=4096),
            rms_norm_eps=f.number("rms_norm_eps", default=1e-6),
            rope=_read_rope(d, where),
            n_routed_experts=n_routed,
            n_shared_experts=f.int("n_shared_experts", 0, MAX_EXPERTS, default=None, null=True),
            num_experts_per_tok=f.int("num_experts_per_tok", 1, n_routed) if n_routed else None,
            moe_intermediate_size=f.int("moe_intermediate_size") if n_routed else 0,
            first_k_dense_replace=f.int("first_k_dense_replace", 0, layers, default=0),
            moe_layer_freq=f.int("moe_layer_freq", 0, MAX_LAYERS, default=1, null=True) or 1,
            topk_method=topk_method,
            scoring_func=scoring,
            n_group=n_group,
            topk_group=f.int("topk_group", 1, n_group, default=None, null=True) or 1,
            norm_topk_prob=bool(d.get("norm_topk_prob", False)),
            routed_scaling_factor=f.number("routed_scaling_factor", default=1.0),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            num_nextn_predict_layers=f.int("num_nextn_predict_layers", 0, MAX_LAYERS, default=0, null=True) or 0,
            bos_token_id=f.token_ids("bos_token_id"),
            eos_token_id=f.token_ids("eos_token_id"),
            fp8_block_size=fp8,
            weight_quant=weight_quant,
        )
        if cfg.n_routed_experts and cfg.n_routed_experts % cfg.n_group:
            raise ModelError(f"{where}: n_routed_experts is not a multiple of n_group")
        if cfg.qk_rope_head_dim % 2:
            raise ModelError(f"{where}: qk_rope_head_dim must be even")
        return cfg


MAX_SIZE = 1 << 24  # any width, vocabulary or context length: far past every released model
MAX_LAYERS = 4096
MAX_HEADS = 4096
MAX_EXPERTS = 1 << 16
_REQUIRED = object()


class _Fields:
    """config.json's values, each checked for its type and range as it is read, so that a bad value is one
    line naming its field (and nothing is sized by it)."""

    def __init__(self, d: dict, where: str, prefix: str = ""):
        self.d, self.where, self.prefix = d, where, prefix

    def _given(self, key, default, null) -> bool:
        """Whether the file gives a value to check (not missing, not an allowed null)."""
        if key not in self.d and default is _REQUIRED:
            raise ModelError(f"{self.where}: missing field {self.prefix + key!r}")
        return key in self.d and not (null and self.d[key] is None)

    def _bad(self, key, what):
        return ModelError(f"{self.where}: {self.prefix}{key} must be {what}, not {json.dumps(self.d[key])}")

    def int(self, key: str, lo: int = 1, hi: int = MAX_SIZE, default=_REQUIRED, null: bool = False):
        """A whole number in [lo, hi]; missing, or null where `null` allows it, is `default` (None if
        there is none)."""
        if not self._given(key, default, null):
            return None if default is _REQUIRED else default
        v = self.d[key]
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise self._bad(key, f"a whole number from {lo} to {hi}")
        return v

    def number(self, key: str, default=_REQUIRED, null: bool = False, zero: bool = False) -> float:
        """A finite number above 0 (from 0, with `zero`); missing or an allowed null is `default`."""
        if not self._given(key, default, null):
            return default
        v = self.d[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 <= v if zero else 0 < v) \
                or v == math.inf:
            raise self._bad(key, f"a finite number {'from' if zero else 'above'} 0")
        return float(v)

    def token_ids(self, key: str):
        """A token id, a list of them, or null."""
        v = self.d.get(key)
        ids = v if isinstance(v, list) else [] if v is None else [v]
        if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < MAX_SIZE for i in ids):
            raise self._bad(key, "a token id or a list of them")
        return v


def _read_rope(d: dict, where: str) -> Rope:
    """Both forms: legacy `rope_theta` + `rope_scaling` {type|rope_type: yarn, ...}, and the newer
    `rope_parameters` {rope_type, rope_theta, ...}."""
    name = "rope_parameters" if d.get("rope_parameters") is not None else "rope_scaling"
    params = d.get(name) or {}
    if not isinstance(params, dict):
        raise ModelError(f"{where}: {name} must be an object, not {json.dumps(params)}")
    f = _Fields(params, where, prefix=f"{name}.")
    theta = f.number("rope_theta", default=_Fields(d, where).number("rope_theta", default=10000.0))
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return Rope(theta=theta)
    if kind != "yarn":
        raise ModelError(f"{where}: unsupported rope scaling {kind!r} (only yarn is used by DeepSeek)")
    return Rope(
        theta=theta,
        kind="yarn",
        factor=f.number("factor"),
        original_max_position_embeddings=f.int("original_max_position_embeddings", default=4096),
        beta_fast=f.number("beta_fast", default=32.0, null=True),
        beta_slow=f.number("beta_slow", default=1.0, null=True),
        mscale=f.number("mscale", default=1.0, null=True, zero=True),
        mscale_all_dim=f.number("mscale_all_dim", default=0.0, null=True, zero=True),
    )


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0
