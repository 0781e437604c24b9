"""Absorbed-MLA decode attention over a paged latent KV cache, with its log-sum-exp (docs/design.md §3.3 step 2).

Symbols: B batch, H query heads, Lkv = kv_lora_rank (512 in DeepSeek-V3), R = qk_rope_head_dim (64),
T = tokens_per_block. The cache row of a token is [c_kv (Lkv) | k_pe (R)]; with W_UK absorbed into the
query, for head h and local token t

    score_h(t) = (q_nope_abs_h . c_kv(t) + q_pe_h . k_pe(t)) * scale
    lse_h      = log sum_t exp(score_h(t))                      (natural log)
    o_h        = sum_t exp(score_h(t) - lse_h) c_kv(t)          (the value is c_kv itself)

Token t of sequence b lives in cache block ``block_table[b, t // T]`` at offset ``t % T``. Only tokens
t < seq_lens[b] are read: cache slots past a sequence's end and block-table entries past its last block
may hold anything (NaN, -1).

FP8 cache (``kv_cache_config.dtype: fp8``): rows are float8_e4m3fn with one float32 scale per row,
``kv_scale[block, offset]``; the row read is e4m3 -> float32 x its scale (then the query's dtype for the
dots), and everything after the load is as above.

Triton kernel (flash-decoding, two launches):

1. ``_mla_split_kernel``, grid (head tiles, KV splits, B). Head tiles are the fastest grid axis, so the
   programs that read the same KV tile run side by side and all but the first read it from L2. Each
   program walks its split of the sequence in tiles of BLOCK_N tokens. ``_load_kv_tile`` is the one place
   tiles are read: a whole tile that lies inside one cache block (T a multiple of BLOCK_N; splits are
   whole tiles, so only a split's last tile can be ragged) is placed by one page lookup and copied by two
   TMA descriptors over the cache viewed as [blocks * T, Lkv + R] rows (Hopper's copy engine, pipelined
   num_stages deep, no per-element address arithmetic); a ragged tile, or any tile when T is not a multiple
   of BLOCK_N, takes a page lookup per token and masked loads. ``_attend_tile`` scores BLOCK_H heads at
   once with ``tl.dot`` [BLOCK_H, Lkv] x [Lkv, BLOCK_N] (+ the rope part), keeps an online softmax in base
   2, and accumulates ``tl.dot`` [BLOCK_H, BLOCK_N] x [BLOCK_N, Lkv] into a float32 [BLOCK_H, Lkv]
   accumulator; c_kv is loaded once for both dots. It writes a normalised partial output and its
   natural-log lse per split (an empty split writes o = 0, lse = -inf).
2. ``helix_combine.lse_combine_kernel`` merges the splits by their lse, the same merge Helix runs across
   ranks. With one split the first kernel writes the final output directly.

The number of splits is chosen on the host from the block table's capacity (never from ``seq_lens``,
which stays on the device, so the call can be captured in a CUDA graph); each program derives its token
range from the actual length at run time.

CUDA kernels (``kernels/mla_decode.cu``, :func:`mla_decode_cuda`; bf16, Lkv 512, R 64): the same split contract
and merge, tiles copied by cp.async with one page lookup a row (any tokens-per-block), built on first use through
torch.utils.cpp_extension for sm_8x and Hopper's sm_90a; the file's header comment gives both algorithms.

* Hopper (compute capability 9.0): 64 head rows (fewer heads padded, more in head tiles) and 64-token tiles, two
  warpgroups on wgmma. Warpgroup 0 scores the tile over all 576 dims (Q and the tile in 128-byte-swizzled
  shared memory) and runs the softmax in registers; warpgroup 1 copies the next tile meanwhile; then each
  accumulates half of the 512 output columns from P and the same tile. Two tiles and Q fill shared memory.
* sm_8x: 32 heads and 32-token tiles a program, 3-5 cp.async stages, both products on mma.sync over 8 warps.

``path="auto"`` takes the CUDA kernel where it measured faster than the Triton kernel on H200
(:func:`cuda_auto`): on Hopper at every head count measured (16, 32, 64, 128), on sm_8x for 17-32 heads. On
H200 at 1M tokens the wgmma kernel reads at 70-81% of the measured read bandwidth from 16 to 64 heads and runs
128 heads at ~57% of the bf16 matmul rate (docs/design.md §9.1).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from kernels._triton import (HAS_TENSOR_DESCRIPTOR, TensorDescriptor, capability, interpreting, launcher, next_pow2,
                             num_sms, tl, triton, use_triton)
from kernels.helix_combine import launch_lse_combine

__all__ = ["mla_decode", "mla_decode_torch", "mla_decode_triton", "mla_decode_cuda", "MLAConfig", "default_config"]

log = logging.getLogger(__name__)

LOG2E = 1.4426950408889634
FP8 = torch.float8_e4m3fn


# ----------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _load_kv_tile(kv_ptr, ks_ptr, qp_ptr, c_desc, pe_desc, bt_row, n0, end, s_kv_blk, s_kv_tok, s_ks_blk, s_ks_tok,
                  LKV: tl.constexpr, TPB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_LKV: tl.constexpr,
                  BLOCK_R: tl.constexpr, R: tl.constexpr, WHOLE: tl.constexpr, F32: tl.constexpr,
                  FP8: tl.constexpr):
    """The one place KV tiles are read: c_kv [BLOCK_N, BLOCK_LKV], k_pe [BLOCK_N, BLOCK_R] of tokens
    [n0, n0 + BLOCK_N), and the live-token mask.

    WHOLE: every token of the tile is live and the tile lies inside one cache block (TPB % BLOCK_N == 0,
    tiles aligned to BLOCK_N), so one page lookup places it and the tensor-memory-accelerator descriptors
    copy it (rows [page * TPB + n0 % TPB, + BLOCK_N) of the cache viewed as [blocks * TPB, Lkv + R]).
    Otherwise a page lookup per token and masked loads with other=0: slots past the end may hold NaN,
    and NaN * 0 is NaN. FP8 (per-token path only): e4m3 rows, each converted to float32 and multiplied by its
    kv_scale; the dots then run in float32 (F32) or the query's dtype (read from ``qp_ptr``)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    if WHOLE:
        mask_n = offs_n < end  # all true
        page = tl.load(bt_row + n0 // TPB)
        row = page * TPB + n0 % TPB
        c = c_desc.load([row, 0])
        k_pe = pe_desc.load([row, LKV])
    else:
        mask_n = offs_n < end
        offs_d = tl.arange(0, BLOCK_LKV)
        offs_r = tl.arange(0, BLOCK_R)
        # masked: block-table entries past the sequence are never read
        page = tl.load(bt_row + offs_n // TPB, mask=mask_n, other=0).to(tl.int64)
        rows = kv_ptr + page * s_kv_blk + (offs_n % TPB).to(tl.int64) * s_kv_tok     # [BLOCK_N]
        c = tl.load(rows[:, None] + offs_d[None, :], mask=mask_n[:, None] & (offs_d[None, :] < LKV), other=0.0)
        k_pe = tl.load(rows[:, None] + LKV + offs_r[None, :], mask=mask_n[:, None] & (offs_r[None, :] < R),
                       other=0.0)
        if FP8:
            ks = tl.load(ks_ptr + page * s_ks_blk + (offs_n % TPB).to(tl.int64) * s_ks_tok, mask=mask_n, other=0.0)
            c = c.to(tl.float32) * ks[:, None]
            k_pe = k_pe.to(tl.float32) * ks[:, None]
            if not F32:  # to the query's dtype, which the dots run in
                c = c.to(qp_ptr.dtype.element_ty)
                k_pe = k_pe.to(qp_ptr.dtype.element_ty)
    if F32:
        c = c.to(tl.float32)
        k_pe = k_pe.to(tl.float32)
    return c, k_pe, mask_n


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, acc=acc, input_precision="ieee")
    return tl.dot(a.to(b.dtype), b, acc=acc)


@triton.jit
def _attend_tile(q_nope, q_pe, c, k_pe, mask_n, m_i, l_i, acc, qk_scale, IEEE: tl.constexpr):
    """One tile of the online softmax (base 2): scores [BLOCK_H, BLOCK_N], then acc += p c. Every tile
    holds >= 1 live token, so the running max stays finite."""
    s = _dot(q_nope, tl.trans(c), _dot(q_pe, tl.trans(k_pe), None, IEEE), IEEE)
    s = tl.where(mask_n[None, :], s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    return m_new, l_i, _dot(p, c, acc * alpha[:, None], IEEE)


@triton.jit
def _mla_split_kernel(
    qn_ptr, qp_ptr, kv_ptr, ks_ptr, c_desc, pe_desc, bt_ptr, sl_ptr, o_ptr, lse_ptr,
    qk_scale,                                  # scale * log2(e): the softmax runs in base 2
    H, NUM_SPLITS,
    s_qn_b, s_qn_h, s_qp_b, s_qp_h,            # q_nope_abs [B, H, LKV], q_pe [B, H, R]; last dims contiguous
    s_kv_blk, s_kv_tok,                        # kv_cache [num_blocks, TPB, LKV + R]; last dim contiguous
    s_ks_blk, s_ks_tok,                        # kv_scale [num_blocks, TPB] float32 (FP8 cache only)
    s_bt_b,                                    # block_table [B, max_blocks]
    s_o_b, s_o_h, s_o_s,                       # o [B, H, NUM_SPLITS, LKV] (or [B, H, LKV] when direct)
    s_l_b, s_l_h, s_l_s,                       # lse [B, H, NUM_SPLITS] (or [B, H])
    LKV: tl.constexpr, R: tl.constexpr, TPB: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_LKV: tl.constexpr, BLOCK_R: tl.constexpr,
    TMA: tl.constexpr,                         # whole tiles through the descriptors (see _load_kv_tile)
    F32: tl.constexpr,                         # compute in float32 (interpreter, float32 inputs)
    IEEE: tl.constexpr,                        # float32 dots in full precision (no tf32)
    FP8: tl.constexpr,                         # e4m3 cache rows, each times its kv_scale (no TMA)
):
    pid_h = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = tl.program_id(2)

    # this split's token range; splits are whole tiles so only a sequence's last tile is ragged
    seq_len = tl.load(sl_ptr + b)
    n_tiles = tl.cdiv(seq_len, BLOCK_N)
    tiles_per_split = tl.cdiv(n_tiles, NUM_SPLITS)
    start = pid_s * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)

    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    offs_d = tl.arange(0, BLOCK_LKV)
    offs_r = tl.arange(0, BLOCK_R)
    b64 = b.to(tl.int64)
    q_nope = tl.load(qn_ptr + b64 * s_qn_b + offs_h[:, None].to(tl.int64) * s_qn_h + offs_d[None, :],
                     mask=mask_h[:, None] & (offs_d[None, :] < LKV), other=0.0)
    q_pe = tl.load(qp_ptr + b64 * s_qp_b + offs_h[:, None].to(tl.int64) * s_qp_h + offs_r[None, :],
                   mask=mask_h[:, None] & (offs_r[None, :] < R), other=0.0)
    if F32:
        q_nope = q_nope.to(tl.float32)
        q_pe = q_pe.to(tl.float32)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_LKV], tl.float32)
    bt_row = bt_ptr + b64 * s_bt_b

    # whole tiles first (through the descriptors when TMA), then at most one ragged tile; without TMA
    # every tile takes the masked per-token path of the second loop
    whole_end = start
    if TMA:
        whole_end = start + ((end - start) // BLOCK_N) * BLOCK_N
        for n0 in range(start, whole_end, BLOCK_N):
            c, k_pe, mask_n = _load_kv_tile(kv_ptr, ks_ptr, qp_ptr, c_desc, pe_desc, bt_row, n0, end, s_kv_blk,
                                            s_kv_tok, s_ks_blk, s_ks_tok,
                                            LKV, TPB, BLOCK_N, BLOCK_LKV, BLOCK_R, R, True, F32, FP8)
            m_i, l_i, acc = _attend_tile(q_nope, q_pe, c, k_pe, mask_n, m_i, l_i, acc, qk_scale, IEEE)
    for n0 in range(whole_end, end, BLOCK_N):
        c, k_pe, mask_n = _load_kv_tile(kv_ptr, ks_ptr, qp_ptr, c_desc, pe_desc, bt_row, n0, end, s_kv_blk, s_kv_tok,
                                        s_ks_blk, s_ks_tok,
                                        LKV, TPB, BLOCK_N, BLOCK_LKV, BLOCK_R, R, False, F32, FP8)
        m_i, l_i, acc = _attend_tile(q_nope, q_pe, c, k_pe, mask_n, m_i, l_i, acc, qk_scale, IEEE)

    nonempty = l_i > 0.0
    l_safe = tl.where(nonempty, l_i, 1.0)
    out = tl.where(nonempty[:, None], acc / l_safe[:, None], 0.0)
    lse = tl.where(nonempty, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    o_rows = o_ptr + b64 * s_o_b + offs_h[:, None].to(tl.int64) * s_o_h + pid_s.to(tl.int64) * s_o_s
    tl.store(o_rows + offs_d[None, :], out.to(o_ptr.dtype.element_ty), mask=mask_h[:, None] & (offs_d[None, :] < LKV))
    tl.store(lse_ptr + b64 * s_l_b + offs_h * s_l_h + pid_s * s_l_s, lse, mask=mask_h)


@dataclass(frozen=True)
class MLAConfig:
    """Launch shape of the split kernel. ``num_splits=None`` chooses from the SM count."""

    block_h: int = 16
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    programs_per_sm: int = 2    # target resident programs per SM when choosing the split count
    min_tiles_per_split: int = 4
    num_splits: int | None = None
    tma: bool = True            # whole tiles through TMA descriptors where the cache allows (_use_tma)


def default_config(heads: int, lkv: int, dtype: torch.dtype, interpret: bool) -> MLAConfig:
    """Tuned on an H200 (golden/perf/kernels-h200.md); the interpreter wants few, large programs. From 17
    heads up a tile of 64 heads (padded rows for 32) runs Hopper's wgmma, faster than 32-row mma.sync."""
    if interpret:
        return MLAConfig(block_h=16, block_n=32, num_warps=1, num_stages=1, programs_per_sm=1,
                         min_tiles_per_split=1)
    if dtype == torch.float32:  # full-precision dots: keep the tiles small
        return MLAConfig(block_h=16, block_n=32, num_warps=4, num_stages=2)
    if heads <= 16:
        return MLAConfig(block_h=16, block_n=32, num_warps=4, num_stages=3, programs_per_sm=2)
    return MLAConfig(block_h=64, block_n=64, num_warps=8, num_stages=2, programs_per_sm=1)


def _use_tma(kv_cache: torch.Tensor, block_n: int) -> bool:
    """Whole tiles can be copied by TMA descriptors when each tile lies inside one cache block, the cache
    is one dense [blocks * T, Lkv + R] array with 16-byte aligned rows (the descriptor's rules) and the GPU
    has the copy engine (Hopper, compute capability 9.0, or newer; the interpreter emulates it)."""
    tpb, row = kv_cache.shape[1], kv_cache.shape[2]
    engine = not kv_cache.is_cuda or capability(kv_cache.device.index) >= (9, 0)
    return (HAS_TENSOR_DESCRIPTOR and engine and tpb % block_n == 0 and kv_cache.is_contiguous()
            and kv_cache.data_ptr() % 16 == 0 and (row * kv_cache.element_size()) % 16 == 0)


def _choose_splits(cfg: MLAConfig, bsz: int, head_tiles: int, capacity: int, sms: int) -> int:
    if cfg.num_splits is not None:
        return max(1, int(cfg.num_splits))
    max_splits = max(1, triton.cdiv(capacity, cfg.block_n * cfg.min_tiles_per_split))
    # floor, not ceil: a grid a little over a whole number of waves leaves most SMs idle in its last wave
    want = (sms * cfg.programs_per_sm) // max(1, bsz * head_tiles)
    return max(1, min(want, max_splits))


# ----------------------------------------------------------------------------------------------------
# validation shared by both paths
# ----------------------------------------------------------------------------------------------------
def _validate(q_nope_abs, q_pe, kv_cache, block_table, seq_lens, kv_scale, float64_ok: bool) -> tuple[int, int, int, int]:
    if q_nope_abs.dim() != 3 or q_pe.dim() != 3 or kv_cache.dim() != 3:
        raise ValueError(f"expected q_nope_abs [B,H,Lkv], q_pe [B,H,R], kv_cache [blocks,T,Lkv+R]; got "
                         f"{tuple(q_nope_abs.shape)}, {tuple(q_pe.shape)}, {tuple(kv_cache.shape)}")
    bsz, heads, lkv = q_nope_abs.shape
    if q_pe.shape[:2] != (bsz, heads):
        raise ValueError(f"q_pe {tuple(q_pe.shape)} does not match q_nope_abs {tuple(q_nope_abs.shape)} in [B, H]")
    rope = q_pe.shape[2]
    if lkv < 1 or rope < 1 or kv_cache.shape[2] != lkv + rope:
        raise ValueError(f"kv_cache last dim {kv_cache.shape[2]} != Lkv + R = {lkv} + {rope}")
    if block_table.dim() != 2 or block_table.shape[0] != bsz:
        raise ValueError(f"block_table must be [B={bsz}, max_blocks], got {tuple(block_table.shape)}")
    if seq_lens.shape != (bsz,):
        raise ValueError(f"seq_lens must be [B={bsz}], got {tuple(seq_lens.shape)}")
    if block_table.dtype not in (torch.int32, torch.int64) or seq_lens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"block_table / seq_lens must be int32, got {block_table.dtype} / {seq_lens.dtype}")
    ok = (torch.float16, torch.bfloat16, torch.float32) + ((torch.float64,) if float64_ok else ())
    if (kv_cache.dtype == FP8) != (kv_scale is not None):
        raise TypeError(f"kv_cache {kv_cache.dtype} with kv_scale {None if kv_scale is None else 'given'}: an "
                        f"{FP8} cache and only it comes with its per-row kv_scale")
    if kv_scale is not None and (kv_scale.shape != kv_cache.shape[:2] or kv_scale.dtype != torch.float32):
        raise ValueError(f"kv_scale must be float32 [num_blocks, tokens_per_block] = {tuple(kv_cache.shape[:2])}, got "
                         f"{kv_scale.dtype} {tuple(kv_scale.shape)}")
    if q_nope_abs.dtype not in ok:
        raise TypeError(f"q_nope_abs dtype {q_nope_abs.dtype} not supported (one of {ok})")
    if q_pe.dtype != q_nope_abs.dtype or kv_cache.dtype not in (q_nope_abs.dtype, FP8):
        raise TypeError(f"q_nope_abs {q_nope_abs.dtype}, q_pe {q_pe.dtype} and kv_cache {kv_cache.dtype} "
                        f"must share one dtype (or the cache be {FP8})")
    devs = {t.device for t in (q_nope_abs, q_pe, kv_cache, block_table, seq_lens)}
    if len(devs) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devs))}")
    return bsz, heads, lkv, rope


def _check_out(out, q_nope_abs: torch.Tensor, kv_cache: torch.Tensor) -> None:
    """``out`` = (o [B, H, Lkv] in the queries' dtype with unit-stride rows, lse [B, H] float32), any other
    strides (e.g. views into the buffer an all-to-all sends), or None."""
    if out is None:
        return
    o, lse = out
    bsz, heads, lkv = q_nope_abs.shape
    if (o.shape != (bsz, heads, lkv) or o.dtype != q_nope_abs.dtype or (o.numel() and o.stride(-1) != 1)
            or lse.shape != (bsz, heads) or lse.dtype != torch.float32
            or o.device != kv_cache.device or lse.device != kv_cache.device):
        raise ValueError(f"out must be (o [{bsz}, {heads}, {lkv}] {q_nope_abs.dtype} with unit-stride rows, lse "
                         f"[{bsz}, {heads}] float32) on {kv_cache.device}; got o {o.dtype} {tuple(o.shape)} "
                         f"strides {o.stride()}, lse {lse.dtype} {tuple(lse.shape)}")


# ----------------------------------------------------------------------------------------------------
# torch reference
# ----------------------------------------------------------------------------------------------------
def mla_decode_torch(q_nope_abs: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor,
                     block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                     kv_scale: torch.Tensor | None = None, out=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of :func:`mla_decode`: gather each sequence's blocks (an FP8 row times its scale), float32
    math (float64 for float64 inputs). Not graph-capturable (reads max(seq_lens) on the host)."""
    bsz, heads, lkv, rope = _validate(q_nope_abs, q_pe, kv_cache, block_table, seq_lens, kv_scale, float64_ok=True)
    _check_out(out, q_nope_abs, kv_cache)
    cdt = torch.float64 if q_nope_abs.dtype == torch.float64 else torch.float32
    dev = kv_cache.device
    tpb = kv_cache.shape[1]
    max_len = int(seq_lens.max()) if bsz else 0
    n_blk = -(-max_len // tpb)
    lens = seq_lens.to(torch.int64)

    pos = torch.arange(n_blk * tpb, device=dev)
    live = pos[None, :] < lens[:, None]                                        # [B, S]
    blk_live = torch.arange(n_blk, device=dev)[None, :] * tpb < lens[:, None]  # [B, n_blk]
    table = torch.where(blk_live, block_table[:, :n_blk].to(torch.int64), torch.zeros((), dtype=torch.int64, device=dev))
    kv = kv_cache[table].reshape(bsz, n_blk * tpb, lkv + rope).to(cdt)         # [B, S, Lkv+R]
    if kv_scale is not None:
        kv = kv * kv_scale[table].reshape(bsz, n_blk * tpb, 1).to(cdt)
    kv = torch.where(live[..., None], kv, torch.zeros((), dtype=cdt, device=dev))  # NaN past the end -> 0
    c_kv, k_pe = kv[..., :lkv], kv[..., lkv:]

    s = (torch.einsum("bhl,bsl->bhs", q_nope_abs.to(cdt), c_kv)
         + torch.einsum("bhr,bsr->bhs", q_pe.to(cdt), k_pe)) * scale
    s = s.masked_fill(~live[:, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1) if s.shape[-1] else torch.full((bsz, heads), float("-inf"), dtype=cdt, device=dev)
    lse_safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)       # empty rows: p = 0, not NaN
    p = torch.exp(s - lse_safe[..., None])
    o = torch.einsum("bhs,bsl->bhl", p, c_kv)
    if out is None:
        return o.to(q_nope_abs.dtype), lse.to(torch.float32)
    out[0].copy_(o)
    out[1].copy_(lse)
    return out


# ----------------------------------------------------------------------------------------------------
# Triton wrapper
# ----------------------------------------------------------------------------------------------------
def mla_decode_triton(q_nope_abs: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor,
                      block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                      kv_scale: torch.Tensor | None = None, config: MLAConfig | None = None, stats: dict | None = None,
                      out=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton path of :func:`mla_decode` (CUDA, or CPU under the interpreter). No host sync: capturable
    in a CUDA graph. ``config`` overrides the launch shape (benchmarks, tests); a ``stats`` dict receives
    the launch shape and, when compiled, the split kernel's registers, spills, shared memory and whether
    it uses Hopper's wgmma."""
    bsz, heads, lkv, rope = _validate(q_nope_abs, q_pe, kv_cache, block_table, seq_lens, kv_scale, float64_ok=False)
    o, lse, q_nope_abs, q_pe = _outputs_and_queries(q_nope_abs, q_pe, kv_cache, out)
    if bsz == 0 or heads == 0:
        return o, lse
    if kv_cache.stride(-1) != 1:
        raise ValueError("kv_cache must be contiguous in its last dimension")

    interpret = interpreting(kv_cache)
    dtype = q_nope_abs.dtype  # the dots' dtype (an FP8 cache's rows are converted to it at load)
    cfg = config or default_config(heads, lkv, dtype, interpret)
    block_lkv, block_r = max(16, next_pow2(lkv)), max(16, next_pow2(rope))
    block_h = max(16, next_pow2(cfg.block_h))
    head_tiles = triton.cdiv(heads, block_h)
    tpb = kv_cache.shape[1]
    splits = _choose_splits(cfg, bsz, head_tiles, block_table.shape[1] * tpb, num_sms(kv_cache))
    f32 = interpret or dtype == torch.float32
    ieee = dtype == torch.float32 and not interpret
    tma = cfg.tma and kv_scale is None and _use_tma(kv_cache, cfg.block_n)  # FP8 rows: per-token loads
    c_desc = pe_desc = None
    if tma:  # the cache as [blocks * T, Lkv + R] rows; boxes of BLOCK_N rows
        rows = kv_cache.view(-1, lkv + rope)
        c_desc = TensorDescriptor.from_tensor(rows, [cfg.block_n, block_lkv])
        pe_desc = TensorDescriptor.from_tensor(rows, [cfg.block_n, block_r])

    o_s, lse_s = _split_outputs(o, lse, splits)
    so = (o_s.stride(0), o_s.stride(1), o_s.stride(2) if splits > 1 else 0)
    sl = (lse_s.stride(0), lse_s.stride(1), lse_s.stride(2) if splits > 1 else 0)

    grid = (head_tiles, splits, bsz)
    compiled = launcher(_mla_split_kernel, interpret)[grid](
        q_nope_abs, q_pe, kv_cache, kv_cache if kv_scale is None else kv_scale, c_desc, pe_desc, block_table,
        seq_lens, o_s, lse_s,
        float(scale) * LOG2E, heads, splits,
        q_nope_abs.stride(0), q_nope_abs.stride(1), q_pe.stride(0), q_pe.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), *(kv_scale.stride() if kv_scale is not None else (0, 0)),
        block_table.stride(0),
        *so, *sl,
        LKV=lkv, R=rope, TPB=tpb, BLOCK_H=block_h, BLOCK_N=cfg.block_n,
        BLOCK_LKV=block_lkv, BLOCK_R=block_r, TMA=tma, F32=f32, IEEE=ieee, FP8=kv_scale is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if stats is not None:
        stats.update(block_h=block_h, block_n=cfg.block_n, num_warps=cfg.num_warps, tma=tma,
                     num_stages=cfg.num_stages, splits=splits, grid=grid)
        if not interpret and compiled is not None:
            ptx = getattr(compiled, "asm", {}).get("ptx", "")
            stats.update(n_regs=getattr(compiled, "n_regs", None), n_spills=getattr(compiled, "n_spills", None),
                         shared=getattr(getattr(compiled, "metadata", None), "shared", None),
                         wgmma=ptx.count("wgmma.mma_async"), mma_sync=ptx.count("mma.sync"),
                         cp_async=ptx.count("cp.async.cg") + ptx.count("cp.async.ca"),
                         tma_copies=ptx.count("cp.async.bulk.tensor"))
    _merge_splits(o_s, lse_s, o, lse, interpret)
    return o, lse


def _outputs_and_queries(q_nope_abs: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, out):
    """(o [B, H, Lkv] in the queries' dtype, lse [B, H] float32: ``out``'s views or new, q_nope_abs, q_pe with
    unit-stride rows): the split kernels and the merge index rows by strides, so only the innermost dimension
    must be unit-stride."""
    _check_out(out, q_nope_abs, kv_cache)
    bsz, heads, lkv = q_nope_abs.shape
    o, lse = out or (torch.empty((bsz, heads, lkv), dtype=q_nope_abs.dtype, device=kv_cache.device),
                     torch.empty((bsz, heads), dtype=torch.float32, device=kv_cache.device))
    return (o, lse, q_nope_abs if q_nope_abs.stride(-1) == 1 else q_nope_abs.contiguous(),
            q_pe if q_pe.stride(-1) == 1 else q_pe.contiguous())


def _split_outputs(o: torch.Tensor, lse: torch.Tensor, splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the split kernel writes: ``o`` and ``lse`` themselves for one split (the final output), else
    float32 partials [B, H, splits, Lkv] and their lse [B, H, splits]."""
    if splits == 1:
        return o, lse
    bsz, heads, lkv = o.shape
    return (torch.empty((bsz, heads, splits, lkv), dtype=torch.float32, device=o.device),
            torch.empty((bsz, heads, splits), dtype=torch.float32, device=o.device))


def _merge_splits(o_s, lse_s, o, lse, interpret: bool) -> None:
    """Merge the split partials into ``o``, ``lse`` (nothing to do for one split): the splits are the "parts"
    axis of the Helix merge, as views [S, B, H, Lkv] / [S, B, H]."""
    if o_s is not o:
        launch_lse_combine(o_s.permute(2, 0, 1, 3), lse_s.permute(2, 0, 1), o, lse, interpret)


# ----------------------------------------------------------------------------------------------------
# CUDA C++ path (kernels/mla_decode.cu)
# ----------------------------------------------------------------------------------------------------
# Two compiled kernels (kernels/mla_decode.cu), told apart by their tile. SM90: Hopper's wgmma (compute capability
# 9.0, sm_90a), 64 head rows and 64 tokens a tile, 2 stages, 2 warpgroups. MMA_SYNC: any sm_8x card (and Hopper,
# for comparison), 32 heads and 32 tokens a tile, mma.sync, 3 to 5 stages, 8 warps.
CUDA_SM90_CONFIG = MLAConfig(block_h=64, block_n=64, num_warps=8, num_stages=2, programs_per_sm=1, tma=False)
CUDA_MMA_SYNC_CONFIG = MLAConfig(block_h=32, block_n=32, num_warps=8, num_stages=4, programs_per_sm=1, tma=False)
CUDA_STAGES = {(64, 64, 8): (2,), (32, 32, 8): (3, 4, 5)}  # compiled (block_h, block_n, num_warps): depths
# path="auto" on an sm_8x card takes the mma.sync kernel for head counts in this range (where it beat the Triton
# kernel on H200 before the wgmma kernel existed); on Hopper the wgmma kernel beats Triton at 16, 32, 64 and 128 heads
# (1M tokens, B = 1 and 8: docs/design.md §9.1)
MMA_SYNC_AUTO_HEADS = range(17, 33)


def cuda_config(device: torch.device) -> MLAConfig:
    """The CUDA kernel a device runs by default: the wgmma kernel on Hopper (9.0), the mma.sync one on sm_8x."""
    return CUDA_SM90_CONFIG if capability(device.index) == (9, 0) else CUDA_MMA_SYNC_CONFIG


def cuda_auto(heads: int, device: torch.device) -> bool:
    """Whether path="auto" prefers the CUDA kernel at ``heads`` on ``device`` (when the kernel takes the call)."""
    return cuda_config(device) is CUDA_SM90_CONFIG or heads in MMA_SYNC_AUTO_HEADS


# machine code for sm_8x (the mma.sync kernel) and Hopper's sm_90a (both kernels; wgmma needs the "a" target)
CUDA_GENCODE = ("-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a")


@functools.lru_cache(maxsize=None)
def _build() -> tuple[object | None, str | None]:
    """(the CUDA path's torch extension, None), or (None, why it could not be built): built once per process on
    first use by torch.utils.cpp_extension (ninja and nvcc; ~20 s, then cached under TORCH_EXTENSIONS_DIR for the
    same sources). A host without the toolchain keeps path="auto" on the Triton kernel (logged once)."""
    from torch.utils.cpp_extension import load

    here = Path(__file__).resolve().parent
    try:
        return load(name="helix_mla_decode", sources=[str(here / "mla_decode_ext.cpp"), str(here / "mla_decode.cu")],
                    extra_include_paths=[str(here)], extra_cflags=["-O3"],
                    extra_cuda_cflags=["-O3", *CUDA_GENCODE]), None
    except Exception as e:  # no nvcc / ninja / compiler: the reason, in one line
        why = f"could not be built ({type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''})"
        log.warning("mla_decode: the CUDA kernel %s; path='auto' uses the Triton kernel", why)
        return None, why


def _extension():
    return _build()[0]  # never None here: cuda_unsupported refuses every call when the build failed


def cuda_unsupported(q_nope_abs: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                     seq_lens: torch.Tensor, kv_scale: torch.Tensor | None) -> str | None:
    """Why the CUDA kernel cannot take this call, or None: it is compiled for the DeepSeek-V3 row (Lkv 512,
    R 64) in bf16, int32 tables, a cache whose rows start 16-byte aligned (cp.async copies), for compute
    capability 8.x and 9.0 (CUDA_GENCODE)."""
    lkv, row = q_nope_abs.shape[-1], kv_cache.shape[-1]
    if not kv_cache.is_cuda:
        return f"needs CUDA tensors, got {kv_cache.device}"
    cc = capability(kv_cache.device.index)
    if cc[0] != 8 and cc != (9, 0):
        return f"is compiled for compute capability 8.x and 9.0, got {cc[0]}.{cc[1]}"
    if kv_scale is not None or kv_cache.dtype != torch.bfloat16 or q_nope_abs.dtype != torch.bfloat16:
        return f"is compiled for bf16 queries and cache, got {q_nope_abs.dtype} / {kv_cache.dtype}"
    if (lkv, row - lkv) != (512, 64):
        return f"is compiled for Lkv 512, R 64, got Lkv {lkv}, R {row - lkv}"
    if block_table.dtype != torch.int32 or seq_lens.dtype != torch.int32:
        return f"takes int32 block_table and seq_lens, got {block_table.dtype} / {seq_lens.dtype}"
    if (kv_cache.stride(-1) != 1 or kv_cache.stride(0) % 8 or kv_cache.stride(1) % 8
            or kv_cache.data_ptr() % 16):
        return "needs cache rows contiguous and 16-byte aligned"
    return _build()[1]


def auto_path(q_nope_abs: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
              kv_scale: torch.Tensor | None) -> str:
    """The GPU kernel ``path="auto"`` runs for this call: "cuda" where :func:`cuda_auto` prefers it and the CUDA
    kernel takes the call (and could be built), else "triton"."""
    if (cuda_auto(q_nope_abs.shape[1], kv_cache.device)
            and cuda_unsupported(q_nope_abs, kv_cache, block_table, seq_lens, kv_scale) is None):
        return "cuda"
    return "triton"


def mla_decode_cuda(q_nope_abs: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor,
                    block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                    kv_scale: torch.Tensor | None = None, config: MLAConfig | None = None, stats: dict | None = None,
                    out=None) -> tuple[torch.Tensor, torch.Tensor]:
    """CUDA C++ path of :func:`mla_decode` (kernels/mla_decode.cu): the same split contract as the Triton
    kernel, merged by the same combine; no host sync, so capturable in a CUDA graph. ``config`` (default
    :func:`cuda_config`) picks the kernel by its tile, one of CUDA_STAGES' (the wgmma one on Hopper only), and may
    change ``num_stages`` (one of that tile's depths), ``programs_per_sm``, ``min_tiles_per_split`` and
    ``num_splits``."""
    bsz, heads, lkv, rope = _validate(q_nope_abs, q_pe, kv_cache, block_table, seq_lens, kv_scale, float64_ok=False)
    why = cuda_unsupported(q_nope_abs, kv_cache, block_table, seq_lens, kv_scale)
    if why:
        raise ValueError(f"mla_decode path='cuda': the CUDA kernel {why}")
    cfg = config or cuda_config(kv_cache.device)
    tile = (cfg.block_h, cfg.block_n, cfg.num_warps)
    wgmma = tile == (CUDA_SM90_CONFIG.block_h, CUDA_SM90_CONFIG.block_n, CUDA_SM90_CONFIG.num_warps)
    if cfg.num_stages not in CUDA_STAGES.get(tile, ()) or (wgmma and capability(kv_cache.device.index) != (9, 0)):
        raise ValueError(f"mla_decode path='cuda': config {cfg} must be a compiled tile (block_h, block_n, num_warps): "
                         f"num_stages {CUDA_STAGES} (the (64, 64, 8) wgmma tile on compute capability 9.0 only)")
    o, lse, q_nope_abs, q_pe = _outputs_and_queries(q_nope_abs, q_pe, kv_cache, out)
    if bsz == 0 or heads == 0:
        return o, lse
    head_tiles = triton.cdiv(heads, cfg.block_h)
    splits = _choose_splits(cfg, bsz, head_tiles, block_table.shape[1] * kv_cache.shape[1], num_sms(kv_cache))
    o_s, lse_s = _split_outputs(o, lse, splits)
    _extension().split(q_nope_abs, q_pe, kv_cache, block_table, seq_lens, o_s, lse_s, float(scale) * LOG2E,
                       splits, wgmma, cfg.num_stages, torch.cuda.current_stream(kv_cache.device).cuda_stream)
    if stats is not None:
        stats.update(path="cuda", wgmma=wgmma, block_h=cfg.block_h, block_n=cfg.block_n, num_warps=cfg.num_warps,
                     num_stages=cfg.num_stages, tma=False, splits=splits, grid=(head_tiles, splits, bsz),
                     shared=_extension().smem_bytes(wgmma, cfg.num_stages))
    _merge_splits(o_s, lse_s, o, lse, interpret=False)
    return o, lse


def mla_decode(q_nope_abs: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor,
               block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float,
               kv_scale: torch.Tensor | None = None, path: str = "auto", out=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed-MLA decode attention of one new token per sequence over this rank's paged latent cache.

    Args:
        q_nope_abs: [B, H, Lkv], W_UK already absorbed (q_abs_h = W_UK_h^T q_nope_h). Any strides.
        q_pe: [B, H, R], rotated rope part of the query. Any strides.
        kv_cache: [num_blocks, tokens_per_block, Lkv + R], each row [c_kv | k_pe]; same dtype as q
            (float16, bfloat16 or float32; float64 on the torch path), or float8_e4m3fn with ``kv_scale``.
        block_table: [B, max_blocks] int32; entry j of row b is the cache block holding local tokens
            [j*T, (j+1)*T) of sequence b. Entries past a sequence's last block are never read.
        seq_lens: [B] int32, this rank's local token count per sequence; 0 allowed; must not exceed
            max_blocks * tokens_per_block.
        scale: softmax scale applied to the raw score.
        kv_scale: [num_blocks, tokens_per_block] float32, an FP8 cache's per-row scale: row = e4m3 x scale.
        out: optional (o, lse) to write the results into, any strides but unit-stride rows of o (Helix passes
            views of the buffer its all-to-all sends, so the partial and its lse need no packing copy).

    Returns:
        o: [B, H, Lkv] in the input dtype, softmax over the local tokens applied to c_kv (normalised
            locally; merge ranks with :func:`kernels.helix_combine`).
        lse: [B, H] float32, natural-log log-sum-exp of the scaled scores.
        A sequence with no local tokens gives o = 0 and lse = -inf, never NaN. Cache slots past
        seq_lens[b] are never read (they may hold NaN). B = 0 gives empty outputs.

    ``path``: kernels/_triton.py's rule: cuda = the CUDA C++ kernel (:func:`mla_decode_cuda`; a call it was
    not compiled for is refused); triton = the Triton kernel (on CPU under the interpreter); torch; auto = on
    CUDA tensors the CUDA kernel where :func:`cuda_auto` prefers it and it supports the call, else Triton (both
    split-KV flash-decoding, graph-capturable); the torch reference on CPU.
    """
    if not use_triton(kv_cache, path):
        return mla_decode_torch(q_nope_abs, q_pe, kv_cache, block_table, seq_lens, scale, kv_scale, out=out)
    if path == "cuda" or (path == "auto" and auto_path(q_nope_abs, kv_cache, block_table, seq_lens, kv_scale) == "cuda"):
        return mla_decode_cuda(q_nope_abs, q_pe, kv_cache, block_table, seq_lens, scale, kv_scale, out=out)
    return mla_decode_triton(q_nope_abs, q_pe, kv_cache, block_table, seq_lens, scale, kv_scale, out=out)


def flops(bsz: int, heads: int, seq: int, lkv: int, rope: int) -> int:
    """Attention FLOPs of one call: 2*B*H*S*(2*Lkv + R) (scores over Lkv+R, output over Lkv)."""
    return 2 * bsz * heads * seq * (2 * lkv + rope)


def kv_bytes(bsz: int, seq: int, lkv: int, rope: int, elem: int) -> int:
    """Fewest bytes one call must read: every live cache row once."""
    return bsz * seq * (lkv + rope) * elem

