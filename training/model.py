"""The demo model: a DeepSeek-V3-architecture config in a few sizes, its initialisation, the training losses
(next token plus V3's multi-token prediction) and aux-loss-free load balancing of the router."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dschat.engine.config import ModelConfig
from dschat.engine.model import Transformer
from dschat.engine.moe import Gate

MAX_SHIPPED_MB = 60  # the package ships the weights in bf16
MAX_POSITIONS = 4608  # covers `dschat fim`'s default prompt (4096 tokens) and insertion (256)

# Size presets (what differs from BASE_CONFIG). "small" is the first shipped demo model (13.7M parameters).
SIZES = {
    "tiny": dict(vocab=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                 q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                 n_routed_experts=4, n_group=2, topk_group=1),
    "small": dict(vocab=4096),
    "base": dict(vocab=8192, hidden_size=384, intermediate_size=1536, moe_intermediate_size=128,
                 num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=6, q_lora_rank=192,
                 kv_lora_rank=96),
}

BASE_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "hidden_size": 256,
    "intermediate_size": 1024,
    "moe_intermediate_size": 192,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 128,
    "kv_lora_rank": 64,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "v_head_dim": 32,
    "n_routed_experts": 16,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "n_group": 4,
    "topk_group": 2,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "num_nextn_predict_layers": 1,
    "max_position_embeddings": 8192,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "attention_bias": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "torch_dtype": "bfloat16",
}


def model_config(size: str, vocab: int, max_positions: int) -> dict:
    """The hub config.json of a size preset, with the tokenizer's actual vocabulary size."""
    preset = {k: v for k, v in SIZES[size].items() if k != "vocab"}
    return {**BASE_CONFIG, **preset, "vocab_size": vocab, "max_position_embeddings": max_positions}


def build_model(cfg: ModelConfig, device, seed: int) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg).to(device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight", "experts.w2")):
                p.normal_(0, 0.02 / math.sqrt(2 * (cfg.num_hidden_layers + 1)))
            else:
                p.normal_(0, 0.02)
        for m in model.modules():
            if isinstance(m, Gate) and m.e_score_correction_bias is not None:
                m.e_score_correction_bias.zero_()
        # The MTP module shares the embedding and output head with the main model (as in the V3 report).
        for m in model.mtp:
            m.embed_tokens.weight = model.model.embed_tokens.weight
            m.shared_head.head.weight = model.lm_head.weight
    return model


def n_params(model: Transformer) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def losses(model: Transformer, x: torch.Tensor, y: torch.Tensor):
    """Next-token loss and the MTP loss (the module predicts t_{i+2} from h_i and t_{i+1})."""
    S = x.shape[1]
    pos = torch.arange(S, device=x.device)
    h = model(x, pos)
    main = F.cross_entropy(model.head(h).flatten(0, 1), y.flatten(), ignore_index=-100)
    if not len(model.mtp):
        return main, torch.zeros((), device=x.device)
    # depth 1: inputs at positions 0..S-2 are (norm(h_i), t_{i+1} = x[:, i+1]); targets t_{i+2} = y[:, i+1]
    _, mtp_logits = model.mtp_forward(0, model.model.norm(h[:, :-1]), x[:, 1:], pos[:-1])
    mtp = F.cross_entropy(mtp_logits.flatten(0, 1), y[:, 1:].flatten(), ignore_index=-100)
    return main, mtp


class LoadBalancer:
    """Aux-loss-free balancing (V3 report): after each step, nudge each router's bias up for underloaded
    experts and down for overloaded ones."""

    def __init__(self, model: Transformer, rate: float):
        self.rate = rate
        self.counts: dict[Gate, torch.Tensor] = {}
        for m in model.modules():
            if isinstance(m, Gate) and m.e_score_correction_bias is not None:
                m.register_forward_hook(self._record)

    def _record(self, gate, inputs, output):
        _, idx = output
        c = torch.bincount(idx.flatten(), minlength=gate.cfg.n_routed_experts).float()
        self.counts[gate] = self.counts.get(gate, 0) + c

    @torch.no_grad()
    def step(self):
        for gate, c in self.counts.items():
            gate.e_score_correction_bias += self.rate * torch.sign(c.mean() - c)
        self.counts.clear()
