"""int8 / int4 weights: the quantizers' error bounds, the packed matmul against dequantise-then-matmul, and
the engine quantizing on load exactly the weights it should (logits equal a float model holding the
dequantized weights)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from dschat.dev import tiny_checkpoints as tc
from helpers import run_ranks
from dschat.engine import Engine, ModelError, SamplingParams, quantize_checkpoint
from dschat.engine.quant import QuantLinear, QuantSpec, head_spec, is_quantized, kv_b_spec, quantize
from dschat.kernels import cpu_gemv, quant_cpu
from dschat.kernels.quant_cpu import Int4Cpu, dequantize_cpu, matmul_cpu, moe_experts_cpu, repack_int4
from dschat.kernels.quant_format import Packed, dequantize, pack_int4, unpack_int4
from dschat.kernels.quant_matmul import quant_matmul_cpu, quant_matmul_reference

SPECS = {"int8": QuantSpec(8), "int4": QuantSpec(4), "int4-sym": QuantSpec(4, symmetric=True)}


@pytest.fixture
def torch_kernels(monkeypatch):
    """PyTorch's packed kernels, as where cpu_gemv cannot be built (no compiler, no AVX2)."""
    monkeypatch.setattr(quant_cpu, "native_gemv", lambda w=None: False)


@pytest.fixture(params=["cpu_gemv", "torch"])
def backend(request, monkeypatch) -> str:
    """Each CPU backend in turn: dschat's own GEMV (tests/test_cpu_gemv.py checks it builds here), then
    PyTorch's packed kernels (its fallback)."""
    if request.param == "torch":
        monkeypatch.setattr(quant_cpu, "native_gemv", lambda w=None: False)
    elif not quant_cpu.native_gemv():
        pytest.fail("cpu_gemv did not build here; see test_cpu_gemv.py")
    return request.param


def test_int4_packing_round_trips():
    v = torch.randint(0, 16, (3, 10), dtype=torch.uint8)
    packed = pack_int4(v)
    assert packed.shape == (3, 5) and packed.dtype == torch.uint8
    assert int(packed[0, 0]) == int(v[0, 0]) | int(v[0, 1]) << 4  # element 2j in the low nibble
    assert torch.equal(unpack_int4(packed), v)


@pytest.mark.parametrize("name", SPECS)
def test_quantization_error_is_within_half_a_step(name):
    s = SPECS[name]
    w = torch.randn(24, 300) * torch.linspace(0.1, 3, 300)  # 300: not a multiple of the group (padded)
    p = quantize(w, s)
    back = dequantize(p)
    assert back.shape == w.shape and p.in_features == 300
    step = p.scale if s.bits == 8 else p.scale.repeat_interleave(s.group, dim=1)[:, :300]
    step = step[:, None] if s.bits == 8 else step
    assert bool(((back - w).abs() <= step / 2 + 1e-6).all())
    exact = torch.zeros(4, 256)  # zero is exact in every scheme (padding relies on it)
    exact[:, 5] = 1.0
    assert torch.equal(dequantize(quantize(exact, s))[:, :5], torch.zeros(4, 5))


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("rows", [1, 5, 33])
def test_cpu_matmul_equals_dequantise_then_matmul(name, rows):
    p = quantize(torch.randn(48, 200), SPECS[name])
    x = torch.randn(rows, 200)
    want = x @ dequantize(p).T
    for got in (quant_matmul_cpu(x, p), quant_matmul_reference(x, p)):
        assert float((got - want).abs().max() / want.abs().max()) < 1e-5


def cpu_weight(p: Packed) -> torch.Tensor:
    """What the CPU kernels compute with, written independently of kernels/quant_cpu.py: int8, and int4 under
    cpu_gemv, exactly the stored weight; int4 under PyTorch's kernel (q - 8) * scale + (8 - zero) * scale with
    both terms rounded to bfloat16."""
    if p.bits != 4 or quant_cpu.native_gemv(p):
        return dequantize(p)
    q = unpack_int4(p.data).float().unflatten(-1, (-1, p.group))
    zero = 8.0 if p.zero is None else p.zero.float()
    scale = p.scale.float()
    w = (q - 8) * scale.bfloat16().float()[..., None] + ((8 - zero) * scale).bfloat16().float()[..., None]
    return w.flatten(-2)[..., : p.in_features]


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("n, k", [(48, 200), (64, 256), (40, 384)])
def test_int4_cpu_layout_round_trips(name, n, k, torch_kernels):
    p = quantize(torch.randn(n, k), SPECS[name])
    w = repack_int4(p) if p.bits == 4 else p
    assert torch.equal(dequantize_cpu(w), cpu_weight(p))
    if p.bits == 4:  # scales rounded to bfloat16: within a bfloat16 step of the stored weight
        assert float((cpu_weight(p) - dequantize(p)).abs().max()) <= float(p.scale.max()) * 8 * 2 ** -8


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("rows", [1, 4, 16, 17, 48, 49, 512])
@pytest.mark.parametrize("k", [320, 300])
def test_cpu_kernels_compute_the_cpu_weight(name, rows, k, torch_kernels):
    """PyTorch's kernels (cpu_gemv: test_cpu_gemv.py). Up to kernel_rows rows: bfloat16 activations, float32
    accumulation, a bfloat16 result (within a few bfloat16 steps of that computed in float64); more rows, or an int8 width the kernel misreads (300):
    dequantise + matmul, float32-exact."""
    p = quantize(torch.randn(80, k) * torch.linspace(0.1, 2, k), SPECS[name])
    w = repack_int4(p) if p.bits == 4 else p
    x = torch.randn(rows, k)
    got = matmul_cpu(x, w)
    assert got.dtype == torch.float32 and got.shape == (rows, 80)
    if p.bits == 8 and k % quant_cpu.INT8_K_MULTIPLE:
        assert float((got - x @ cpu_weight(p).T).abs().max()) < 1e-4
    elif rows <= quant_cpu.kernel_rows(w):
        want = x.bfloat16().double() @ cpu_weight(p).double().T
        assert float(((got - want).abs() / (want.abs() + want.abs().max() * 1e-3)).max()) < 2 ** -7
    else:
        want = x @ cpu_weight(p).T
        assert float((got - want).abs().max() / want.abs().max()) < 1e-5


def test_int8_rows_run_in_slices(monkeypatch, torch_kernels):
    """A weight of more rows than INT8_N_CHUNK (lm_head) runs slice by slice, the last one shorter."""
    monkeypatch.setattr(quant_cpu, "INT8_N_CHUNK", 32)
    p = quantize(torch.randn(80, 64), SPECS["int8"])
    x = torch.randn(2, 64)
    want = x.bfloat16().double() @ cpu_weight(p).double().T
    got = matmul_cpu(x, p)
    assert float(((got - want).abs() / (want.abs() + want.abs().max() * 1e-3)).max()) < 2 ** -7


@pytest.mark.parametrize("name", ["int8", "int4"])
@pytest.mark.parametrize("tokens", [1, 3, 160])
def test_cpu_experts_read_only_the_chosen_experts(name, tokens, backend):
    """moe_experts_cpu equals the float experts of the CPU weights; the experts nobody chose are never read
    (here: poisoned with NaN after packing)."""
    E, H, I, k = 6, 256, 128, 2
    s = SPECS[name]
    p13, p2 = quantize(torch.randn(E * 2 * I, H), s), quantize(torch.randn(E * H, I), s)
    stack = lambda p, n: Packed(*(None if t is None else t.unflatten(0, (E, n)) for t in (p.data, p.scale, p.zero)),
                                p.bits, p.group, p.in_features)
    p13, p2 = stack(p13, 2 * I), stack(p2, H)
    f13, f2 = cpu_weight(p13), cpu_weight(p2)
    w13, w2 = (repack_int4(p13), repack_int4(p2)) if s.bits == 4 and backend == "torch" else (p13, p2)
    ids = torch.tensor([[1, 4], [4, 1], [1, 1 if tokens > 2 else 4]] * 60)[:tokens]
    weights = torch.rand(tokens, k)
    x = torch.randn(tokens, H)
    for t in (w13.scale_offset, w2.scale_offset) if isinstance(w13, Int4Cpu) else (w13.scale, w2.scale):
        t[[0, 2, 3, 5]] = float("nan")
    got = moe_experts_cpu(x, w13, w2, ids, weights)
    assert not got.isnan().any()
    rows = torch.bincount(ids.flatten(), minlength=E)  # each expert runs on the rows that chose it
    limit = quant_cpu.kernel_rows(w13)
    quant_act = lambda v: cpu_gemv.quantize_activations_reference(v[None])[0, : v.shape[0]]
    want = torch.zeros(tokens, H, dtype=torch.float64)
    flips = torch.zeros(tokens, H, dtype=torch.float64)  # what a hidden value on a rounding tie may change
    for t in range(tokens):
        for j in range(k):
            e = int(ids[t, j])
            act = quant_act if backend == "cpu_gemv" and rows[e] <= limit else (lambda v: v)
            g, u = (f13[e].double() @ act(x[t]).double()).chunk(2)
            hidden = (torch.nn.functional.silu(g) * u).float()
            want[t] += weights[t, j] * (f2[e].double() @ act(hidden).double())
            if act is quant_act:
                flips[t] += weights[t, j] * (f2[e].double().abs() @ on_a_tie(hidden))
    # cpu_gemv: the int8 activations above, float32 sums; PyTorch's kernels: bfloat16 activations; an expert
    # with more rows than the kernels take runs dequantised, float32-exact
    tol = 2e-2 if backend == "torch" and tokens <= limit else 1e-5
    assert float(((got - want).abs() - flips).max() / want.abs().max()) < tol


def on_a_tie(v: torch.Tensor) -> torch.Tensor:
    """One int8 step (cpu_gemv's blocks of 32) for each value of v within float32's error of half a step, else
    0: the kernel's float32 sums and the reference's float64 ones may round those to neighbouring steps."""
    b = v.double().view(-1, cpu_gemv.QK)
    step = b.abs().amax(-1, keepdim=True) / 127
    q = b / step
    tie = (q - q.floor() - 0.5).abs() < 1e-5 * (1 + q.abs())
    return (tie * step).flatten()


def test_which_weights_are_quantized():
    yes = ["model.layers.0.self_attn.q_proj", "model.layers.3.self_attn.q_b_proj", "model.layers.1.self_attn.o_proj",
           "model.layers.2.self_attn.kv_a_proj_with_mqa", "model.layers.0.mlp.down_proj",
           "model.layers.5.mlp.experts.17.gate_proj", "model.layers.5.mlp.shared_experts.up_proj",
           "mtp.0.mlp.experts.3.up_proj"]
    no = ["lm_head", "model.embed_tokens", "model.layers.5.mlp.gate", "model.layers.0.self_attn.kv_b_proj",
          "mtp.0.eh_proj", "mtp.0.shared_head.head", "model.layers.0.input_layernorm"]
    assert all(is_quantized(n) for n in yes)
    assert not any(is_quantized(n) for n in no)


def dequantized_checkpoint(src, dst, s: QuantSpec, cpu: bool = False):
    """The checkpoint's weights with each quantized one replaced by what it quantizes to, in float32: a
    float model that must compute what the quantized one does. cpu: what the CPU kernels compute with
    (int4 scales in bfloat16; lm_head too, as head_spec packs it; kv_b_proj where cpu_gemv runs)."""
    weights = tc.dequantized_weights(src)
    for name, w in weights.items():
        if name.endswith(".weight") and is_quantized(name[: -len(".weight")]):
            weights[name] = (cpu_weight if cpu else dequantize)(quantize(w, s)).contiguous()
        elif name == "lm_head.weight" and cpu:
            weights[name] = cpu_weight(quantize(w, head_spec(s))).contiguous()
        elif name.endswith("self_attn.kv_b_proj.weight") and cpu and quant_cpu.native_gemv():
            weights[name] = dequantize(quantize(w, kv_b_spec(s))).contiguous()
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (dst / "config.json").write_text(json.dumps(cfg))
    save_file(weights, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize("kind, quant", [("v2_lite", "int8"), ("v2_lite", "int4")])
def test_quantized_engine_computes_the_dequantized_model(checkpoints, tmp_path, kind, quant, monkeypatch, backend):
    """On the CPU, under each backend: a float model of the weights the CPU kernels read (lm_head too: int8,
    or six bits under int4 with cpu_gemv).
    With the packed kernels off (dequantise + matmul everywhere, as a long prefill runs) the logits equal it
    to float32 rounding; with them (decode: bfloat16 activations, or cpu_gemv's int8 ones) to within 2% of
    the logits' range, and the greedy tokens agree."""
    eng = Engine.from_pretrained(checkpoints[kind], dtype=torch.float32, quant=quant)
    ref = Engine.from_pretrained(dequantized_checkpoint(checkpoints[kind], tmp_path / "deq", SPECS[quant], cpu=True),
                                 dtype=torch.float32)
    ids = torch.randint(2, 500, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    want = ref.logits(ids)
    with monkeypatch.context() as m:
        m.setattr(quant_cpu, "CPU_KERNEL_MAX_ROWS", 0)
        exact = eng.logits(ids)
        assert float((exact - want).abs().max() / want.abs().max()) < 1e-5
        params = SamplingParams(temperature=0.0, max_tokens=6)
        assert list(eng.generate(ids, params)) == list(ref.generate(ids, params))
    # The cached decode path (packed kernels, bfloat16 activations) runs the same packed weights. A rounding
    # can flip a near-tie of the router (another expert, a jump in the logits): so "most positions".
    # cpu_gemv's int8 activations (blocks of 32, as llama.cpp's Q8_0) round each element by up to
    # max|block| / 254, against bfloat16's 2^-9 of the element: twice the drift (test_cpu_gemv.py checks the
    # kernel itself against the float model of the dequantised activations, to 1e-5).
    drift = 4e-2 if backend == "cpu_gemv" else 2e-2
    for chunk in (1, 4):
        got = eng.decode_logits(ids, chunk=chunk)
        err = (got - want).abs().amax(-1) / want.abs().amax(-1)
        assert float((err < drift).float().mean()) >= 0.85, err
        assert float((got.argmax(-1) == want.argmax(-1)).float().mean()) >= 0.85
    layer = eng.model.model.layers[-1]
    assert isinstance(layer.self_attn.o_proj, QuantLinear)
    # kv_b_proj: packed where cpu_gemv folds it per head (int4 stays int4), float under PyTorch's kernels
    kv_b = layer.self_attn.kv_b_proj
    assert isinstance(kv_b, QuantLinear) == (backend == "cpu_gemv")
    assert backend != "cpu_gemv" or kv_b.spec == kv_b_spec(SPECS[quant]) and kv_b.spec.bits == SPECS[quant].bits
    assert isinstance(eng.model.lm_head, QuantLinear) and eng.model.lm_head.spec == head_spec(SPECS[quant])
    assert eng.model.lm_head.spec.bits == (6 if quant == "int4" and backend == "cpu_gemv" else 8)
    if quant == "int4" and backend == "torch":  # repacked for PyTorch's kernel, the stored layout freed
        assert layer.self_attn.o_proj.weight is None and layer.self_attn.o_proj.cpu_weight is not None
        assert layer.mlp.experts.w13 is None and layer.mlp.experts.cpu_w13 is not None
    elif quant == "int4":  # cpu_gemv reads the stored layout: nothing repacked
        assert layer.self_attn.o_proj.cpu_weight is None and layer.mlp.experts.cpu_w13 is None
    assert eng.load_stats["weight_bytes"] < ref.load_stats["weight_bytes"]
    assert eng.load_stats["peak_host_bytes"] > 0


def test_fp8_weights_requantize_to_int4(checkpoints, tmp_path, monkeypatch):
    """FP8 blocks are dequantised, then quantized: the same as quantizing the dequantised checkpoint."""
    eng = Engine.from_pretrained(checkpoints["v3_fp8"], dtype=torch.float32, quant="int4", speculative="none")
    ref = Engine.from_pretrained(dequantized_checkpoint(checkpoints["v3_fp8"], tmp_path / "deq", SPECS["int4"],
                                                        cpu=True), dtype=torch.float32, speculative="none")
    ids = list(range(3, 11))
    monkeypatch.setattr(quant_cpu, "CPU_KERNEL_MAX_ROWS", 0)
    got, want = eng.logits(ids), ref.logits(ids)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5


RANK_QUANTS = ("int8", "int4")
RANK_IDS = list(range(40, 56))


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    """A checkpoint whose row splits fall on whole groups (every split input dimension is 2 x 128), so each
    rank holds exactly its slice of the single process's packed weights."""
    cfg = tc.v2_lite_config()
    cfg.update(num_attention_heads=8, num_key_value_heads=8, moe_intermediate_size=128, intermediate_size=256,
               num_hidden_layers=2)
    return tc.write_checkpoint(tmp_path_factory.mktemp("aligned") / "aligned", cfg, seed=5)


@pytest.fixture(scope="module")
def quantized_ranks(aligned, tmp_path_factory) -> dict:
    """What rank 0 computed for int8 and int4, from one torchrun."""
    out = tmp_path_factory.mktemp("ranks")
    cases = [{"path": aligned, "out": out / f"{q}.pt", "quant": q, "kernel_rows": 0} for q in RANK_QUANTS]
    return dict(zip(RANK_QUANTS, run_ranks(cases, RANK_IDS)))


@pytest.mark.parametrize("quant", RANK_QUANTS)
def test_two_ranks_compute_what_one_quantized_process_does(aligned, quantized_ranks, quant, monkeypatch):
    """Sharded packed weights, compared float32-exactly: both sides dequantise (no bfloat16 activations)."""
    monkeypatch.setattr(quant_cpu, "CPU_KERNEL_MAX_ROWS", 0)
    path, ids, got = aligned, RANK_IDS, quantized_ranks[quant]
    eng = Engine.from_pretrained(path, dtype=torch.float32, quant=quant)
    want = eng.logits(ids)
    assert float((got["logits"] - want).abs().max() / want.abs().max()) < 1e-4
    assert got["greedy"] == list(eng.generate(ids, SamplingParams(max_tokens=10)))


def test_a_saved_int4_directory_splits_only_on_whole_groups(checkpoints, tmp_path):
    out = tmp_path / "int4"
    quantize_checkpoint(checkpoints["v2_lite"], out, "int4", progress=lambda done, total: None)
    r = run_ranks([{"path": out, "out": tmp_path / "out.pt"}], [5, 6, 7], ok=False)
    assert r.returncode != 0
    assert "o_proj.weight': its 128 input features do not split into 2 whole groups of 128" in r.stderr


def test_quantization_changes_the_cache_key(checkpoints):
    plain = Engine.from_pretrained(checkpoints["v2_lite"], dtype=torch.float32)
    int4 = Engine.from_pretrained(checkpoints["v2_lite"], dtype=torch.float32, quant="int4")
    assert plain.prefix_key != int4.prefix_key  # a saved prefix of the bf16 weights is not reused for int4


def test_bad_quant_arguments(checkpoints):
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        Engine.from_pretrained(checkpoints["v2_lite"], quant="int3")
    with pytest.raises(ValueError, match='`fp8="keep"`'):
        Engine.from_pretrained(checkpoints["v3_fp8"], quant="int4", fp8="keep")


def test_integers_without_a_quantization_config_are_refused(tmp_path):
    cfg = tc.v2_lite_config()
    weights = tc.random_weights(cfg)
    name = "model.layers.0.self_attn.q_proj.weight"
    weights[name] = torch.zeros(weights[name].shape, dtype=torch.int8)
    path = tc.write_checkpoint(tmp_path / "m", cfg, weights={k: v for k, v in weights.items() if k != name})
    save_file({name: weights[name]}, str(path / "extra.safetensors"))
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"][name] = "extra.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="q_proj.weight' holds torch.int8 values"):
        Engine.from_pretrained(path, dtype=torch.float32)
