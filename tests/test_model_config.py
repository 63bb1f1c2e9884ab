"""A checkpoint's config.json is checked for types and ranges, and against the checkpoint's own tensors,
before anything is built from it: a bad value is one line naming its field."""

from __future__ import annotations

import json
import re

import pytest
from helpers import assert_clean_error, call

from dschat.dev import tiny_checkpoints as tc
from dschat.engine import Engine, ModelConfig, ModelError


@pytest.mark.parametrize("change, message", [
    ({"num_hidden_layers": 1000000}, "num_hidden_layers must be a whole number from 1 to 4096, not 1000000"),
    ({"hidden_size": "64"}, 'hidden_size must be a whole number from 1 to 16777216, not "64"'),
    ({"vocab_size": None}, "vocab_size must be a whole number from 1 to 16777216, not null"),
    ({"intermediate_size": 1e40}, "intermediate_size must be a whole number from 1 to 16777216, not 1e+40"),
    ({"num_attention_heads": True}, "num_attention_heads must be a whole number from 1 to 4096, not true"),
    ({"num_experts_per_tok": 17}, "num_experts_per_tok must be a whole number from 1 to 16, not 17"),
    ({"topk_group": 5}, "topk_group must be a whole number from 1 to 4, not 5"),
    ({"first_k_dense_replace": -1}, "first_k_dense_replace must be a whole number from 0 to 4, not -1"),
    ({"rms_norm_eps": "1e-6"}, 'rms_norm_eps must be a finite number above 0, not "1e-6"'),
    ({"routed_scaling_factor": float("nan")}, "routed_scaling_factor must be a finite number above 0, not NaN"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": None}}, "rope_parameters.factor must be a finite"),
    ({"rope_parameters": "yarn"}, 'rope_parameters must be an object, not "yarn"'),
    ({"eos_token_id": "</s>"}, 'eos_token_id must be a token id or a list of them, not "</s>"'),
])
def test_config_values_of_the_wrong_type_or_size(change, message):
    with pytest.raises(ModelError, match="^" + re.escape(f"config.json: {message}")):
        ModelConfig.from_dict({**tc.v3_config(), **change})


def test_released_configs_still_read():
    for make in (tc.v2_lite_config, tc.v2_config, tc.v3_config, tc.v3_fp8_config):
        ModelConfig.from_dict(make())
    c = ModelConfig.from_dict({**tc.v2_lite_config(), "q_lora_rank": None, "n_group": None, "topk_group": None,
                               "moe_layer_freq": None, "num_nextn_predict_layers": None, "eos_token_id": [1, 2]})
    assert (c.q_lora_rank, c.n_group, c.topk_group, c.moe_layer_freq, c.num_nextn_predict_layers) == \
        (None, 1, 1, 1, 0)


def with_config(checkpoints, tmp_path, name, **change):
    """The checkpoint's shards (linked, not copied) under a changed config.json."""
    d = tmp_path / name
    d.mkdir()
    for f in checkpoints[name].iterdir():
        if f.name != "config.json":
            (d / f.name).symlink_to(f)
    cfg = json.loads((checkpoints[name] / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **change}))
    return d


@pytest.mark.parametrize("name, change, message", [
    ("v2_lite", {"num_hidden_layers": 4000}, "num_hidden_layers 4000, but the checkpoint holds 3 layers"),
    ("v3", {"num_hidden_layers": 3}, r"num_hidden_layers 3 \(\+ 1 MTP\), but the checkpoint holds 5 layers"),
    ("v2_lite", {"n_routed_experts": 4000, "num_experts_per_tok": 6},
     "n_routed_experts 4000, but the checkpoint holds 8 routed experts per layer"),
    ("v3", {"vocab_size": 1000}, r"vocab_size 1000 and hidden_size 128, but model.embed_tokens.weight is \[512, 128\]"),
])
def test_config_against_the_checkpoints_tensors(checkpoints, tmp_path, name, change, message):
    d = with_config(checkpoints, tmp_path, name, **change)
    with pytest.raises(ModelError, match=f"^{d}: config.json gives {message}$"):
        Engine.from_pretrained(d)


def test_an_absurd_config_through_dschat(checkpoints, tmp_path):
    d = with_config(checkpoints, tmp_path, "v2_lite", num_hidden_layers=1000000)
    assert_clean_error(call(["--model", str(d), "--no-save", "hi"], stdin=None), "num_hidden_layers must be")
