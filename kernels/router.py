"""DeepSeekMoE's router after its linear layer, in one kernel: scores, correction bias, group-limited top-k,
normalisation, routed scaling (issue 21: the reference is ~8 PyTorch operations a MoE layer).

    route(logits [T,E] float32, bias [E] | None, k, n_group, topk_group, top2, softmax, normalise, scale,
          offset) -> (weights [T,k] float32, ids [T,k] int64)

scores = softmax(logits) or sigmoid(logits); the experts are chosen by scores + bias (V3's
e_score_correction_bias only chooses); with n_group > 1 only the topk_group best groups may be chosen (a
group's score: its best expert's, or with `top2` the sum of its best two: V3's noaux_tc); the weights are
the chosen experts' unbiased scores, divided by their sum when `normalise`, times `scale` when it is given;
ids come back minus `offset` (the first expert this rank holds). `route_reference` is the engine's own
PyTorch code (what the CPU runs: greedy tokens stay transformers'); `route_triton` one program a token.
The chosen ids come in descending order of choice, as torch.topk gives them; ties go to the lower id.
"""

from __future__ import annotations

import torch

from .triton_support import tl, triton


def route_reference(logits: torch.Tensor, bias: torch.Tensor | None, k: int, n_group: int, topk_group: int,
                    top2: bool, softmax: bool, normalise: bool, scale: float | None,
                    offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    scores = logits.softmax(dim=-1) if softmax else logits.sigmoid()
    choice = scores
    if bias is not None:
        choice = scores + bias.float()
    if n_group > 1:
        groups = choice.view(-1, n_group, logits.shape[-1] // n_group)
        group_scores = groups.topk(2, dim=-1).values.sum(dim=-1) if top2 else groups.amax(dim=-1)
        keep = group_scores.topk(topk_group, dim=-1).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        choice = groups.masked_fill(~group_mask[..., None], float("-inf")).flatten(1)
    idx = choice.topk(k, dim=-1).indices
    weights = scores.gather(1, idx)
    if normalise:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    if scale is not None:
        weights = weights * scale
    return weights, (idx if offset == 0 else idx - offset)


if triton is not None:

    @triton.jit
    def _router_kernel(Logits, Bias, Weights, Ids, E, EG, n_group, topk_group, scale, offset, stride_l, stride_o,
                       K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_EG: tl.constexpr,
                       HAS_BIAS: tl.constexpr, SOFTMAX: tl.constexpr, GROUPED: tl.constexpr, TOP2: tl.constexpr,
                       NORMALISE: tl.constexpr, SCALE: tl.constexpr):
        """One token: its E logits as [groups, experts a group]."""
        t = tl.program_id(0)
        g = tl.arange(0, BLOCK_G)
        c = tl.arange(0, BLOCK_EG)
        valid = (g[:, None] < n_group) & (c[None, :] < EG)
        e = g[:, None] * EG + c[None, :]
        logit = tl.load(Logits + t * stride_l + e, mask=valid, other=float("-inf"))
        if SOFTMAX:
            p = tl.exp(logit - tl.max(tl.max(logit, axis=1), axis=0))
            p = tl.where(valid, p, 0.0)
            scores = p / tl.sum(tl.sum(p, axis=1), axis=0)
        else:
            scores = 1.0 / (1.0 + tl.exp(-logit))
        choice = scores
        if HAS_BIAS:
            choice = scores + tl.load(Bias + e, mask=valid, other=0.0).to(tl.float32)
        choice = tl.where(valid, choice, float("-inf"))
        if GROUPED:
            best = tl.max(choice, axis=1)
            if TOP2:  # the best two of a group: drop the first best once, take the best again
                first = tl.argmax(choice, axis=1, tie_break_left=True)
                rest = tl.where(c[None, :] == first[:, None], float("-inf"), choice)
                best = best + tl.max(rest, axis=1)
            best = tl.where(g < n_group, best, float("-inf"))
            keep = g < 0
            for _ in range(topk_group):
                m = tl.max(best, axis=0)
                pick = tl.min(tl.where(best == m, g, BLOCK_G), axis=0)
                keep = keep | (g == pick)
                best = tl.where(g == pick, float("-inf"), best)
            choice = tl.where(keep[:, None], choice, float("-inf"))
        kk = tl.arange(0, BLOCK_K)
        w = tl.zeros([BLOCK_K], tl.float32)
        ids = tl.zeros([BLOCK_K], tl.int64)
        for j in tl.static_range(K):
            m = tl.max(tl.max(choice, axis=1), axis=0)
            pick = tl.min(tl.min(tl.where(choice == m, e, E), axis=1), axis=0)
            here = e == pick
            s = tl.sum(tl.sum(tl.where(here, scores, 0.0), axis=1), axis=0)
            w = tl.where(kk == j, s, w)
            ids = tl.where(kk == j, pick.to(tl.int64), ids)
            choice = tl.where(here, float("-inf"), choice)
        if NORMALISE:
            w = w / (tl.sum(w, axis=0) + 1e-20)
        if SCALE:
            w = w * scale
        tl.store(Weights + t * stride_o + kk, w, mask=kk < K)
        tl.store(Ids + t * stride_o + kk, ids - offset, mask=kk < K)


def route_triton(logits, bias, k: int, n_group: int, topk_group: int, top2: bool, softmax: bool, normalise: bool,
                 scale: float | None, offset: int):
    """Same contract as route_reference, one launch."""
    T, E = logits.shape
    logits = logits.contiguous()
    weights = torch.empty(T, k, device=logits.device, dtype=torch.float32)
    ids = torch.empty(T, k, device=logits.device, dtype=torch.int64)
    EG = E // n_group
    _router_kernel[(T,)](
        logits, bias if bias is not None else logits, weights, ids, E, EG, n_group, topk_group,
        1.0 if scale is None else scale, offset, logits.stride(0), weights.stride(0),
        K=k, BLOCK_K=triton.next_power_of_2(k), BLOCK_G=triton.next_power_of_2(n_group),
        BLOCK_EG=triton.next_power_of_2(EG), HAS_BIAS=bias is not None, SOFTMAX=softmax, GROUPED=n_group > 1,
        TOP2=top2, NORMALISE=normalise, SCALE=scale is not None, num_warps=4)
    return weights, ids


def route(logits, bias, k: int, n_group: int, topk_group: int, top2: bool, softmax: bool, normalise: bool,
          scale: float | None, offset: int):
    """Triton on CUDA (inference), the reference elsewhere."""
    if triton is not None and logits.is_cuda and not (torch.is_grad_enabled() and logits.requires_grad):
        return route_triton(logits, bias, k, n_group, topk_group, top2, softmax, normalise, scale, offset)
    return route_reference(logits, bias, k, n_group, topk_group, top2, softmax, normalise, scale, offset)
