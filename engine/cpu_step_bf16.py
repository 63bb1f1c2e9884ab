"""The static decode step of one token on the CPU for a bfloat16 model, run lean: cpu_step.py's lean step for
`--dtype bfloat16` (issue 25: the plain bfloat16 step spent ~10 ms of a ~70 ms V2-Lite token outside its matrix
products, in ~600 PyTorch operations and the modules' Python around them).

The same function as `static.decode_step` at S = 1 for a bfloat16 model on the CPU, bit for bit (tested): every
value rounded to bfloat16 where the plain path rounds it (each PyTorch operator's output; float32 inside one).
  * The projections, the routed experts and MLA's fold / unfold run the kernels the plain path runs
    (kernels/cpu_gemv_bf16.cpp: the GEMV, the experts' call, the batched product), with arguments made once;
    projections that read the same x (q_proj or q_a_proj with kv_a_proj_with_mqa; gate_proj with up_proj) go
    in one call (`dschat_bf16_linear_n`: one parallel region, each output the same), and the experts' call
    reads its chosen experts' gate|up rows in one parallel region and their down rows in one more.
  * The RMSNorms (with their residual adds), q's and k_pe's RoPE with the latent's norm and the cache write, the
    SwiGLU's product and the shared experts' sum are library calls (`dschat_bf16_add_sq` / `..._rms`,
    `..._rope_latent`, `..._silu_mul`, `..._add`), rounding as norm_rope.py's references do; each RMSNorm's mean
    of squares between them is torch.mean's own (its float32 sum in the library's order moved the scale by a
    bit in 7 of 20000 rows of 2048, and ~14 bfloat16 outputs of each such row).
  * The attention reads the keys' rows in place (scattered pages too): the scores and the weighted sum in the
    library (`dschat_bf16_mla_scores`, `..._mla_mix`: the plain path's bmm's sums), the softmax between them
    PyTorch's own, as mla_decode_bf16_cpu's attention_probs computes it.
  * The router: its float32 linear as the plain path's (torch.mm over the gate's weight in float32, made once),
    then kernels/router.py's route_reference itself (the library's float32 router sums its softmax in another
    order: its weights part from PyTorch's in the last bit).
Only on one rank, with the library built, for bfloat16 weights (plain Linear / Experts, not packed, not FP8);
`Bf16Plan.build` returns None otherwise and the engine runs `decode_step`. (Its latent cache is bfloat16 too:
the engine's dtype; `step` refuses another.)
"""

from __future__ import annotations

import ctypes

import torch

from . import dist
from .layers.linear import Linear
from .layers.mlp import MLP
from .moe import Experts, MoE
from ..kernels import cpu_bf16, cpu_gemv
from ..kernels.router import route_reference

_P, _I64, _I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
BF16 = torch.bfloat16


class _NotPlain(Exception):
    pass


class _Layer:
    __slots__ = ("in_w", "in_eps", "post_w", "post_eps", "qkv", "q_a", "q_a_norm", "q_a_eps", "q_b", "qkv_out",
                 "kv_norm", "kv_eps", "w_uk", "w_uv", "o", "mlp", "gate", "bias", "route_args", "w13", "w2",
                 "E", "I", "shared")


class Bf16Plan:
    """A bfloat16 model's weights laid out for the lean step (cpu_step.CpuPlan's role for float32)."""

    @classmethod
    def build(cls, model) -> "Bf16Plan | None":
        """The plan, or None where it does not apply (not the CPU, several ranks, not bfloat16, no library,
        FP8-kept or packed weights, a layer of another kind)."""
        try:
            if dist.world_size() != 1 or model.lm_head.weight.device.type != "cpu" or not cpu_bf16.available():
                return None
            return cls(model)
        except (_NotPlain, AttributeError):
            return None

    def __init__(self, model):
        self.model, cfg = model, model.cfg
        self.lib = lib = cpu_gemv.native()
        if lib is None:
            raise _NotPlain
        self.embed = _w(model.model.embed_tokens.weight)
        self.norm_w, self.norm_eps = _w(model.model.norm.weight), model.model.norm.eps
        self.head = _Lin(lib, model.lm_head)
        self.layers: list[_Layer] = []
        for block in model.model.layers:
            L = _Layer()
            a = block.self_attn
            L.in_w, L.in_eps = _w(block.input_layernorm.weight), block.input_layernorm.eps
            L.post_w, L.post_eps = _w(block.post_attention_layernorm.weight), block.post_attention_layernorm.eps
            L.kv_norm, L.kv_eps = _w(a.kv_a_layernorm.weight), a.kv_a_layernorm.eps
            if hasattr(a, "q_proj"):  # q_proj (or q_a_proj) and kv_a_proj_with_mqa read the same x: one call
                L.q_a, L.q_b = None, None
                L.qkv = _LinN(lib, a.q_proj, a.kv_a_proj_with_mqa)
            else:
                L.q_a, L.q_b = _lin(a.q_a_proj), _Lin(lib, a.q_b_proj)
                L.qkv = _LinN(lib, a.q_a_proj, a.kv_a_proj_with_mqa)
                L.q_a_norm, L.q_a_eps = _w(a.q_a_layernorm.weight), a.q_a_layernorm.eps
            w = _lin(a.kv_b_proj).view(a.n_heads, a.nope + a.v_dim, a.kv_rank)
            L.w_uk, L.w_uv = w[:, : a.nope], w[:, a.nope:]  # views, as the plain path's fold and unfold read them
            L.o = _Lin(lib, a.o_proj)
            mlp = block.mlp
            L.mlp = L.shared = None
            if isinstance(mlp, MoE):
                ex = mlp.experts
                if type(ex) is not Experts or ex.w13_scale is not None:
                    raise _NotPlain
                L.w13, L.w2 = _w(ex.w13), _w(ex.w2)
                if not (L.w13.is_contiguous() and L.w2.is_contiguous()):  # cpu_bf16.stacks_fit's condition
                    raise _NotPlain
                L.E, L.I = L.w13.shape[0], L.w13.shape[1] // 2
                g = mlp.gate
                L.gate = g.weight.detach().float().t()  # F.linear(x.float(), weight.float())'s operand, made once
                L.bias = None if g.e_score_correction_bias is None else g.e_score_correction_bias.float()
                L.route_args = g.route_args(mlp.first)
                if mlp.shared_experts is not None:
                    L.shared = self._mlp(mlp.shared_experts)
            elif isinstance(mlp, MLP):
                L.mlp = self._mlp(mlp)
            else:
                raise _NotPlain
            self.layers.append(L)
        a = model.model.layers[0].self_attn
        self.H, self.nope, self.rope, self.R, self.v = a.n_heads, a.nope, a.rope, a.kv_rank, a.v_dim
        self.scale = a.scale
        self._buffers(cfg.hidden_size)

    def _mlp(self, m: MLP):
        if type(m.gate_proj) is not Linear:
            raise _NotPlain
        return _LinN(self.lib, m.gate_proj, m.up_proj), _Lin(self.lib, m.down_proj)

    def _buffers(self, D: int):
        """The step's activations: one buffer each, the same every token (pointers made once)."""
        H, P, R, nope, v = self.H, self.rope, self.R, self.nope, self.v
        z = lambda *shape: torch.zeros(*shape, dtype=BF16)  # noqa: E731
        self.h, self.pend, self.x, self.attn, self.eo = z(1, D), z(1, D), z(1, D), z(1, D), z(1, D)
        self.q = z(1, H * (nope + P))
        L0 = self.layers[0]
        self.qa = z(1, L0.q_a.shape[0]) if L0.q_a is not None else None
        self.qan = z(1, L0.q_a.shape[0]) if L0.q_a is not None else None
        self.kv = z(1, R + P)
        self.q_pe, self.q_lat, self.o_lat, self.out = z(H, P), z(H, 1, R), z(H, 1, R), z(H, 1, v)
        self.q_nope = self.q.view(H, nope + P)[:, :nope].unsqueeze(1)  # [H, 1, nope], a view of q
        self.cs, self.sn = torch.zeros(P // 2), torch.zeros(P // 2)
        inters = set()
        for L in self.layers:
            for m in filter(None, (L.mlp, L.shared)):
                inters.add(m[1].K)
        self.gu = {i: (z(1, 2 * i), z(1, i)) for i in inters}  # gate | up, then silu(gate) * up
        moe = [L for L in self.layers if L.mlp is None]
        k = moe[0].route_args[0] if moe else 1
        self.xf = torch.zeros(1, D)
        self.glog = torch.zeros(1, max([L.gate.shape[1] for L in moe] or [1]))
        self.ids, self.wts, self.k_c = torch.zeros(k, dtype=torch.int64), torch.zeros(k), _I64(k)
        self.logits_bf = z(1, self.head.N)
        ptr = lambda t: _P(t.data_ptr())  # noqa: E731
        self.p = {name: ptr(getattr(self, name)) for name in
                  ("h", "pend", "x", "attn", "eo", "q", "kv", "q_pe", "q_lat", "o_lat", "out", "cs", "sn", "glog",
                   "xf", "logits_bf", "ids", "wts")}
        if self.qa is not None:
            self.p["qa"], self.p["qan"] = ptr(self.qa), ptr(self.qan)
        self.p_gu = {i: (_LinN.outputs(a[:, :i], a[:, i:]), ptr(a), ptr(b)) for i, (a, b) in self.gu.items()}
        self.D_c, self.Dn = _I64(D), D
        sizes = {D, R} | ({L0.q_a.shape[0]} if L0.q_a is not None else set())
        self.sq, self.m = torch.zeros(1, max(sizes)), torch.zeros(1, 1)
        self.sq_n = {n: self.sq[:, :n] for n in sizes}  # [1, n] views: torch.mean's input
        self.p["sq"], self.p["m"] = ptr(self.sq), ptr(self.m)
        for L in self.layers:
            L.in_w, L.post_w, L.kv_norm = ptr(L.in_w), ptr(L.post_w), ptr(L.kv_norm)
            L.qkv_out = _LinN.outputs(self.q if L.q_a is None else self.qa, self.kv)
            if L.q_a is not None:
                L.q_a_norm = ptr(L.q_a_norm)
        self.norm_p = ptr(self.norm_w)

    def _mean_sq(self, x: ctypes.c_void_p, res: ctypes.c_void_p | None, n: int):
        """x = bf16(x + res) in place (with res), then self.m = the mean of x's squares in float32, by torch.mean
        itself (rms_norm_reference's `h.pow(2).mean(-1)`: its summation order is PyTorch's)."""
        self.lib.dschat_bf16_add_sq(x, res, n, self.p["sq"])
        torch.mean(self.sq_n[n], -1, keepdim=True, out=self.m)

    def _norm(self, x: ctypes.c_void_p, res: ctypes.c_void_p | None, w: ctypes.c_void_p, eps: float, n: int,
              y: ctypes.c_void_p):
        """RMSNorm.add's (x + res, norm) in bfloat16: x = bf16(x + res) in place (with res), y = its norm."""
        self._mean_sq(x, res, n)
        self.lib.dschat_bf16_rms(x, w, self.p["m"], eps, n, y)

    def _swiglu(self, m, x: ctypes.c_void_p, out: ctypes.c_void_p, threads):
        """out = down(silu(gate(x)) * up(x)), as MLP.forward rounds it."""
        gate_up, down = m
        outs, pg, pa = self.p_gu[down.K]
        gate_up(x, outs, threads)
        self.lib.dschat_bf16_silu_mul(pg, down.K, pa, threads)
        down(pa, out, threads)

    @torch.inference_mode()
    def step(self, ids: torch.Tensor, length: torch.Tensor, cache: list[torch.Tensor], slot: int,
             keys: torch.Tensor | slice):
        """cpu_step.CpuPlan.step's contract: (h [1, hidden] bfloat16, logits [1, V] float32, argmax [1]); writes
        the argmax into ids and adds 1 to length."""
        lib, p, H, nope, P, R = self.lib, self.p, self.H, self.nope, self.rope, self.R
        threads = _I(torch.get_num_threads())
        D = self.D_c
        torch.index_select(self.embed, 0, ids[0], out=self.h)
        cos, sin = self.model.rotary(length)
        self.cs.copy_(cos[0])
        self.sn.copy_(sin[0])
        if cache[0].dtype != BF16:
            raise ValueError("the bfloat16 lean step needs a bfloat16 latent cache")
        keep, slots, first, T = cpu_gemv.attend_keys(keys)  # noqa: F841 (keep: alive while the calls run)
        row_bytes = (R + P) * 2
        scores = torch.empty(H, T, dtype=BF16)
        ps = scores.data_ptr()
        start = True
        for i, L in enumerate(self.layers):
            self._norm(p["h"], None if start else p["pend"], L.in_w, L.in_eps, self.Dn, p["x"])
            start = False
            L.qkv(p["x"], L.qkv_out, threads)
            if L.q_a is not None:
                self._norm(p["qa"], None, L.q_a_norm, L.q_a_eps, L.q_a.shape[0], p["qan"])
                L.q_b(p["qan"], p["q"], threads)
            layer = cache[i]
            self._mean_sq(p["kv"], None, R)  # the latent's RMSNorm: the mean of its squares, PyTorch's
            lib.dschat_bf16_rope_latent(p["q"], H, nope + P, nope, p["kv"], R, P, L.kv_norm, p["m"], L.kv_eps, p["cs"],
                                        p["sn"], layer.data_ptr() + slot * row_bytes, p["q_pe"])
            cpu_bf16.bmm(self.q_nope, L.w_uk, False, out=self.q_lat)
            # the attention over the keys' rows, read in place: the scores, PyTorch's softmax (attention_probs'), the
            # weighted sum of the rows
            cpu_gemv.check(lib.dschat_bf16_mla_scores(p["q_lat"], p["q_pe"], H, R, P, layer.data_ptr(), slots, first,
                                                      T, ps, threads), "bad attention arguments")
            probs = (scores.float() * self.scale).softmax(dim=-1).to(BF16)
            cpu_gemv.check(lib.dschat_bf16_mla_mix(probs.data_ptr(), H, R, P, layer.data_ptr(), slots, first, T,
                                                   p["o_lat"], threads), "bad attention arguments")
            cpu_bf16.bmm(self.o_lat, L.w_uv, True, out=self.out)
            L.o(p["out"], p["attn"], threads)
            self._norm(p["h"], p["attn"], L.post_w, L.post_eps, self.Dn, p["x"])
            if L.mlp is not None:
                self._swiglu(L.mlp, p["x"], p["pend"], threads)
                continue
            self.xf.copy_(self.x)
            glog = self.glog[:, :L.gate.shape[1]]
            torch.mm(self.xf, L.gate, out=glog)
            weights, chosen = route_reference(glog, L.bias, *L.route_args)  # the plain path's router, exactly
            self.ids[:] = chosen[0]
            self.wts[:] = weights[0]
            cpu_gemv.check(lib.dschat_bf16_experts(p["x"], D, p["ids"], p["wts"], self.k_c, _P(L.w13.data_ptr()),
                                                   _P(L.w2.data_ptr()), _I64(L.E), _I64(L.I), p["pend"], threads))
            if L.shared is not None:
                self._swiglu(L.shared, p["x"], p["eo"], threads)
                lib.dschat_bf16_add(p["pend"], p["eo"], D)
        self._norm(p["h"], p["pend"], self.norm_p, self.norm_eps, self.Dn, p["x"])
        h_out = self.h.clone()  # h + pending: the state before the final norm, as decode_step returns it
        self.head(p["x"], p["logits_bf"], threads)
        logits = self.logits_bf.float()
        tokens = torch.tensor([lib.dschat_argmax(logits.data_ptr(), logits.shape[1])])  # logits.argmax(-1)'s
        length.add_(1)
        ids.copy_(tokens.view(1, 1))
        return h_out, logits, tokens


class _Lin:
    """A bfloat16 Linear's weight [N, K] through `dschat_bf16_linear` at one row (x and y bfloat16, y rounded):
    every argument but x's and y's made once."""

    def __init__(self, lib, m):
        w = _lin(m)
        self.w, self.N, self.K = w, w.shape[0], w.shape[1]
        self.fn = lib.dschat_bf16_linear_raw
        self.args = (_I64(1), _I64(self.K), _P(w.data_ptr()), _I64(self.N))
        self.one = _I(1)

    def __call__(self, x: ctypes.c_void_p, y: ctypes.c_void_p, threads: ctypes.c_int):
        cpu_gemv.check(self.fn(x, *self.args, y, self.one, self.one, threads))


class _LinN:
    """bfloat16 Linears that read the same x, through `dschat_bf16_linear_n` at one row: one parallel region
    for all of them (each output exactly `_Lin`'s)."""

    def __init__(self, lib, *linears):
        ws = [_lin(m) for m in linears]
        K = ws[0].shape[1]
        if any(w.shape[1] != K for w in ws):
            raise _NotPlain
        self.keep, self.fn = ws, lib.dschat_bf16_linear_n
        self.args = (_I64(K), _I64(len(ws)), (_P * len(ws))(*(w.data_ptr() for w in ws)),
                     (_I64 * len(ws))(*(w.shape[0] for w in ws)))

    @staticmethod
    def outputs(*ys: torch.Tensor):
        """The outputs' pointers, made once (contiguous bfloat16 buffers, or contiguous views)."""
        return (_P * len(ys))(*(y.data_ptr() for y in ys))

    def __call__(self, x: ctypes.c_void_p, ys, threads: ctypes.c_int):
        cpu_gemv.check(self.fn(x, *self.args, ys, threads))


def _w(t: torch.Tensor) -> torch.Tensor:
    if t is None or t.dtype != BF16 or t.device.type != "cpu":
        raise _NotPlain
    return t.detach()


def _lin(m) -> torch.Tensor:
    """The weight of a plain bfloat16 Linear (not FP8-kept, not packed), contiguous."""
    if type(m) is not Linear or m.scale is not None:
        raise _NotPlain
    w = _w(m.weight)
    if not w.is_contiguous() or w.dim() != 2:
        raise _NotPlain
    return w
