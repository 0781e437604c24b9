"""Routed-expert FFN for decode batches: only the experts a token chose are read (docs/design.md §3.3 step 6).

Symbols: T tokens (the decode batch), k choices per token, E_r local experts, I = moe_intermediate_size
(or this rank's TP slice of it), D = hidden size. For token t and choice s with local expert e = ids[t, s]

    y[t] = sum_s  weights[t, s] * W_down[e] (silu(W_gate[e] x_t) * (W_up[e] x_t))     (float32 accumulation)

A choice whose id is outside [0, E_r) belongs to another rank (or to nobody): it contributes nothing and
neither its expert's weights nor its routing weight are read. With ``shared`` experts (W_gate^s, W_up^s [I_s, D],
W_down^s [D, I_s]: the shared MLP, or this rank's TP slice of it) every token also adds, with weight 1 and first,

    W_down^s (silu(W_gate^s x_t) * (W_up^s x_t))

so the decode step reads the shared and the routed experts' weights in the same two launches.

Triton kernels (memory-bound GEMVs, two launches, no host sync, so the call can be captured in a CUDA graph):

1. ``_gate_up_kernel``, grid (T*k slots [+ T shared slots], I tiles). Slots are the fastest grid axis, so slots that chose the
   same expert read the same rows side by side and all but the first find them in L2. A program loads its
   slot's expert id and returns at once if it is not local; otherwise it streams its [BLOCK_I, D] rows of
   W_gate and W_up (16-byte loads along D), dots them with x_t in float32 and writes
   h = silu(g) * u for its I tile into a float32 scratch h [T*k, I]; a shared slot does the same for its token
   with the shared rows into h_s [T, I_s].
2. ``_down_kernel``, grid (T, D tiles). A program walks its token's k slots in order 0..k-1, skips the
   non-local ones (the shared expert first), and for each streams its [BLOCK_N, I] rows of W_down[e], dots them with h_slot and adds
   weight * result to a float32 accumulator; the reduction over k happens in registers in a fixed order
   (deterministic, no atomics, no [T, k, D] scratch), and the row of y is written once in x's dtype.

Loaded tiles are converted to float32 at once and all arithmetic is elementwise float32 (no tl.dot): exact
under the CPU interpreter too, where bfloat16 arithmetic is not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels._triton import interpreting, launcher, next_pow2, tl, triton, use_triton

__all__ = ["moe_decode", "moe_decode_torch", "moe_decode_triton", "MoEConfig", "default_config"]


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _gate_up_rows(x_row, wg, wu, h_out, n_rows, D, pid_i, BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr):
    """h_out[i] = silu(wg[i] . x) * (wu[i] . x) for the BLOCK_I rows i of tile pid_i ([n_rows, D] weights)."""
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = offs_i < n_rows
    offs_d = tl.arange(0, BLOCK_D)
    rows = offs_i[:, None].to(tl.int64) * D                                 # [BLOCK_I, 1] row starts
    # elementwise partial products, reduced once after the loop (no cross-lane reduction per tile)
    acc_g = tl.zeros([BLOCK_I, BLOCK_D], tl.float32)
    acc_u = tl.zeros([BLOCK_I, BLOCK_D], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        mask_d = d < D
        xv = tl.load(x_row + d, mask=mask_d, other=0.0).to(tl.float32)
        m = mask_i[:, None] & mask_d[None, :]
        g = tl.load(wg + rows + d[None, :], mask=m, other=0.0).to(tl.float32)
        u = tl.load(wu + rows + d[None, :], mask=m, other=0.0).to(tl.float32)
        acc_g += g * xv[None, :]
        acc_u += u * xv[None, :]
    g = tl.sum(acc_g, axis=1)
    u = tl.sum(acc_u, axis=1)
    tl.store(h_out + offs_i, g / (1.0 + tl.exp(-g)) * u, mask=mask_i)       # silu(g) * u


@triton.jit
def _gate_up_kernel(
    x_ptr, wg_ptr, wu_ptr, ids_ptr, h_ptr,
    sg_ptr, su_ptr, hs_ptr,                 # shared expert gate / up [I_S, D] and its h [T, I_S]
    T, K, E, I, D, I_S,
    s_x_t,                                  # x [T, D], last dim contiguous
    s_id_t, s_id_k,                         # expert_ids [T, K]
    s_w_e,                                  # w_gate / w_up [E, I, D], contiguous
    BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr,
):
    slot = tl.program_id(0)
    pid_i = tl.program_id(1)
    if slot < T * K:  # a routed choice: its expert's rows, if the expert is this rank's
        t = slot // K
        e = tl.load(ids_ptr + t * s_id_t + (slot % K) * s_id_k).to(tl.int64)
        if (e >= 0) & (e < E) & (pid_i * BLOCK_I < I):  # another rank's expert: read nothing, write nothing
            _gate_up_rows(x_ptr + t.to(tl.int64) * s_x_t, wg_ptr + e * s_w_e, wu_ptr + e * s_w_e,
                          h_ptr + slot.to(tl.int64) * I, I, D, pid_i, BLOCK_I, BLOCK_D)
    else:  # programs T K .. T K + T - 1: token slot - T K through the shared expert
        t = slot - T * K
        if pid_i * BLOCK_I < I_S:
            _gate_up_rows(x_ptr + t.to(tl.int64) * s_x_t, sg_ptr, su_ptr, hs_ptr + t.to(tl.int64) * I_S, I_S, D,
                          pid_i, BLOCK_I, BLOCK_D)


@triton.jit
def _down_rows(h_row, w, offs_n, mask_n, n_cols, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_N] float32: rows offs_n of w [., n_cols] dotted with h_row [n_cols] (float32)."""
    offs_k = tl.arange(0, BLOCK_K)
    rows = offs_n[:, None].to(tl.int64) * n_cols                            # [BLOCK_N, 1]
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, n_cols, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < n_cols
        hv = tl.load(h_row + kk, mask=mask_k, other=0.0)
        wv = tl.load(w + rows + kk[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc += wv.to(tl.float32) * hv[None, :]
    return tl.sum(acc, axis=1)


@triton.jit
def _down_kernel(
    h_ptr, wd_ptr, ids_ptr, wts_ptr, y_ptr,
    hs_ptr, sd_ptr,                         # shared expert h [T, I_S] and down [D, I_S]
    K, E, I, D, I_S,
    s_id_t, s_id_k,                         # expert_ids [T, K]
    s_wt_t, s_wt_k,                         # weights [T, K] float32
    s_w_e,                                  # w_down [E, D, I], contiguous
    s_y_t,                                  # y [T, D], last dim contiguous
    HAS_SHARED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < D
    y = tl.zeros([BLOCK_N], tl.float32)
    if HAS_SHARED:  # the shared expert first, weight 1
        y += _down_rows(hs_ptr + t.to(tl.int64) * I_S, sd_ptr, offs_n, mask_n, I_S, BLOCK_N, BLOCK_K)
    for s in range(K):  # fixed order: the sum over choices is deterministic
        e = tl.load(ids_ptr + t * s_id_t + s * s_id_k).to(tl.int64)
        if (e >= 0) & (e < E):
            w = tl.load(wts_ptr + t * s_wt_t + s * s_wt_k)
            y += w * _down_rows(h_ptr + (t * K + s).to(tl.int64) * I, wd_ptr + e * s_w_e, offs_n, mask_n, I,
                                BLOCK_N, BLOCK_K)
    tl.store(y_ptr + t.to(tl.int64) * s_y_t + offs_n, y.to(y_ptr.dtype.element_ty), mask=mask_n)


@dataclass(frozen=True)
class MoEConfig:
    """Launch shape: stage 1 tiles [block_i, block_d] of W_gate/W_up, stage 2 tiles [block_n, block_k]
    of W_down."""

    block_i: int = 16
    block_d: int = 256
    warps_1: int = 4
    block_n: int = 16
    block_k: int = 512  # 1.14-1.2x faster than 256 on H200 at DeepSeek-V3-Lite shapes (golden/perf/layer-h200.md)
    warps_2: int = 4
    stages: int = 3  # software-pipelining depth of both kernels' loops


def default_config(interpret: bool) -> MoEConfig:
    """The interpreter wants few, large programs; on the GPU small row tiles give enough programs to
    keep every SM streaming even when only one or two slots are local (see golden/perf/moe-*.md)."""
    if interpret:
        return MoEConfig(block_i=64, block_d=128, warps_1=1, block_n=64, block_k=128, warps_2=1)
    return MoEConfig()


# ----------------------------------------------------------------------------------------------------
# validation shared by both paths
# ----------------------------------------------------------------------------------------------------
def _validate(x, w_gate, w_up, w_down, expert_ids, weights, shared=None) -> tuple[int, int, int, int, int]:
    if x.dim() != 2 or w_gate.dim() != 3 or w_up.dim() != 3 or w_down.dim() != 3:
        raise ValueError(f"expected x [T,D], w_gate/w_up [E,I,D], w_down [E,D,I]; got {tuple(x.shape)}, "
                         f"{tuple(w_gate.shape)}, {tuple(w_up.shape)}, {tuple(w_down.shape)}")
    tokens, hidden = x.shape
    experts, inter, _ = w_gate.shape
    if w_gate.shape[2] != hidden or w_up.shape != w_gate.shape or w_down.shape != (experts, hidden, inter):
        raise ValueError(f"weights do not match x [T, D={hidden}]: w_gate {tuple(w_gate.shape)}, "
                         f"w_up {tuple(w_up.shape)}, w_down {tuple(w_down.shape)} (want [E,I,D], [E,I,D], [E,D,I])")
    if expert_ids.dim() != 2 or expert_ids.shape[0] != tokens or weights.shape != expert_ids.shape:
        raise ValueError(f"expert_ids and weights must both be [T={tokens}, k], got {tuple(expert_ids.shape)} "
                         f"and {tuple(weights.shape)}")
    if expert_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"expert_ids must be int32 or int64, got {expert_ids.dtype}")
    if weights.dtype != torch.float32:
        raise TypeError(f"weights must be float32 routing weights, got {weights.dtype}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x dtype {x.dtype} not supported (float16, bfloat16 or float32)")
    if any(w.dtype != x.dtype for w in (w_gate, w_up, w_down)):
        raise TypeError(f"x {x.dtype} and the expert weights {w_gate.dtype}/{w_up.dtype}/{w_down.dtype} must "
                        "share one dtype")
    if any(not w.is_contiguous() for w in (w_gate, w_up, w_down)):
        raise ValueError("expert weights must be contiguous (stacked [E, rows, cols])")
    if shared is not None:
        sg, su, sd = shared
        if sg.dim() != 2 or sg.shape[1] != hidden or su.shape != sg.shape or sd.shape != (hidden, sg.shape[0]):
            raise ValueError(f"shared expert must be gate/up [I_s, D={hidden}] and down [D, I_s]; got "
                             f"{tuple(sg.shape)}, {tuple(su.shape)}, {tuple(sd.shape)}")
        if any(w.dtype != x.dtype or not w.is_contiguous() for w in shared):
            raise TypeError(f"shared expert weights must be contiguous and of x's dtype {x.dtype}")
    devs = {t.device for t in (x, w_gate, w_up, w_down, expert_ids, weights, *(shared or ()))}
    if len(devs) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devs))}")
    return tokens, expert_ids.shape[1], experts, inter, hidden


# ----------------------------------------------------------------------------------------------------
# torch reference
# ----------------------------------------------------------------------------------------------------
def moe_decode_torch(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                     expert_ids: torch.Tensor, weights: torch.Tensor, shared: tuple | None = None) -> torch.Tensor:
    """Torch reference of :func:`moe_decode`: the shared expert, then a loop over the local experts that were
    chosen, float32 math. Not graph-capturable (reads the chosen ids on the host)."""
    _validate(x, w_gate, w_up, w_down, expert_ids, weights, shared)
    experts = w_gate.shape[0]
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    if shared is not None:
        sg, su, sd = (w.float() for w in shared)
        y += (F.silu(x.float() @ sg.T) * (x.float() @ su.T)) @ sd.T
    valid = (expert_ids >= 0) & (expert_ids < experts)
    for j in torch.unique(expert_ids[valid]).tolist():
        token, slot = torch.where(expert_ids == j)
        xs = x[token].float()
        h = F.silu(xs @ w_gate[j].float().T) * (xs @ w_up[j].float().T)           # [n, I]
        y.index_add_(0, token, (h @ w_down[j].float().T) * weights[token, slot, None])
    return y.to(x.dtype)


# ----------------------------------------------------------------------------------------------------
# Triton wrapper
# ----------------------------------------------------------------------------------------------------
def moe_decode_triton(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                      expert_ids: torch.Tensor, weights: torch.Tensor, shared: tuple | None = None,
                      config: MoEConfig | None = None) -> torch.Tensor:
    """Triton path of :func:`moe_decode` (CUDA, or CPU under the interpreter). No host sync: capturable in
    a CUDA graph. ``config`` overrides the launch shape (benchmarks, tests)."""
    tokens, k, experts, inter, hidden = _validate(x, w_gate, w_up, w_down, expert_ids, weights, shared)
    y = torch.empty((tokens, hidden), dtype=x.dtype, device=x.device)
    if tokens == 0 or hidden == 0:
        return y
    inter_s = shared[0].shape[0] if shared is not None else 0
    if inter_s == 0 and (k == 0 or experts == 0 or inter == 0):
        return y.zero_()
    if x.stride(-1) != 1:
        x = x.contiguous()

    interpret = interpreting(x)
    cfg = config or default_config(interpret)
    # powers of two, no wider than the matrix they tile
    widest = max(inter, inter_s, 1)
    block_i = min(next_pow2(cfg.block_i), next_pow2(widest))
    block_d = min(next_pow2(cfg.block_d), next_pow2(hidden))
    block_n = min(next_pow2(cfg.block_n), next_pow2(hidden))
    block_k = min(next_pow2(cfg.block_k), next_pow2(widest))
    h = torch.empty((tokens * k, inter), dtype=torch.float32, device=x.device)  # silu(g) * u per slot
    sg, su, sd = shared if shared is not None else (w_gate, w_up, w_down)  # unread placeholders without
    h_s = torch.empty((tokens, inter_s), dtype=torch.float32, device=x.device)

    launcher(_gate_up_kernel, interpret)[(tokens * k + (tokens if inter_s else 0), triton.cdiv(widest, block_i))](
        x, w_gate, w_up, expert_ids, h, sg, su, h_s,
        tokens, k, experts, inter, hidden, inter_s,
        x.stride(0), expert_ids.stride(0), expert_ids.stride(1), w_gate.stride(0),
        BLOCK_I=block_i, BLOCK_D=block_d, num_warps=cfg.warps_1, num_stages=cfg.stages,
    )
    launcher(_down_kernel, interpret)[(tokens, triton.cdiv(hidden, block_n))](
        h, w_down, expert_ids, weights, y, h_s, sd,
        k, experts, inter, hidden, inter_s,
        expert_ids.stride(0), expert_ids.stride(1), weights.stride(0), weights.stride(1),
        w_down.stride(0), y.stride(0),
        HAS_SHARED=inter_s > 0, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=cfg.warps_2, num_stages=cfg.stages,
    )
    return y


def moe_decode(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
               expert_ids: torch.Tensor, weights: torch.Tensor, shared: tuple | None = None,
               path: str = "auto") -> torch.Tensor:
    """This rank's routed-expert output for a small batch of tokens.

    Args:
        x: [T, D] float16/bfloat16/float32 activations (last dim contiguous, or it is copied).
        w_gate, w_up: [E_r, I, D] stacked local experts; w_down: [E_r, D, I]; x's dtype, contiguous.
        expert_ids: [T, k] int32/int64 local expert index per choice; any value outside [0, E_r)
            (e.g. -1, or a global id of another rank's expert shifted out of range) means "not this
            rank's": that choice contributes nothing and none of its weights are read (they may be NaN).
        weights: [T, k] float32 routing weights.
        shared: None, or (gate [I_s, D], up [I_s, D], down [D, I_s]) in x's dtype, contiguous: the shared
            expert (or this rank's TP slice of it), added to every token with weight 1.

    Returns:
        y: [T, D] in x's dtype = the shared expert's output plus the sum over local choices of
        weight * W_down (silu(W_gate x) * (W_up x)), accumulated in float32 and rounded once. Rows with no
        local choice and no shared expert are 0. T = 0 gives an empty output.

    ``path``: kernels/_triton.py's rule: auto = Triton on CUDA tensors (graph-capturable, reads each chosen
    expert's rows once per choice, from L2 for repeats), the torch reference on CPU; triton; torch.
    """
    if use_triton(x, path):
        return moe_decode_triton(x, w_gate, w_up, w_down, expert_ids, weights, shared)
    return moe_decode_torch(x, w_gate, w_up, w_down, expert_ids, weights, shared)


def weight_bytes(expert_ids: torch.Tensor, experts: int, inter: int, hidden: int, elem: int) -> int:
    """Fewest weight bytes one call must read: each distinct local expert chosen, W_gate + W_up + W_down."""
    ids = expert_ids[(expert_ids >= 0) & (expert_ids < experts)]
    return int(torch.unique(ids).numel()) * 3 * inter * hidden * elem
