"""MoE router of a decode batch: gate logits, scores, group-limited top-k and routing weights, no sort
(docs/design.md §3.3 step 6).

Symbols: T tokens, D hidden size, E routed experts in G groups of E / G, k choices per token, g_keep = topk_group.
For token t, in float32 (the gate is stored float32, as DeepSeek's code keeps it)::

    logits  = W_gate x_t                                   [E]
    scores  = sigmoid(logits)  (V3)  |  softmax(logits)  (V2)
    choice  = scores + bias    (V3: the correction bias steers the choice only)  |  scores
    group   = sum of the 2 best choices of each group (V3)  |  best choice (V2 group_limited_greedy)
    keep    = the g_keep best groups (V3, V2 group_limited_greedy; all groups for greedy)
    ids     = the k best choices among kept groups, best first
    weights = scores[ids], / their sum if normalised, x routed_scaling_factor (V3 always; V2 if not normalised)

``route_torch`` is that math in torch (top-k and scatter on tensors; the definition, used on CPU and for
prefill); the Triton path is two launches and no host sync, capturable in a CUDA graph:

1. ``_logits_kernel``, grid (E / BLOCK_E, T): BLOCK_E rows of W_gate dotted with x_t (16-byte loads along D,
   float32 accumulation), so the 4 B E D weight bytes are streamed by many programs rather than one.
2. ``_select_kernel``, grid (T,): one program holds the token's E logits in registers, computes the scores, the
   group scores and the kept groups with masked max / argmax reductions (a k-step argmax loop instead of a sort),
   and writes ids (shifted by ``offset``: the caller's first local expert, so ids arrive in the local numbering
   kernels.moe_decode takes) and weights.

Ties between equal choices go to the lower index (torch.topk's order for equal values is unspecified; random
float scores do not tie).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels._triton import interpreting, launcher, next_pow2, tl, triton, use_triton

__all__ = ["RouterSpec", "route", "route_torch", "route_triton"]


@dataclass(frozen=True)
class RouterSpec:
    """The routing rule, from the model's config keys (built once, at the module's construction)."""

    experts: int  # n_routed_experts
    k: int  # num_experts_per_tok
    groups: int = 1  # n_group
    keep_groups: int = 1  # topk_group
    sigmoid: bool = True  # scoring_func == "sigmoid" (V3); False: softmax (V2)
    limit_groups: bool = True  # group-limited choice (V3 always; V2 topk_method == "group_limited_greedy")
    normalise: bool = True  # weights / their sum
    scale: float = 1.0  # routed_scaling_factor, or 1.0 where the rule does not scale

    def __post_init__(self):
        if self.experts % self.groups or not 1 <= self.keep_groups <= self.groups or not 1 <= self.k <= self.experts:
            raise ValueError(f"router: {self.experts} experts in {self.groups} groups, keep {self.keep_groups}, "
                             f"k = {self.k}: need groups | experts, 1 <= keep <= groups and 1 <= k <= experts")


def _validate(x: torch.Tensor, gate: torch.Tensor, bias: torch.Tensor | None, spec: RouterSpec) -> None:
    if x.dim() != 2 or gate.shape != (spec.experts, x.shape[1]):
        raise ValueError(f"router: x must be [T, D] and gate [E={spec.experts}, D]; got {tuple(x.shape)}, "
                         f"{tuple(gate.shape)}")
    if gate.dtype != torch.float32 or not gate.is_contiguous():
        raise TypeError(f"router: gate must be a contiguous float32 [E, D] (got {gate.dtype})")
    if spec.sigmoid and (bias is None or bias.shape != (spec.experts,) or bias.dtype != torch.float32):
        raise ValueError("router: sigmoid scoring needs the float32 correction bias [E]")


# ----------------------------------------------------------------------------------------------------
# torch reference
# ----------------------------------------------------------------------------------------------------
def route_torch(x: torch.Tensor, gate: torch.Tensor, bias: torch.Tensor | None, spec: RouterSpec,
                offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, D] -> (ids [T, k] int64 minus ``offset``, weights [T, k] float32): the module docstring's math."""
    _validate(x, gate, bias, spec)
    logits = F.linear(x.float(), gate)
    t, e = logits.shape
    g = spec.groups
    if spec.sigmoid:
        scores = logits.sigmoid()
        choice = scores + bias
        group_score = choice.view(t, g, e // g).topk(min(2, e // g), dim=-1).values.sum(-1)
        masked_fill = float("-inf")
    else:
        scores = logits.softmax(dim=-1)
        choice = scores
        group_score = choice.view(t, g, e // g).max(dim=-1).values
        masked_fill = 0.0  # as transformers' DeepseekV2TopkRouter
    if spec.limit_groups:
        keep_groups = group_score.topk(spec.keep_groups, dim=-1).indices
        group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep_groups, True)
        choice = choice.masked_fill(~group_mask.repeat_interleave(e // g, dim=1), masked_fill)
    ids = choice.topk(spec.k, dim=-1).indices
    weights = scores.gather(1, ids)
    if spec.normalise:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return ids - offset, weights * spec.scale


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _logits_kernel(x_ptr, w_ptr, out_ptr, E, D, s_x_t, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_e = tl.program_id(0)
    t = tl.program_id(1)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    mask_e = offs_e < E
    offs_d = tl.arange(0, BLOCK_D)
    rows = offs_e[:, None].to(tl.int64) * D
    acc = tl.zeros([BLOCK_E, BLOCK_D], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        mask_d = d < D
        xv = tl.load(x_ptr + t.to(tl.int64) * s_x_t + d, mask=mask_d, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rows + d[None, :], mask=mask_e[:, None] & mask_d[None, :], other=0.0)
        acc += w * xv[None, :]
    tl.store(out_ptr + t.to(tl.int64) * E + offs_e, tl.sum(acc, axis=1), mask=mask_e)


@triton.jit
def _select_kernel(logits_ptr, bias_ptr, ids_ptr, wts_ptr, E, K, GROUP, G, KEEP, offset, scale,
                   SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, LIMIT: tl.constexpr, NORMALISE: tl.constexpr,
                   BLOCK_E: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0)
    offs = tl.arange(0, BLOCK_E)
    valid = offs < E
    NEG = float("-inf")
    logit = tl.load(logits_ptr + t.to(tl.int64) * E + offs, mask=valid, other=NEG)
    if SIGMOID:
        scores = 1.0 / (1.0 + tl.exp(-logit))
        if HAS_BIAS:
            choice = scores + tl.load(bias_ptr + offs, mask=valid, other=0.0)
        else:
            choice = scores
        masked = NEG
    else:
        ex = tl.exp(logit - tl.max(logit, axis=0))
        scores = ex / tl.sum(ex, axis=0)
        choice = scores
        masked = 0.0  # as route_torch: dropped groups' experts score 0, not -inf
    choice = tl.where(valid, choice, NEG)
    if LIMIT:
        grp = offs // GROUP
        offs_g = tl.arange(0, BLOCK_G)
        gscore = tl.full([BLOCK_G], NEG, tl.float32)
        for j in range(G):  # group score: best (V2) or sum of the two best (V3) choices of the group
            inside = (grp == j) & valid
            c = tl.where(inside, choice, NEG)
            best = tl.max(c, axis=0)
            if SIGMOID:
                first = tl.argmax(c, axis=0)
                second = tl.max(tl.where(offs == first, NEG, c), axis=0)
                second = tl.where(second == NEG, 0.0, second)  # a one-expert group: its single best
                best = best + second
            gscore = tl.where(offs_g == j, best, gscore)
        kept = tl.zeros([BLOCK_E], tl.int1)
        for _ in range(KEEP):
            j = tl.argmax(gscore, axis=0)
            kept = kept | (grp == j)
            gscore = tl.where(offs_g == j, NEG, gscore)
        choice = tl.where(kept & valid, choice, tl.where(valid, masked, NEG))
    offs_k = tl.arange(0, BLOCK_K)
    ids = tl.zeros([BLOCK_K], tl.int32)
    wts = tl.zeros([BLOCK_K], tl.float32)
    for s in range(K):  # k-step argmax: the best remaining choice, then mask it out
        i = tl.argmax(choice, axis=0)
        ids = tl.where(offs_k == s, i, ids)
        wts = tl.where(offs_k == s, tl.sum(tl.where(offs == i, scores, 0.0), axis=0), wts)
        choice = tl.where(offs == i, NEG, choice)
    if NORMALISE:
        wts = wts / (tl.sum(wts, axis=0) + 1e-20)
    mask_k = offs_k < K
    tl.store(ids_ptr + t.to(tl.int64) * K + offs_k, ids - offset, mask=mask_k)
    tl.store(wts_ptr + t.to(tl.int64) * K + offs_k, wts * scale, mask=mask_k)


# ----------------------------------------------------------------------------------------------------
# wrappers
# ----------------------------------------------------------------------------------------------------
def route_triton(x: torch.Tensor, gate: torch.Tensor, bias: torch.Tensor | None, spec: RouterSpec,
                 offset: int = 0, block_e: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton path of :func:`route` (CUDA, or CPU under the interpreter); ids int32. ``block_e``: gate rows per
    program of the logits GEMV (benchmarks)."""
    _validate(x, gate, bias, spec)
    t, d = x.shape
    ids = torch.empty((t, spec.k), dtype=torch.int32, device=x.device)
    wts = torch.empty((t, spec.k), dtype=torch.float32, device=x.device)
    if t == 0:
        return ids, wts
    if x.stride(-1) != 1:
        x = x.contiguous()
    interpret = interpreting(x)
    logits = torch.empty((t, spec.experts), dtype=torch.float32, device=x.device)
    block_e = min(next_pow2(block_e), next_pow2(spec.experts))
    launcher(_logits_kernel, interpret)[(triton.cdiv(spec.experts, block_e), t)](
        x, gate, logits, spec.experts, d, x.stride(0), BLOCK_E=block_e, BLOCK_D=min(512, next_pow2(d)),
        num_warps=4)
    launcher(_select_kernel, interpret)[(t,)](
        logits, bias if bias is not None else logits, ids, wts, spec.experts, spec.k, spec.experts // spec.groups,
        spec.groups, spec.keep_groups, offset, spec.scale,
        SIGMOID=spec.sigmoid, HAS_BIAS=bias is not None, LIMIT=spec.limit_groups, NORMALISE=spec.normalise,
        BLOCK_E=next_pow2(spec.experts), BLOCK_G=next_pow2(spec.groups), BLOCK_K=next_pow2(spec.k), num_warps=4)
    return ids, wts


def route(x: torch.Tensor, gate: torch.Tensor, bias: torch.Tensor | None, spec: RouterSpec, offset: int = 0,
          path: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Route a batch of tokens.

    Args:
        x: [T, D] activations (any float dtype; the logits are float32).
        gate: [E, D] float32 router weight; bias: [E] float32 correction bias (sigmoid scoring), else None.
        spec: the routing rule; offset: subtracted from every id (the caller's first local expert).

    Returns:
        ids [T, k] (int64 on the torch path, int32 on the Triton path) best first, minus ``offset``;
        weights [T, k] float32.

    ``path``: kernels/_triton.py's rule (auto: Triton on CUDA tensors, the torch reference on CPU).
    """
    if use_triton(x, path):
        return route_triton(x, gate, bias, spec, offset)
    return route_torch(x, gate, bias, spec, offset)
