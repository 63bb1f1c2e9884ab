"""Model configuration, read from a hub `config.json` of model_type deepseek_v2 or deepseek_v3.

The file is taken exactly as DeepSeek ships it: legacy `rope_theta` + `rope_scaling`, or the newer
`rope_parameters` form; `q_lora_rank` null (V2-Lite) or set; every gate variant of the released models.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelError

MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


@dataclass(frozen=True)
class Rope:
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
    raw: dict = field(default_factory=dict, repr=False, compare=False)

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
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ModelError(f"{path}: no config.json here") from None
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

        def need(key):
            if key not in d:
                raise ModelError(f"{where}: missing field {key!r}")
            return d[key]

        n_routed = d.get("n_routed_experts")
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
            if q.get("quant_method") == "dschat":  # written by `dschat quantize` (engine/quant.py reads it)
                weight_quant = q
            elif q.get("quant_method") != "fp8":
                raise ModelError(f"{where}: unsupported quantization {q.get('quant_method')!r}")
            else:
                fp8 = tuple(q.get("weight_block_size") or (128, 128))

        cfg = cls(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            hidden_size=need("hidden_size"),
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=need("num_attention_heads"),
            q_lora_rank=need("q_lora_rank"),
            kv_lora_rank=need("kv_lora_rank"),
            qk_nope_head_dim=need("qk_nope_head_dim"),
            qk_rope_head_dim=need("qk_rope_head_dim"),
            v_head_dim=need("v_head_dim"),
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope=_read_rope(d, where),
            n_routed_experts=n_routed,
            n_shared_experts=d.get("n_shared_experts"),
            num_experts_per_tok=need("num_experts_per_tok") if n_routed else None,
            moe_intermediate_size=need("moe_intermediate_size") if n_routed else 0,
            first_k_dense_replace=d.get("first_k_dense_replace", 0),
            moe_layer_freq=d.get("moe_layer_freq", 1) or 1,
            topk_method=topk_method,
            scoring_func=scoring,
            n_group=d.get("n_group") or 1,
            topk_group=d.get("topk_group") or 1,
            norm_topk_prob=bool(d.get("norm_topk_prob", False)),
            routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            num_nextn_predict_layers=d.get("num_nextn_predict_layers", 0) or 0,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            fp8_block_size=fp8,
            weight_quant=weight_quant,
            raw=d,
        )
        if cfg.n_routed_experts and cfg.n_routed_experts % cfg.n_group:
            raise ModelError(f"{where}: n_routed_experts is not a multiple of n_group")
        if cfg.qk_rope_head_dim % 2:
            raise ModelError(f"{where}: qk_rope_head_dim must be even")
        return cfg


def _read_rope(d: dict, where: str) -> Rope:
    """Both forms: legacy `rope_theta` + `rope_scaling` {type|rope_type: yarn, ...}, and the newer
    `rope_parameters` {rope_type, rope_theta, ...}."""
    params = d.get("rope_parameters")
    if params is None:
        params = dict(d.get("rope_scaling") or {})
        params.setdefault("rope_theta", d.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or params.get("type") or "default"
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    if kind == "default":
        return Rope(theta=theta)
    if kind != "yarn":
        raise ModelError(f"{where}: unsupported rope scaling {kind!r} (only yarn is used by DeepSeek)")
    return Rope(
        theta=theta,
        kind="yarn",
        factor=float(params["factor"]),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 4096)),
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        mscale=float(_or(params.get("mscale"), 1.0)),
        mscale_all_dim=float(_or(params.get("mscale_all_dim"), 0.0)),
    )


def _or(value, default):
    return default if value is None else value


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0
