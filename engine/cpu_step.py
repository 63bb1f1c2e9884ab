"""The static decode step of one token on the CPU, run lean: the same function as `static.decode_step` at S = 1
with the per-token Python and operator overhead cut (issue 21, item 4: the demo model's CPU decode is bound by
its ~340 PyTorch operations a token and the modules' Python around them, not by its arithmetic).

What it does differently, every change the same arithmetic on the same values (the library's attention: up to
float32 summation order):
  * no nn.Module calls, no Step/Positions objects, no dispatchers: a flat loop over per-layer tuples of
    tensors gathered once (`CpuPlan`);
  * the host knows the sequence (its pages and length), so the new row's slot and the keys to attend over
    come from it: no slot table is computed on the tensor side, the keys of a sequence whose pages follow
    one another are a view of the cache (no gather), and at one query every key is visible (no mask);
  * the absorbed attention's einsums are the batched matrix products they stand for (`bmm`), and the
    softmax reads the scores in place; with the library, the attention over the keys (scores, softmax, the
    weighted sum of the latent rows) is one call that reads the rows in place, scattered pages too
    (cpu_gemv.cpp `dschat_mla_attend`: no gather of the rows);
  * q's and k_pe's RoPE rotate together (one set of operations over H + 1 rows);
  * the RMSNorms, the rope-and-latent write, the SwiGLU and the routed experts' weighted sum are one call
    each into dschat's CPU library (kernels/cpu_gemv.cpp: `cpu_ops`) where it is built, else the PyTorch
    reference operations in the same order.

The matrix products stay PyTorch's (one `torch.mm` a projection) for float32 weights; packed int8 / int4 weights
(`--quant`) go through cpu_gemv's kernel, the one `decode_step` runs them with at one row (kernels/quant_cpu.py):
one call a projection (two, written side by side, for q_a|kv_a and gate|up), and one call for a token's chosen
experts (their SwiGLU and weighted sum inside it). Only on one rank, for float32 activations, and for packed
weights only where the library is built and takes them (`CpuPlan.build` returns None otherwise, and the engine
runs `decode_step`). A packed kv_b_proj is folded into the query and unfolded from the attention's output by
one library call each for all heads (cpu_gemv.cpp `dschat_heads_gemv_t`, `dschat_heads_gemv`), as decode_step
folds it (engine/mla.py).
"""

from __future__ import annotations

import ctypes
import os

import torch
import torch.nn.functional as F

from . import dist, hugepages
from .layers.linear import Linear
from .layers.mlp import MLP
from .layers.quant_linear import QuantLinear, packed_of
from .moe import Experts, MoE, QuantExperts
from ..kernels import cpu_gemv, quant_cpu
from ..kernels.norm_rope import rms_norm_reference
from ..kernels.router import route_reference


class _Layer:
    __slots__ = ("in_w", "in_eps", "post_w", "post_eps", "q_a", "q_a_norm", "q_a_eps", "q_b", "q_proj", "kv_a",
                 "kv_norm", "kv_eps", "w_uk", "w_uv", "o", "dense13", "dense2", "gate", "bias", "w13", "w2",
                 "sh13", "sh2", "route_args", "q_a_rows", "c", "xargs", "keep", "kv_b")


class CpuPlan:
    """A model's weights laid out for the lean step: per layer the tensors it reads, and the model's shapes."""

    @classmethod
    def build(cls, model) -> "CpuPlan | None":
        """The plan, or None where the lean step does not apply (not the CPU, several ranks, not float32,
        FP8-kept weights, packed ones the library does not run, a layer of another kind)."""
        try:
            if dist.world_size() != 1 or model.lm_head.weight.device.type != "cpu":
                return None
            return cls(model)
        except (_NotPlain, AttributeError):  # a layer of a kind the plan does not know
            return None

    def __init__(self, model):
        cfg = model.cfg
        self.model, self.cfg = model, cfg
        self.lib = cpu_gemv.native() if os.environ.get("DSCHAT_CPU_STEP_NATIVE", "1") != "0" else None
        self.embed = _w(model.model.embed_tokens.weight)
        self.norm_w, self.norm_eps = _w(model.model.norm.weight), model.model.norm.eps
        self.head = self._proj(model.lm_head)
        self.layers: list[_Layer] = []
        for block in model.model.layers:
            L = _Layer()
            a = block.self_attn
            L.in_w, L.in_eps = _w(block.input_layernorm.weight), block.input_layernorm.eps
            L.post_w, L.post_eps = _w(block.post_attention_layernorm.weight), block.post_attention_layernorm.eps
            L.kv_norm, L.kv_eps = _w(a.kv_a_layernorm.weight), a.kv_a_layernorm.eps
            if hasattr(a, "q_proj"):
                L.q_proj, L.q_a, L.q_a_rows = self._proj(a.q_proj), None, 0
                L.kv_a = self._proj(a.kv_a_proj_with_mqa)
            else:
                # q_a_proj and kv_a_proj_with_mqa read the same x: one product over both weights
                L.q_proj, L.q_a_rows = None, _out_features(a.q_a_proj)
                L.q_a = self._proj(a.q_a_proj, a.kv_a_proj_with_mqa)
                L.q_a_norm, L.q_a_eps = _w(a.q_a_layernorm.weight), a.q_a_layernorm.eps
                L.q_b = self._proj(a.q_b_proj)
            if type(a.kv_b_proj) is QuantLinear:  # packed: folded and unfolded per head by the library
                if self.lib is None:
                    raise _NotPlain
                w = _packed(a.kv_b_proj)
                L.kv_b, L.w_uk, L.w_uv = (w, cpu_gemv.weight_args(w)[4]), None, None
            else:
                w = _lin(a.kv_b_proj).view(a.n_heads, a.nope + a.v_dim, a.kv_rank)
                L.kv_b = None
                L.w_uk = hugepages.copy(w[:, : a.nope])  # [H, nope, R]
                L.w_uv = hugepages.copy(w[:, a.nope:].transpose(1, 2))  # [H, R, v]
            L.o = self._proj(a.o_proj)
            mlp = block.mlp
            if isinstance(mlp, MoE):
                ex = mlp.experts
                L.xargs = None
                if type(ex) is QuantExperts and ex.cpu_w13 is None and self.lib is not None:
                    # the chosen experts in one call of the library (its arguments made once)
                    w13 = packed_of(ex, "w13", ex.spec, ex.dim)
                    w2 = packed_of(ex, "w2", ex.spec, ex.inter)
                    if not (quant_cpu.CPU_KERNEL_MAX_ROWS and quant_cpu.native_gemv(w13)
                            and quant_cpu.native_gemv(w2) and w13.data.device.type == "cpu"):
                        raise _NotPlain
                    L.keep = (w13, w2)
                    L.xargs = cpu_gemv.experts_args(w13, w2)
                elif type(ex) is not Experts or ex.w13_scale is not None:
                    raise _NotPlain
                g = mlp.gate
                L.gate = _w(g.weight).t()
                L.bias = g.e_score_correction_bias
                L.route_args = g.route_args(mlp.first)
                L.w13, L.w2 = (None, None) if L.xargs else (_w(ex.w13), _w(ex.w2))
                L.sh13 = L.sh2 = None
                if mlp.shared_experts is not None:
                    L.sh13, L.sh2 = self._mlp(mlp.shared_experts)
                L.dense13 = None
            elif isinstance(mlp, MLP):
                L.dense13, L.dense2 = self._mlp(mlp)
            else:
                raise _NotPlain
            self.layers.append(L)
        a = model.model.layers[0].self_attn
        self.H, self.nope, self.rope, self.R, self.v = a.n_heads, a.nope, a.rope, a.kv_rank, a.v_dim
        self.scale = a.scale
        self.threads = ctypes.c_int(1)
        if self.lib is not None:
            self._buffers()

    def _proj(self, *linears):
        """The weights of linears that read the same x, as one product: float32 ones as W^T [in, sum of outputs]
        (a view of their stacked rows, see `_fuse`), packed ones as a `_Gemv` of the parts (the library's)."""
        if all(type(m) is Linear for m in linears):
            return (_fuse(*linears) if len(linears) > 1 else _lin(linears[0])).t()
        if self.lib is None or not all(type(m) is QuantLinear for m in linears):
            raise _NotPlain
        return _Gemv(self.lib, [_packed(m) for m in linears])

    def _mlp(self, m: MLP):
        """gate_proj and up_proj as one [dim, 2 * inter] product, down_proj's as [inter, dim]."""
        return self._proj(m.gate_proj, m.up_proj), self._proj(m.down_proj)

    def _mm(self, x: torch.Tensor, w, out: torch.Tensor):
        """out = x W (x one contiguous float32 row, out a buffer): torch.mm, or the library for packed weights."""
        if type(w) is _Gemv:
            w(x, out, self.threads)
        else:
            torch.mm(x, w, out=out)

    def _buffers(self):
        """The native step's activations: one buffer each, the same every token, so that every call into the
        library passes pointers made once."""
        cfg, H, P, R = self.cfg, self.H, self.rope, self.R
        D = cfg.hidden_size
        z = lambda *shape: torch.zeros(*shape)  # noqa: E731
        self.h, self.pend, self.x, self.attn = z(1, D), z(1, D), z(1, D), z(1, D)
        L0 = self.layers[0]
        qdim = H * (self.nope + P)
        self.q = z(1, qdim)
        self.qkv = z(1, L0.q_a_rows + R + P) if L0.q_proj is None else None
        self.kv = self.qkv[:, L0.q_a_rows:] if L0.q_proj is None else z(1, R + P)
        self.qa = z(1, max(L0.q_a_rows, 1))
        self.q_pe = z(H, P)
        self.q_lat = z(H, 1, R)
        self.o_lat = z(H, R)
        self.out = z(H, 1, self.v)
        # dschat_heads_gemv(_t)'s arguments but the weight's (packed kv_b_proj): the fold reads q_nope inside q
        I64, nope, v = ctypes.c_int64, self.nope, self.v
        Pq, Pl, Po, Pout = (ctypes.c_void_p(t.data_ptr()) for t in (self.q, self.q_lat, self.o_lat, self.out))
        self.fold_args = ((Pq, I64(nope + P), I64(H), I64(H), I64(R)), (I64(nope), I64(0), I64(nope + v), Pl, I64(R)))
        self.unfold_args = ((Po, I64(R), I64(H), I64(H), I64(R)), (I64(v), I64(nope), I64(nope + v), Pout, I64(v)))
        self.cs = z(P // 2)
        self.sn = z(P // 2)
        moe = [L for L in self.layers if L.dense13 is None]
        dense = [L for L in self.layers if L.dense13 is not None]
        self.gu = {}  # by 2 * intermediate size: the gate|up product, the SwiGLU's output, the down product
        for n2 in {L.dense13.shape[1] for L in dense} | {L.w13.shape[1] for L in moe if L.w13 is not None} | \
                {L.sh13.shape[1] for L in moe if L.sh13 is not None}:
            self.gu[n2] = (z(1, n2), z(1, n2 // 2))
        self.eo = z(1, D)
        k = moe[0].route_args[0] if moe else 1
        self.glog = z(1, max([L.gate.shape[1] for L in moe] or [1]))
        self.ids_c = (ctypes.c_int64 * k)()
        self.w_c = (ctypes.c_float * k)()
        self.k_c, self.D_c = ctypes.c_int64(k), ctypes.c_int64(D)
        self.vocab = self.head.shape[1]
        P_ = ctypes.c_void_p
        self.p = {name: P_(getattr(self, name).data_ptr()) for name in
                  ("h", "pend", "x", "attn", "q", "kv", "qa", "q_pe", "cs", "sn", "eo", "glog", "q_lat", "o_lat")}
        self.attend_args = (self.p["q_lat"], self.p["q_pe"], H, R, P)  # dschat_mla_attend's, but the rows'
        self.scale_c = ctypes.c_float(self.scale)
        self.p["qkv"] = P_(self.qkv.data_ptr()) if self.qkv is not None else None
        self.p_gu = {n2: (P_(a.data_ptr()), P_(b.data_ptr())) for n2, (a, b) in self.gu.items()}
        for L in self.layers:
            L.c = {name: P_(getattr(L, name).data_ptr()) for name in ("in_w", "post_w", "kv_norm")}
            if L.q_proj is None:
                L.c["q_a_norm"] = P_(L.q_a_norm.data_ptr())
            if L.dense13 is None:
                L.c["bias"] = P_(L.bias.data_ptr()) if L.bias is not None else None

    @torch.inference_mode()
    def step(self, ids: torch.Tensor, length: torch.Tensor, cache: list[torch.Tensor], slot: int,
             keys: torch.Tensor | slice):
        """One token: ids [1, 1] (the fed token), its position = length (the host's `pos`), `slot` the cache
        row it writes, `keys` the cache rows of positions 0..pos (a slice when contiguous, else a tensor of
        slots). Returns (h [1, hidden], logits [1, V] float32, argmax [1]); writes the argmax into ids and adds
        1 to length, as decode_step does."""
        if self.lib is not None:
            return self._native_step(ids, length, cache, slot, keys)
        H, nope, rope, R = self.H, self.nope, self.rope, self.R
        h = F.embedding(ids[0], self.embed)  # [1, D]
        cos, sin = self.model.rotary(length)  # [1, rope/2]
        pending = None
        for i, L in enumerate(self.layers):
            if pending is None:
                x = rms_norm_reference(h, L.in_w, L.in_eps)
            else:
                h = h + pending
                x = rms_norm_reference(h, L.in_w, L.in_eps)
            # -- attention
            if L.q_proj is not None:
                q = torch.mm(x, L.q_proj)
                kv = torch.mm(x, L.kv_a)
            else:
                qkv = torch.mm(x, L.q_a)
                qa, kv = qkv[:, : L.q_a_rows], qkv[:, L.q_a_rows:]
                q = torch.mm(rms_norm_reference(qa, L.q_a_norm, L.q_a_eps), L.q_b)
            q = q.view(H, nope + rope)
            q_nope = q[:, :nope]
            # q's rope and k_pe's rope in one pass over H + 1 rows; the latent's norm; the cache row
            pe = torch.cat([q[:, nope:], kv[:, R:]])  # [H + 1, rope]
            x0, x1 = pe.unflatten(-1, (-1, 2)).unbind(-1)
            pe = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)
            layer = cache[i]
            row = layer[slot]
            row[:R] = rms_norm_reference(kv[0, :R], L.kv_norm, L.kv_eps)
            row[R:] = pe[H]
            q_pe = pe[:H]
            # absorbed attention over the keys 0..pos (all visible to the one query)
            q_lat = torch.bmm(q_nope.unsqueeze(1), L.w_uk).squeeze(1)  # [H, R]
            rows = layer[keys] if isinstance(keys, slice) else layer.index_select(0, keys)
            scores = torch.mm(q_lat, rows[:, :R].t())
            scores += torch.mm(q_pe, rows[:, R:].t())
            scores *= self.scale
            p = scores.softmax(dim=-1)
            o_lat = torch.mm(p, rows[:, :R])  # [H, R]
            out = torch.bmm(o_lat.unsqueeze(1), L.w_uv).view(1, -1)  # [1, H * v]
            attn = torch.mm(out, L.o)
            h = h + attn
            x = rms_norm_reference(h, L.post_w, L.post_eps)
            # -- MLP / MoE
            if L.dense13 is not None:
                gate, up = torch.mm(x, L.dense13).chunk(2, dim=-1)
                pending = torch.mm(F.silu(gate) * up, L.dense2)
                continue
            weights, chosen = route_reference(torch.mm(x, L.gate), L.bias, *L.route_args)
            y = None
            E = L.w13.shape[0]
            for e, w in zip(chosen[0].tolist(), weights[0].tolist()):
                if 0 <= e < E:
                    gate, up = F.linear(x, L.w13[e]).chunk(2, dim=-1)
                    o = F.linear(F.silu(gate) * up, L.w2[e]) * w
                    y = o if y is None else y.add_(o)
            if y is None:
                y = torch.zeros_like(x)
            if L.sh13 is not None:
                gate, up = torch.mm(x, L.sh13).chunk(2, dim=-1)
                y = y + torch.mm(F.silu(gate) * up, L.sh2)
            pending = y
        h = h + pending
        logits = torch.mm(rms_norm_reference(h, self.norm_w, self.norm_eps), self.head)
        tokens = logits.argmax(dim=-1)
        length.add_(1)
        ids.copy_(tokens.view(1, 1))
        return h, logits, tokens


    def _swiglu(self, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, out: torch.Tensor):
        """out = (silu(x W1) * (x W3)) W2 through the fixed buffers: w13 [D, 2I] (gate | up), w2 [I, D], views."""
        n2 = w13.shape[1]
        gu, act = self.gu[n2]
        pg, pa = self.p_gu[n2]
        self._mm(x, w13, gu)
        self.lib.dschat_silu_mul(pg, n2 // 2, pa)
        self._mm(act, w2, out)

    @staticmethod
    def _heads(fn, args, wargs, threads):
        """MLA's fold / unfold over a packed kv_b_proj: one call of the library for every head."""
        err = fn(*args[0], *wargs, *args[1], threads)
        cpu_gemv.check(err)

    def _native_step(self, ids, length, cache, slot: int, keys):
        """step() with its small operations in the library (kernels/cpu_gemv.cpp) over fixed buffers."""
        lib, p, H, nope, rope, R = self.lib, self.p, self.H, self.nope, self.rope, self.R
        mm, pmm = torch.mm, self._mm
        self.threads = threads = ctypes.c_int(torch.get_num_threads())
        row_bytes = (R + rope) * 4
        D = self.h.shape[1]
        h, x, q, kv, q_pe = self.h, self.x, self.q, self.kv, self.q_pe
        torch.index_select(self.embed, 0, ids[0], out=h)
        cos, sin = self.model.rotary(length)
        self.cs.copy_(cos[0])
        self.sn.copy_(sin[0])
        qh = q.view(H, nope + rope)
        q_nope = qh[:, :nope].unsqueeze(1)
        # the keys' rows: first .. first + T - 1, or at the slots `keys` holds (kept alive in `keep`)
        keep, slots, first, T = cpu_gemv.attend_keys(keys)  # noqa: F841
        start = True
        for i, L in enumerate(self.layers):
            c = L.c
            lib.dschat_add_rms(p["h"], None if start else p["pend"], c["in_w"], L.in_eps, D, p["x"])
            start = False
            if L.q_proj is not None:
                pmm(x, L.q_proj, q)
                pmm(x, L.kv_a, kv)
            else:
                pmm(x, L.q_a, self.qkv)
                lib.dschat_add_rms(p["qkv"], None, c["q_a_norm"], L.q_a_eps, L.q_a_rows, p["qa"])
                pmm(self.qa, L.q_b, q)
            layer = cache[i]
            lib.dschat_rope_latent(p["q"], H, nope + rope, nope, p["kv"], R, rope, c["kv_norm"], L.kv_eps, p["cs"],
                                   p["sn"], layer.data_ptr() + slot * row_bytes, p["q_pe"])
            if L.kv_b is None:
                torch.bmm(q_nope, L.w_uk, out=self.q_lat)
            else:
                self._heads(lib.dschat_heads_gemv_t, self.fold_args, L.kv_b[1], threads)
            # the attention over the keys' rows, read in place (no gather), into o_lat
            cpu_gemv.check(lib.dschat_mla_attend(*self.attend_args, layer.data_ptr(), slots, first, T, self.scale_c,
                                                 p["o_lat"], threads), "bad attention arguments")
            if L.kv_b is None:
                torch.bmm(self.o_lat.unsqueeze(1), L.w_uv, out=self.out)
            else:
                self._heads(lib.dschat_heads_gemv, self.unfold_args, L.kv_b[1], threads)
            pmm(self.out.view(1, -1), L.o, self.attn)
            lib.dschat_add_rms(p["h"], p["attn"], c["post_w"], L.post_eps, D, p["x"])
            if L.dense13 is not None:
                self._swiglu(x, L.dense13, L.dense2, self.pend)
                continue
            E = L.gate.shape[1]
            glog = self.glog[:, :E]
            mm(x, L.gate, out=glog)
            k, n_group, topk_group, top2, softmax, normalise, scale, offset = L.route_args
            lib.dschat_route(p["glog"], E, c["bias"], k, n_group, topk_group, top2, softmax, normalise,
                             0.0 if scale is None else scale, offset, self.ids_c, self.w_c)
            if L.xargs is not None:  # packed experts: the chosen ones, their SwiGLU and weighted sum in one call
                err = lib.dschat_experts_raw(p["x"], self.D_c, self.ids_c, self.w_c, self.k_c, *L.xargs, p["pend"],
                                             threads)
                cpu_gemv.check(err)
            E = 0 if L.w13 is None else L.w13.shape[0]
            none = L.xargs is None
            for j in range(k if none else 0):
                e = self.ids_c[j]
                if 0 <= e < E:
                    self._swiglu(x, L.w13[e].t(), L.w2[e].t(), self.eo)
                    lib.dschat_axpy(p["pend"], p["eo"], self.w_c[j], D, none)
                    none = False
            if none:
                self.pend.zero_()
            if L.sh13 is not None:
                self._swiglu(x, L.sh13, L.sh2, self.eo)
                lib.dschat_axpy(p["pend"], p["eo"], 1.0, D, 0)
        h_out = self.h + self.pend
        lib.dschat_add_rms(p["h"], p["pend"], ctypes.c_void_p(self.norm_w.data_ptr()), self.norm_eps, D, p["x"])
        logits = torch.empty(1, self.vocab)
        pmm(x, self.head, logits)
        tokens = torch.tensor([lib.dschat_argmax(logits.data_ptr(), self.vocab)])  # logits.argmax(dim=-1)'s
        length.add_(1)
        ids.copy_(tokens.view(1, 1))
        return h_out, logits, tokens


class _NotPlain(Exception):
    pass


class _Gemv:
    """Packed weights that read the same x (their outputs side by side, as `_fuse` stacks float ones) through
    cpu_gemv's kernel: one call a weight, every argument but x's and the output's made once."""

    def __init__(self, lib, parts: list):
        self.fn, self.keep = lib.dschat_gemv_raw, parts  # keep: the tensors the arguments point into
        K = parts[0].in_features
        if any(w.in_features != K for w in parts):
            raise _NotPlain
        self.calls, at = [], 0  # (the weight's arguments, where its outputs start in bytes)
        for w in parts:
            _, _, _, N, args = cpu_gemv.weight_args(w)
            self.calls.append((args, at))
            at += N * 4
        self.shape = (K, at // 4)  # W^T's, as for a float weight
        self.one, self.K = ctypes.c_int64(1), ctypes.c_int64(K)

    def __call__(self, x: torch.Tensor, out: torch.Tensor, threads: ctypes.c_int):
        px, y = ctypes.c_void_p(x.data_ptr()), out.data_ptr()
        for args, at in self.calls:
            err = self.fn(px, self.one, self.K, *args, ctypes.c_void_p(y + at), threads)
            cpu_gemv.check(err)


def _packed(m: QuantLinear):
    """m's packed weight where the library runs it at one row as decode_step does (kernels/quant_cpu.py)."""
    if m.cpu_weight is not None or m.weight is None or m.weight.device.type != "cpu":
        raise _NotPlain  # int4 in PyTorch's own layout (no library), or elsewhere
    w = packed_of(m, "weight", m.spec, m.in_features)
    if not (quant_cpu.CPU_KERNEL_MAX_ROWS and quant_cpu.native_gemv(w)):
        raise _NotPlain
    return w


def _out_features(m) -> int:
    return m.out_features if type(m) is QuantLinear else m.weight.shape[0]


def _w(t: torch.Tensor) -> torch.Tensor:
    if t is None or t.dtype != torch.float32 or t.device.type != "cpu":
        raise _NotPlain
    return t.detach()


def _lin(m) -> torch.Tensor:
    """The weight of a plain float32 Linear (not FP8-kept, not packed)."""
    if type(m) is not Linear or m.scale is not None:
        raise _NotPlain
    return _w(m.weight)


def _fuse(*linears: Linear) -> torch.Tensor:
    """The weights of linears that read the same input, stacked into one [sum of outputs, in] tensor; each
    Linear's weight becomes a view of its rows, so no second copy is kept (a second plan of the same model
    finds them stacked already)."""
    ws = [_lin(m) for m in linears]
    rows = sum(w.shape[0] for w in ws)
    first = ws[0]
    stacked = first.is_contiguous() and all(
        w.is_contiguous() and w.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        and w.storage_offset() == first.storage_offset() + sum(v.numel() for v in ws[:i])
        for i, w in enumerate(ws))
    if stacked:
        return first.as_strided((rows, first.shape[1]), (first.shape[1], 1))
    whole = torch.cat(ws, out=hugepages.empty((rows, first.shape[1]), first.dtype))
    start = 0
    for m, w in zip(linears, ws):
        m.weight.data = whole[start:start + w.shape[0]]
        start += w.shape[0]
    return whole
