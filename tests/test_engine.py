"""The engine against an independent reference (transformers' DeepseekV2/V3ForCausalLM) on the same weights."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from helpers import CHECKPOINTS, load_reference

from dschat.dev import tiny_checkpoints as tc
from dschat.engine import ContextLengthError, Engine, ModelConfig, ModelError, SamplingParams
from dschat.kernels.fp8_matmul import dequantize_fp8

NAMES = list(CHECKPOINTS)


@pytest.fixture(scope="module")
def engines(checkpoints):
    return {n: Engine.from_pretrained(p, dtype=torch.float32, speculative=tc.drafter(p)) for n, p in checkpoints.items()}


@pytest.fixture(scope="module")
def references(reference_dirs):
    return {n: load_reference(p) for n, p in reference_dirs.items()}


def prompt(n=37, seed=0, vocab=512):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


# -- exactness -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_logits_match_reference(name, engines, references):
    ids = prompt(seed=1)
    with torch.no_grad():
        ref = references[name](torch.tensor([ids])).logits[0].float()
    ours = engines[name].logits(ids)
    assert ours.shape == (len(ids), engines[name].config.vocab_size)
    assert rel_err(ours, ref) < 1e-3


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("chunk", [1, 5, 200])
def test_cached_decode_equals_full_recomputation(name, engines, chunk):
    """Token by token (absorbed attention over the latent cache), in short chunks (absorbed, causal within
    the chunk) and in one long chunk (materialised K/V from the cache): all equal the plain path."""
    eng = engines[name]
    ids = prompt(150, seed=2)
    full = eng.logits(ids)
    assert rel_err(eng.decode_logits(ids, chunk=chunk), full) < 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_greedy_tokens_equal_reference(name, engines, references):
    ids = prompt(20, seed=3)
    with torch.no_grad():
        ref = references[name].generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                                        eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    ours = list(engines[name].generate(ids, SamplingParams(max_tokens=24, ignore_eos=True)))
    assert ours == ref


def test_fp8_checkpoint_really_is_fp8_with_partial_blocks(checkpoints):
    from safetensors import safe_open

    path = checkpoints["v3_fp8"]
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.0.self_attn.q_a_proj.weight"  # [192, 320]: 2 x 3 blocks, both dims partial
    with safe_open(str(path / index[name]), "pt") as f:
        w = f.get_tensor(name)
    with safe_open(str(path / index[name + "_scale_inv"]), "pt") as f:
        s = f.get_tensor(name + "_scale_inv")
    assert w.dtype == torch.float8_e4m3fn and s.shape == (2, 3)
    assert torch.equal(dequantize_fp8(w, s, (128, 128)), tc.dequantize_fp8_reference(w, s))


def test_fp8_weights_kept_in_fp8_compute_the_same(checkpoints, engines, references):
    """--fp8 keep: the FP8 weights stay FP8 in memory (with their block scales) and give the same logits
    and greedy tokens as dequantising on load, which the reference checks."""
    from dschat.engine.layers.linear import Linear
    from dschat.engine.moe import Experts

    keep = Engine.from_pretrained(checkpoints["v3_fp8"], device="cpu", dtype=torch.float32, fp8="keep")
    kept = [n for n, m in keep.model.named_modules() if isinstance(m, Linear) and m.scale is not None]
    assert len(kept) > 20 and all(not n.endswith("kv_b_proj") for n in kept)
    assert keep.model.get_submodule(kept[0]).weight.dtype == torch.float8_e4m3fn
    stacks = [m for m in keep.model.modules() if isinstance(m, Experts)]
    assert stacks and all(m.w13.dtype == m.w2.dtype == torch.float8_e4m3fn for m in stacks)
    ids = prompt(30, seed=4)
    want = engines["v3_fp8"].logits(ids)
    assert torch.equal(keep.logits(ids), want)
    with torch.no_grad():
        assert rel_err(keep.logits(ids), references["v3_fp8"](torch.tensor([ids])).logits[0]) < 1e-5

    def weight_bytes(e):
        return sum(t.numel() * t.element_size() for t in list(e.model.parameters()) + list(e.model.buffers()))

    assert weight_bytes(keep) < 0.5 * weight_bytes(engines["v3_fp8"])  # float32 here; bf16 would be 2x
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    assert list(keep.generate(ids, params)) == list(engines["v3_fp8"].generate(ids, params))


def test_shards_and_index_are_used(checkpoints):
    files = {p.name for p in checkpoints["v3"].glob("*.safetensors")}
    assert len(files) == 3


def test_mtp_layer_is_loaded(checkpoints, engines):
    from safetensors import safe_open

    path, eng = checkpoints["v3"], engines["v3"]
    L = eng.config.num_hidden_layers
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(eng.model.mtp) == 1
    for hub in (f"model.layers.{L}.eh_proj.weight", f"model.layers.{L}.mlp.experts.3.up_proj.weight",
                f"model.layers.{L}.shared_head.head.weight", f"model.layers.{L}.self_attn.kv_b_proj.weight"):
        with safe_open(str(path / index[hub]), "pt") as f:
            want = f.get_tensor(hub).float()
        assert torch.equal(eng.model.hub_tensors()[hub], want)


# -- generation ------------------------------------------------------------------------------------------------
def test_sampling_is_reproducible_with_a_seed(engines):
    eng = engines["v2_lite"]
    p = dict(temperature=1.0, top_p=0.9, top_k=50, max_tokens=16, ignore_eos=True)
    a = list(eng.generate(prompt(10), SamplingParams(seed=7, **p)))
    b = list(eng.generate(prompt(10), SamplingParams(seed=7, **p)))
    c = list(eng.generate(prompt(10), SamplingParams(seed=8, **p)))
    assert a == b and a != c


def test_top_k_1_is_greedy(engines):
    eng = engines["v3"]
    greedy = list(eng.generate(prompt(10), SamplingParams(max_tokens=12, ignore_eos=True)))
    top1 = list(eng.generate(prompt(10), SamplingParams(temperature=0.8, top_k=1, seed=3, max_tokens=12,
                                                        ignore_eos=True)))
    assert greedy == top1


def test_stops_at_stop_tokens_and_max_tokens(engines):
    eng = engines["v2"]
    free = list(eng.generate(prompt(12), SamplingParams(max_tokens=20, ignore_eos=True)))
    assert len(free) == 20 and eng.stats.stop_reason == "length"
    stop = free[5]
    first = free.index(stop)
    out = list(eng.generate(prompt(12), SamplingParams(max_tokens=20, stop_token_ids=(stop,))))
    assert out == free[: first + 1] and eng.stats.stop_reason == "stop"


def test_stops_at_the_models_eos(checkpoints, tmp_path):
    """eos_token_id comes from config.json; make the model's first greedy token the eos."""
    eng = Engine.from_pretrained(checkpoints["v2_lite"], dtype=torch.float32)
    first = next(iter(eng.generate(prompt(9), SamplingParams(max_tokens=1))))
    d = tmp_path / "m"
    shutil.copytree(checkpoints["v2_lite"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["eos_token_id"] = first
    (d / "config.json").write_text(json.dumps(cfg))
    eng2 = Engine.from_pretrained(d, dtype=torch.float32)
    assert list(eng2.generate(prompt(9), SamplingParams(max_tokens=10))) == [first]
    assert eng2.stats.stop_reason == "stop"


def test_context_window_is_enforced(engines):
    eng = engines["v2_lite"]
    with pytest.raises(ContextLengthError, match="context window"):
        eng.generate(prompt(10), SamplingParams(max_tokens=eng.context_length))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eng.generate([0, 99999], SamplingParams())


def test_speculation_by_default_on_a_gpu_and_by_measurement_on_the_cpu(checkpoints):
    from dschat.engine import speculation_choice as sc
    from dschat.engine.engine import default_speculative

    v3, v2 = (ModelConfig.from_file(checkpoints[n] / "config.json") for n in ("v3", "v2"))
    assert default_speculative(v3, torch.device("cuda")) == "mtp"
    assert default_speculative(v2, torch.device("cuda")) == "ngram"
    eng = Engine.from_pretrained(checkpoints["v3"], dtype=torch.float32)
    s = eng.load_stats
    # measured: a 1+1 pass and a drafting step cost something, and random weights draft nothing the model keeps
    assert s["candidate"] == "mtp" and s["verify_cost"] > 0 and s["draft_cost"] > 0 and s["speculation_probe_s"] > 0
    assert s["draft_acceptance"] < 0.5 and s["acceptance_measured"] is True
    assert eng.speculative == s["speculative"] == "none"
    assert sc.cache_file().exists()
    again = Engine.from_pretrained(checkpoints["v3"], dtype=torch.float32)  # remembered: nothing measured
    assert again.load_stats["speculation_probe_s"] == 0.0 and again.load_stats["verify_cost"] == s["verify_cost"]
    ng = Engine.from_pretrained(checkpoints["v2"], dtype=torch.float32, speculative="auto")
    assert ng.load_stats["candidate"] == "ngram" and ng.load_stats["draft_acceptance"] == sc.NGRAM_ACCEPT
    assert ng.speculative == ("ngram" if sc.pays(sc.NGRAM_ACCEPT, 4, ng.load_stats["verify_cost"]) else "none")
    explicit = Engine.from_pretrained(checkpoints["v2"], dtype=torch.float32, speculative="none")
    assert "verify_cost" not in explicit.load_stats and explicit.load_stats["speculative"] == "none"


def test_speculation_is_chosen_where_it_pays():
    from dschat.engine.speculation_choice import expected_tokens, pays

    assert expected_tokens(0.5, 2) == 1.75 and expected_tokens(0.0, 4) == 1.0 and expected_tokens(1.0, 3) == 4.0
    assert pays(0.85, 1, 1.05, 0.1)  # a GPU-like pass: 1.85 tokens for 1.15 steps
    assert not pays(0.57, 1, 1.45, 0.4)  # the demo model on a CPU: 1.57 tokens for 1.85 steps
    assert not pays(0.6, 4, 3.38)  # V2-Lite shapes in int4 on a CPU, 1+4 lookup: 2.31 tokens for 3.38 steps
    assert pays(0.6, 4, 1.5) and not pays(0.6, 4, 2.2)  # the margin: 2.31 tokens need a pass under 2.1 steps


def test_a_failed_speculation_probe_decodes_plainly(checkpoints, monkeypatch):
    from dschat.engine import speculation_choice as sc

    def broken(*a, **k):
        raise RuntimeError("probe broke")

    monkeypatch.setattr(sc, "measure_cost", broken)
    with pytest.warns(RuntimeWarning, match="probe broke"):
        eng = Engine.from_pretrained(checkpoints["v3"], dtype=torch.float32)
    assert eng.speculative == "none" and list(eng.generate(prompt(5), SamplingParams(max_tokens=3)))
    assert not sc.cache_file().exists()  # nothing remembered from a failed probe


def test_speculation_chosen_by_measurement_decodes_the_same_tokens(checkpoints, monkeypatch):
    from dschat.engine import speculation_choice as sc

    plain = Engine.from_pretrained(checkpoints["v3"], dtype=torch.float32, speculative="none")
    want = list(plain.generate(prompt(9), SamplingParams(max_tokens=12)))
    monkeypatch.setattr(sc, "MARGIN", 0.0)  # any cost pays: the measured choice keeps the drafter
    eng = Engine.from_pretrained(checkpoints["v3"], dtype=torch.float32)
    assert eng.speculative == "mtp" and eng.load_stats["speculative"] == "mtp"
    g = eng.generate(prompt(9), SamplingParams(max_tokens=12))
    assert list(g) == want and g.stats.draft_tokens > 0


def test_stats_after_generate(engines):
    eng = engines["v3"]
    out = list(eng.generate(prompt(30, seed=9), SamplingParams(max_tokens=8, ignore_eos=True)))
    s = eng.stats
    assert s.prompt_tokens == 30 and s.generated_tokens == len(out) == 8
    assert s.prefill_s > 0 and s.decode_s > 0 and s.ttft_s == s.prefill_s
    assert s.decode_tokens_per_s == pytest.approx(7 / s.decode_s)
    assert s.forwards + s.accepted_tokens == 7  # each forward pass: one token and the drafts it kept
    assert s.tokens_per_forward == pytest.approx(7 / s.forwards)
    d = s.as_dict()
    assert json.loads(json.dumps(d)) == d and d["generated_tokens"] == 8 and d["drafter"] == eng.speculative


# -- config ------------------------------------------------------------------------------------------------------
def test_config_forms_agree():
    legacy = ModelConfig.from_dict(tc.v3_config(rope_parameters=False))
    newer = ModelConfig.from_dict(tc.v3_config(rope_parameters=True))
    assert legacy.rope == newer.rope and legacy.rope.kind == "yarn" and legacy.rope.factor == 40


def test_v2_lite_hub_config_values():
    c = ModelConfig.from_dict(tc.v2_lite_config())
    assert c.q_lora_rank is None and c.latent_dim == 64 + 16
    mscale = 0.1 * 0.707 * math.log(40) + 1
    assert c.softmax_scale == pytest.approx((32 + 16) ** -0.5 * mscale ** 2)
    assert [c.is_moe_layer(i) for i in range(3)] == [False, True, True]
    d = tc.v2_lite_config()
    d["moe_layer_freq"], d["num_hidden_layers"] = 2, 5
    assert [ModelConfig.from_dict(d).is_moe_layer(i) for i in range(5)] == [False, False, True, False, True]


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama"}, "unsupported model_type 'llama'"),
    ({"kv_lora_rank": None}, None),
    ({"topk_method": "random"}, "unsupported topk_method"),
])
def test_config_errors(change, message):
    d = tc.v2_config()
    d.update(change)
    if message is None:  # a field removed
        del d["kv_lora_rank"]
        message = "missing field 'kv_lora_rank'"
    with pytest.raises(ModelError, match=message):
        ModelConfig.from_dict(d)


# -- loading errors --------------------------------------------------------------------------------------------------
def copy_ckpt(checkpoints, tmp_path, name="v2_lite"):
    d = tmp_path / name
    shutil.copytree(checkpoints[name], d)
    return d


def shard_of(d, tensor):
    return d / json.loads((d / "model.safetensors.index.json").read_text())["weight_map"][tensor]


def test_missing_directory(tmp_path):
    with pytest.raises(ModelError, match="no such model directory"):
        Engine.from_pretrained(tmp_path / "nope")


def test_truncated_shard_is_named(checkpoints, tmp_path):
    d = copy_ckpt(checkpoints, tmp_path)
    shard = shard_of(d, "lm_head.weight")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelError, match=f"{shard.name}: truncated"):
        Engine.from_pretrained(d)


def test_missing_shard_is_named(checkpoints, tmp_path):
    d = copy_ckpt(checkpoints, tmp_path)
    shard = shard_of(d, "lm_head.weight")
    shard.unlink()
    with pytest.raises(ModelError, match=f"{shard.name}"):
        Engine.from_pretrained(d)


def test_missing_tensor_is_named(checkpoints, tmp_path):
    d = copy_ckpt(checkpoints, tmp_path)
    index_path = d / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["model.layers.1.mlp.experts.3.down_proj.weight"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(ModelError, match="'model.layers.1.mlp.experts.3.down_proj.weight' is missing"):
        Engine.from_pretrained(d)


def test_mismatched_tensor_is_named(checkpoints, tmp_path):
    d = copy_ckpt(checkpoints, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 300
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=r"model.layers.0.mlp.(gate|up|down)_proj.weight' has shape"):
        Engine.from_pretrained(d)


@pytest.mark.parametrize("content, message", [
    ('{"model_type": "deepseek_v2", ', "not valid JSON"),
    ('{"model_type": "gpt2"}', "unsupported model_type 'gpt2'"),
    (None, "no config.json"),
])
def test_bad_config_file(checkpoints, tmp_path, content, message):
    d = copy_ckpt(checkpoints, tmp_path)
    if content is None:
        (d / "config.json").unlink()
    else:
        (d / "config.json").write_text(content)
    with pytest.raises(ModelError, match=message):
        Engine.from_pretrained(d)


def test_tied_embeddings(tmp_path):
    cfg = tc.v2_lite_config()
    cfg["tie_word_embeddings"] = True
    w = tc.random_weights(cfg, seed=5)
    del w["lm_head.weight"]
    d = tc.write_checkpoint(tmp_path / "tied", cfg, weights=w)
    eng = Engine.from_pretrained(d, dtype=torch.float32)
    assert eng.model.lm_head.weight is eng.model.model.embed_tokens.weight
    ref = load_reference(d)
    ids = prompt(12)
    with torch.no_grad():
        assert rel_err(eng.logits(ids), ref(torch.tensor([ids])).logits[0]) < 1e-3


def test_single_file_checkpoint(tmp_path):
    d = tc.write_checkpoint(tmp_path / "one", tc.v2_lite_config(), shards=1)
    (d / "model.safetensors.index.json").unlink()
    (d / "model-00001-of-000001.safetensors").rename(d / "model.safetensors")
    eng = Engine.from_pretrained(d, dtype=torch.float32)
    assert eng.logits(prompt(5)).shape == (5, 512)


def test_hub_repo_id_resolves_from_the_local_cache_offline(checkpoints, tmp_path, monkeypatch):
    """An id already in the local Hugging Face cache loads with HF_HUB_OFFLINE=1, no network."""
    cache = tmp_path / "hf"
    repo = cache / "models--deepseek-ai--DeepSeek-Tiny"
    snap = repo / "snapshots" / ("0" * 40)
    shutil.copytree(checkpoints["v2_lite"], snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    eng = Engine.from_pretrained("deepseek-ai/DeepSeek-Tiny", dtype=torch.float32)
    assert eng.path == snap
    with pytest.raises(ModelError, match="deepseek-ai/Not-There"):
        Engine.from_pretrained("deepseek-ai/Not-There")
