"""Helix combine: merge locally normalised attention partials by their log-sum-exp (docs/design.md §3.3 step 4).

After the all-to-all each rank holds, for its slice of h heads, N partial outputs o^(r) (each normalised
over rank r's own tokens) and their log-sum-exps lse^(r). The exact attention over the union of tokens is

    lse = log sum_r exp(lse^(r))            (natural log)
    o   = sum_r exp(lse^(r) - lse) o^(r)

A part with lse^(r) = -inf (a rank with no tokens for that sequence) contributes nothing, whatever its o
holds; if every part is -inf the result is o = 0, lse = -inf, never NaN.

The same merge joins the KV splits inside ``mla_decode`` (flash-decoding), so the Triton kernel here takes
arbitrary strides and is shared by both. A Helix decode step does not launch it: ``helix_combine_uv`` merges
each head's parts in registers and multiplies by that head's W_UV tile in the same kernel (one launch
instead of the merge's and the W_UV GEMV's; the merged o never leaves float32), so o_v = W_UV o comes out.

``helix_combine`` and ``helix_combine_uv`` pick the path: Triton on CUDA tensors, the torch reference on CPU, overridden by
``path="triton"|"torch"`` (Triton on CPU runs under the interpreter).
"""

from __future__ import annotations

import torch

from kernels._triton import interpreting, launcher, next_pow2, tl, triton, use_triton

__all__ = ["helix_combine", "helix_combine_torch", "helix_combine_triton", "helix_combine_uv", "helix_combine_uv_torch",
           "helix_combine_uv_triton"]


# ----------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _merge_row(o_base, lse_base, s_op_n, s_lp_n, N, offs_d, mask_d, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr):
    """The merge of one (batch, head) row's N parts over one BLOCK_D slice of Lkv: (o [BLOCK_D] float32, and
    the row's m_safe and tot, lse = m_safe + log(tot) when tot > 0)."""
    offs_p = tl.arange(0, BLOCK_P)

    # pass 1: the largest part lse (a -inf maximum means every part is empty)
    m_vec = tl.full([BLOCK_P], float("-inf"), tl.float32)
    for p0 in range(0, N, BLOCK_P):
        mask_p = (p0 + offs_p) < N
        lse = tl.load(lse_base + (p0 + offs_p).to(tl.int64) * s_lp_n, mask=mask_p, other=float("-inf"))
        m_vec = tl.maximum(m_vec, lse.to(tl.float32))
    m = tl.max(m_vec, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # exp(-inf - -inf) would be NaN

    # pass 2: weights exp(lse_r - m) and the weighted sum; a -inf part has weight 0 and its o is not used
    tot_vec = tl.zeros([BLOCK_P], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for p0 in range(0, N, BLOCK_P):
        mask_p = (p0 + offs_p) < N
        lse = tl.load(lse_base + (p0 + offs_p).to(tl.int64) * s_lp_n, mask=mask_p, other=float("-inf"))
        w = tl.exp(lse.to(tl.float32) - m_safe)
        live = w > 0.0
        o = tl.load(o_base + (p0 + offs_p).to(tl.int64)[:, None] * s_op_n + offs_d[None, :],
                    mask=(mask_p & live)[:, None] & mask_d[None, :], other=0.0)
        acc += tl.sum(w[:, None] * o.to(tl.float32), axis=0)
        tot_vec += w
    tot = tl.sum(tot_vec, axis=0)
    nonempty = tot > 0.0
    return tl.where(nonempty, acc / tl.where(nonempty, tot, 1.0), 0.0), m_safe, tot


@triton.jit
def lse_combine_kernel(
    o_parts_ptr, lse_parts_ptr, o_ptr, lse_ptr,
    N, H,
    s_op_n, s_op_b, s_op_h,            # o_parts [N, B, H, LKV], last dim contiguous
    s_lp_n, s_lp_b, s_lp_h,            # lse_parts [N, B, H]
    s_o_b, s_o_h,                      # o [B, H, LKV], last dim contiguous
    s_l_b, s_l_h,                      # lse [B, H]
    LKV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """One program: one (batch, head) row, one BLOCK_D slice of the latent dimension."""
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = pid // H
    h = pid % H
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < LKV
    out, m_safe, tot = _merge_row(o_parts_ptr + b.to(tl.int64) * s_op_b + h.to(tl.int64) * s_op_h,
                                  lse_parts_ptr + b.to(tl.int64) * s_lp_b + h * s_lp_h, s_op_n, s_lp_n, N,
                                  offs_d, mask_d, BLOCK_D, BLOCK_P)
    tl.store(o_ptr + b.to(tl.int64) * s_o_b + h.to(tl.int64) * s_o_h + offs_d,
             out.to(o_ptr.dtype.element_ty), mask=mask_d)
    if pid_d == 0:
        nonempty = tot > 0.0
        lse_out = tl.where(nonempty, m_safe + tl.log(tl.where(nonempty, tot, 1.0)), float("-inf"))
        tl.store(lse_ptr + b * s_l_b + h * s_l_h, lse_out)


@triton.jit
def combine_uv_kernel(
    o_parts_ptr, lse_parts_ptr, w_ptr, out_ptr,
    N, B, V,
    s_op_n, s_op_b, s_op_h,            # o_parts [N, B, h, LKV], last dim contiguous
    s_lp_n, s_lp_b, s_lp_h,            # lse_parts [N, B, h]
    s_w_h, s_w_v,                      # w_uv [h, V, LKV], last dim contiguous
    s_out_b, s_out_h,                  # out [B, h, V], last dim contiguous
    LKV: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """One program: one head, BLOCK_V rows of its W_UV tile (read once), every batch row: merge the head's N
    parts over the whole of Lkv in registers, then out[b, h, v] = sum_l W_UV[h, v, l] o[b, h, l]."""
    h = tl.program_id(0)
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < V
    offs_l = tl.arange(0, BLOCK_L)
    mask_l = offs_l < LKV
    w = tl.load(w_ptr + h.to(tl.int64) * s_w_h + offs_v[:, None] * s_w_v + offs_l[None, :],
                mask=mask_v[:, None] & mask_l[None, :], other=0.0).to(tl.float32)  # [BLOCK_V, BLOCK_L]
    for b in range(0, B):
        o, _, _ = _merge_row(o_parts_ptr + b * s_op_b + h.to(tl.int64) * s_op_h,
                             lse_parts_ptr + b * s_lp_b + h * s_lp_h, s_op_n, s_lp_n, N,
                             offs_l, mask_l, BLOCK_L, BLOCK_P)
        y = tl.sum(w * o[None, :], axis=1)
        tl.store(out_ptr + b * s_out_b + h * s_out_h + offs_v, y.to(out_ptr.dtype.element_ty), mask=mask_v)


def launch_lse_combine(o_parts: torch.Tensor, lse_parts: torch.Tensor, o: torch.Tensor,
                       lse: torch.Tensor, interpret: bool) -> None:
    """Launch ``lse_combine_kernel`` on 4-D ``o_parts`` [N, B, H, Lkv] / 3-D ``lse_parts`` [N, B, H]
    (any strides, last dim of o_parts contiguous) into ``o`` [B, H, Lkv] / ``lse`` [B, H]."""
    n, bsz, heads, lkv = o_parts.shape
    if bsz * heads == 0 or lkv == 0:
        return
    # Latency-bound (a few MB, read once): many one-warp programs, each with few, wide loads of parts in flight.
    # Columns a program are halved down to 32 until ~1024 programs exist; the interpreter prefers few programs.
    # On H200, B=1, 32 heads, 132 splits: 7.3 us -> 3.8 us against 64 columns, 16 parts and two warps a program.
    block_d, block_p, warps = min(next_pow2(lkv), 128), min(next_pow2(n), 64), 1
    if not interpret:
        while block_d > 32 and bsz * heads * triton.cdiv(lkv, block_d) < 1024:
            block_d //= 2
    grid = (bsz * heads, triton.cdiv(lkv, block_d))
    launcher(lse_combine_kernel, interpret)[grid](
        o_parts, lse_parts, o, lse, n, heads,
        o_parts.stride(0), o_parts.stride(1), o_parts.stride(2),
        lse_parts.stride(0), lse_parts.stride(1), lse_parts.stride(2),
        o.stride(0), o.stride(1), lse.stride(0), lse.stride(1),
        LKV=lkv, BLOCK_D=block_d, BLOCK_P=block_p, num_warps=warps,
    )


def launch_combine_uv(o_parts: torch.Tensor, lse_parts: torch.Tensor, w_uv: torch.Tensor, out: torch.Tensor,
                      interpret: bool) -> None:
    """Launch ``combine_uv_kernel``: o_parts [N, B, h, Lkv] / lse_parts [N, B, h] (any strides, unit-stride
    rows), w_uv [h, V, Lkv] (unit-stride rows) into ``out`` [B, h, V]."""
    _, bsz, heads, lkv = o_parts.shape
    v = w_uv.shape[1]
    if bsz * heads * v == 0:
        return
    block_v = min(next_pow2(v), 16)
    grid = (heads, triton.cdiv(v, block_v))
    launcher(combine_uv_kernel, interpret)[grid](
        o_parts, lse_parts, w_uv, out, o_parts.shape[0], bsz, v,
        o_parts.stride(0), o_parts.stride(1), o_parts.stride(2),
        lse_parts.stride(0), lse_parts.stride(1), lse_parts.stride(2),
        w_uv.stride(0), w_uv.stride(1), out.stride(0), out.stride(1),
        LKV=lkv, BLOCK_L=next_pow2(lkv), BLOCK_V=block_v, BLOCK_P=min(next_pow2(o_parts.shape[0]), 16), num_warps=4,
    )


# ----------------------------------------------------------------------------------------------------
# wrappers
# ----------------------------------------------------------------------------------------------------
def _validate(o_parts: torch.Tensor, lse_parts: torch.Tensor) -> None:
    if o_parts.dim() != 4:
        raise ValueError(f"o_parts must be [N, B, h, Lkv], got shape {tuple(o_parts.shape)}")
    if lse_parts.shape != o_parts.shape[:3]:
        raise ValueError(f"lse_parts must be [N, B, h] = {tuple(o_parts.shape[:3])}, got {tuple(lse_parts.shape)}")
    if o_parts.shape[0] < 1:
        raise ValueError("helix_combine needs at least one part (N >= 1)")
    if o_parts.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"o_parts dtype {o_parts.dtype} not supported")
    if lse_parts.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"lse_parts must be float32 (natural-log LSE), got {lse_parts.dtype}")
    if o_parts.device != lse_parts.device:
        raise ValueError(f"o_parts on {o_parts.device} but lse_parts on {lse_parts.device}")


def helix_combine_torch(o_parts: torch.Tensor, lse_parts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of :func:`helix_combine` (float32 math; float64 if the inputs are float64)."""
    _validate(o_parts, lse_parts)
    cdt = torch.float64 if torch.float64 in (o_parts.dtype, lse_parts.dtype) else torch.float32
    lse_r = lse_parts.to(cdt)                                      # [N, B, h]
    m = lse_r.amax(dim=0)                                          # [B, h]
    m_safe = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    w = torch.exp(lse_r - m_safe)                                  # -inf parts -> 0
    tot = w.sum(dim=0)
    live = (w > 0).unsqueeze(-1)
    o_sum = (torch.where(live, o_parts.to(cdt), torch.zeros((), dtype=cdt, device=o_parts.device))
             * w.unsqueeze(-1)).sum(dim=0)                         # [B, h, Lkv]
    nonempty = tot > 0
    safe_tot = torch.where(nonempty, tot, torch.ones_like(tot))
    o = torch.where(nonempty.unsqueeze(-1), o_sum / safe_tot.unsqueeze(-1), torch.zeros_like(o_sum))
    lse = torch.where(nonempty, m_safe + torch.log(safe_tot), torch.full_like(tot, float("-inf")))
    return o.to(o_parts.dtype), lse.to(torch.float32)


def helix_combine_triton(o_parts: torch.Tensor, lse_parts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton path of :func:`helix_combine` (CUDA, or CPU under the interpreter). Graph-capturable."""
    _validate(o_parts, lse_parts)
    if o_parts.dtype == torch.float64:
        raise TypeError("the Triton combine takes float16/bfloat16/float32 o_parts")
    if o_parts.stride(-1) != 1:
        o_parts = o_parts.contiguous()
    _, bsz, heads, lkv = o_parts.shape
    o = torch.empty((bsz, heads, lkv), dtype=o_parts.dtype, device=o_parts.device)
    lse = torch.empty((bsz, heads), dtype=torch.float32, device=o_parts.device)
    launch_lse_combine(o_parts, lse_parts, o, lse, interpreting(o_parts))
    return o, lse


def helix_combine(o_parts: torch.Tensor, lse_parts: torch.Tensor, path: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Exact log-sum-exp merge of N attention partials.

    Args:
        o_parts: [N, B, h, Lkv] float16/bfloat16/float32 (float64 on the torch path); part r's output,
            normalised over part r's own tokens. Any strides.
        lse_parts: [N, B, h] float32, natural-log log-sum-exp of part r's scores; ``-inf`` marks an
            empty part.

    Returns:
        o: [B, h, Lkv] in ``o_parts.dtype`` = sum_r exp(lse_r - lse) o_r, accumulated in float32.
        lse: [B, h] float32, natural log, = logsumexp_r lse_r.
        Parts with lse = -inf contribute nothing (their o is never used, even if NaN); when all parts
        of a row are -inf the row gives o = 0 and lse = -inf. B = 0 or h = 0 gives empty outputs.

    ``path``: kernels/_triton.py's rule (auto: Triton on CUDA tensors, the torch reference on CPU; triton; torch).
    """
    if use_triton(o_parts, path):
        return helix_combine_triton(o_parts, lse_parts)
    return helix_combine_torch(o_parts, lse_parts)


def _validate_uv(o_parts: torch.Tensor, lse_parts: torch.Tensor, w_uv: torch.Tensor) -> None:
    _validate(o_parts, lse_parts)
    if w_uv.dim() != 3 or w_uv.shape[0] != o_parts.shape[2] or w_uv.shape[2] != o_parts.shape[3]:
        raise ValueError(f"w_uv must be [h, V, Lkv] with h, Lkv = {o_parts.shape[2]}, {o_parts.shape[3]} (o_parts "
                         f"[N, B, h, Lkv]), got {tuple(w_uv.shape)}")
    if w_uv.dtype != o_parts.dtype or w_uv.device != o_parts.device:
        raise ValueError(f"w_uv {w_uv.dtype} on {w_uv.device} must match o_parts {o_parts.dtype} on {o_parts.device}")


def helix_combine_uv_torch(o_parts: torch.Tensor, lse_parts: torch.Tensor, w_uv: torch.Tensor) -> torch.Tensor:
    """Torch reference of :func:`helix_combine_uv`: the merge and the W_UV product in float32 (float64 for float64
    inputs), the merged o never rounded to the input dtype."""
    _validate_uv(o_parts, lse_parts, w_uv)
    cdt = torch.float64 if o_parts.dtype == torch.float64 else torch.float32
    o, _ = helix_combine_torch(o_parts.to(cdt), lse_parts)
    return torch.einsum("bhl,hvl->bhv", o, w_uv.to(cdt)).to(o_parts.dtype)


def helix_combine_uv_triton(o_parts: torch.Tensor, lse_parts: torch.Tensor, w_uv: torch.Tensor) -> torch.Tensor:
    """Triton path of :func:`helix_combine_uv` (CUDA, or CPU under the interpreter). Graph-capturable."""
    _validate_uv(o_parts, lse_parts, w_uv)
    if o_parts.dtype == torch.float64:
        raise TypeError("the Triton combine takes float16/bfloat16/float32 o_parts")
    if o_parts.stride(-1) != 1:
        o_parts = o_parts.contiguous()
    if w_uv.stride(-1) != 1:
        w_uv = w_uv.contiguous()
    _, bsz, heads, _ = o_parts.shape
    out = torch.empty((bsz, heads, w_uv.shape[1]), dtype=o_parts.dtype, device=o_parts.device)
    launch_combine_uv(o_parts, lse_parts, w_uv, out, interpreting(o_parts))
    return out


def helix_combine_uv(o_parts: torch.Tensor, lse_parts: torch.Tensor, w_uv: torch.Tensor,
                     path: str = "auto") -> torch.Tensor:
    """The Helix merge of :func:`helix_combine` and the local heads' W_UV in one kernel (docs/design.md §3.3
    steps 4-5): o_v[b, h] = W_UV[h] (sum_r exp(lse_r - lse) o_r[b, h]), the merged o kept in float32 registers.

    Args:
        o_parts, lse_parts: as :func:`helix_combine`'s (parts with lse = -inf contribute nothing; a row whose
            parts are all -inf gives o_v = 0).
        w_uv: [h, V, Lkv] in o_parts' dtype, the local heads' value up-projection.

    Returns:
        o_v: [B, h, V] in o_parts' dtype.

    ``path``: kernels/_triton.py's rule (auto: Triton on CUDA tensors, the torch reference on CPU; triton; torch).
    """
    if use_triton(o_parts, path):
        return helix_combine_uv_triton(o_parts, lse_parts, w_uv)
    return helix_combine_uv_torch(o_parts, lse_parts, w_uv)
