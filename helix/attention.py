"""Helix MLA: multi-head latent attention whose decode step is context-parallel over N ranks.

Symbols (DeepSeek-V3 values)::

    B   decode batch                       H    query heads (128)         h = H / N  heads per rank
    D   hidden size (7168)                 Lkv  kv_lora_rank (512)        P   qk_nope_head_dim (128)
    R   qk_rope_head_dim (64)              V    v_head_dim (128)          N   Helix ranks (KVP = N, TPA = 1)
    S   context length                     T    tokens_per_block          a   attended heads (H; TP: h)

Weights: W_DKV = kv_a_proj_with_mqa [Lkv + R, D]; kv_b_proj [H (P + V), Lkv] splits per head into
W_UK [H, P, Lkv] and W_UV [H, V, Lkv]; o_proj = W_O [D, H V]. The cache row of a token is
[c_kv (Lkv) | k_pe (R)] (576 values for V3), absorbed once at load time, never per step.

Helix decode step of one layer, on every rank r (docs/design.md §3.3)::

    q, kv         = [W_Q; W_DKV] x                 one GEMV: the two projections concatenated at load time
    q_nope, q_pe  = q                              [B, H, P], [B, H, R]   all H heads, weights replicated
    q_pe          = RoPE(q_pe, global position)
    c_kv, k_pe    = RMSNorm(kv[:Lkv]), RoPE(kv[Lkv:], global position)
    if r owns the position's block: cache_r <- [c_kv | k_pe]     (block b lives on rank b mod N)
    q_abs         = einsum(q_nope, W_UK)           [B, H, Lkv]
    o_r, lse_r    = mla_decode(q_abs, q_pe, cache_r)   o_r [B, H, Lkv] locally normalised, lse_r [B, H] fp32,
                                                   written in place as rows [o_r | lse_r] of the send buffer
    all-to-all over heads: rank j gets heads [j h, (j+1) h) of every rank   -> [N, B, h, Lkv + lse]
    o_v           = helix_combine_uv(parts, W_UV[local heads])   [B, h, V]   one kernel:
                    o = sum_r exp(lse_r - lse) o_r (exact), then o_v = einsum(o, W_UV)
    out           = all_reduce(o_v W_O[:, local heads]^T)                   row-parallel o_proj

The all-to-all moves B H (Lkv + 1) values per rank, independent of S. Prefill (local prefill on the Helix
ranks, or the context server's tensor-parallel ranks) splits heads instead: each rank attends causally over the whole
prompt for its h heads (torch's fused scaled_dot_product_attention over the absorbed form: q = [q_abs | q_pe],
k = v = the cache rows), writes only the KV blocks it owns, and shares the W_UV / o_proj tail.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from helix.checkpoint import Checkpoint
from helix.comm import Comm
from helix.config import ModelConfig
from helix.fusion import fused_on_cuda
from helix.kv_cache import PagedKVCache
from helix.mapping import HelixMapping
from helix.rope import Rope, rotate
from helix.spec import Execution
from kernels import helix_combine_uv, mla_decode
from kernels.rms_norm import add_rms_norm, rms_norm_torch


# transformers and DeepSeek's own code build q_a_layernorm / kv_a_layernorm with the default eps, not
# config.rms_norm_eps.
LATENT_NORM_EPS = 1e-6


def latent_rows(kv: torch.Tensor, norm: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lkv: int,
                interleave: bool) -> torch.Tensor:
    """kv [T, Lkv + R] = W_DKV x -> cache rows [T, Lkv + R] = [RMSNorm(c_kv) | RoPE(k_pe)] (one kernel when fused)."""
    c_kv, k_pe = kv[:, :lkv], kv[:, lkv:]
    return torch.cat([rms_norm_torch(c_kv, norm, LATENT_NORM_EPS), rotate(k_pe, cos, sin, interleave)], -1)


@dataclass
class StepMeta:
    """Per-step inputs shared by all layers of one rank (device tensors; static shapes for CUDA graphs)."""

    cos: torch.Tensor  # [B, R/2] float32, from global positions
    sin: torch.Tensor
    slots: torch.Tensor  # [B] int64 flat cache slot to write (scratch slot where this rank is not the owner)
    block_table: torch.Tensor  # [B, W] int32 this rank's physical blocks
    local_lens: torch.Tensor  # [B] int32 this rank's tokens per sequence, the new one included


def lse_rows(bsz: int, heads: int, lkv: int, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised [B, H, Lkv + k] buffer in o's dtype whose rows hold [o (Lkv) | lse]: the lse's float32
    bytes ride as k extra elements (k = 1 for float32 and float64, 2 for bf16), so one all-to-all carries both
    without rounding the lse. ``unpack_lse`` gives the views mla_decode writes and helix_combine_uv reads."""
    return torch.empty((bsz, heads, lkv + -(-4 // dtype.itemsize)), dtype=dtype, device=device)


def unpack_lse(buf: torch.Tensor, lkv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``lse_rows``' buffer (or a view of it) as (o [.., Lkv], lse [..] float32) views, no copy (the kernels read
    and write any strides): the lse is element lkv * itemsize / 4 of the row read as float32 (Lkv * itemsize is
    a multiple of 4 for every MLA shape)."""
    if lkv * buf.element_size() % 4:
        raise ValueError(f"unpack_lse: Lkv = {lkv} of {buf.dtype} does not end on a 4-byte boundary")
    return buf[..., :lkv], buf.view(torch.float32)[..., lkv * buf.element_size() // 4]


@dataclass(frozen=True)
class AttentionLayout:
    """What one rank's attention computes and stores, fixed when the model is built (never set afterwards).

    ``heads`` [a0, a1): the query heads this rank attends with (its q projection and W_UK hold only these);
    Helix: all H, TP attention (helix/baselines.py): its h = H / N. The heads whose W_UV / o_proj slice the
    rank holds are always ``mapping.head_range`` (row-parallel o_proj), whatever the layout.
    ``cache``: which tokens this rank's KV cache holds; Helix: the rank's mapping (block b on rank b mod N),
    TP attention: N = 1 (every token on every rank, MLA having one KV head to split).
    ``microbatches``: HOP-B; > 1 cuts each decode batch so one micro-batch's all-to-all travels while the
    next one's attention runs; 1 is the step's one all-to-all.
    """

    heads: tuple[int, int]
    cache: HelixMapping
    microbatches: int = 1

    def __post_init__(self):
        if self.microbatches < 1:
            raise ValueError(f"microbatches={self.microbatches}: must be >= 1")

    @property
    def num_heads(self) -> int:
        return self.heads[1] - self.heads[0]


class HelixMLA:
    @staticmethod
    def layout_for(mapping: HelixMapping, num_heads: int, microbatches: int = 1) -> AttentionLayout:
        """Helix: every rank attends with all H heads over its own KV blocks."""
        return AttentionLayout((0, num_heads), mapping, microbatches)

    def __init__(self, cfg: ModelConfig, layer: int, ckpt: Checkpoint, mapping: HelixMapping, comm: Comm,
                 rope: Rope, dtype: torch.dtype, device, layout: AttentionLayout, execution: Execution = Execution()):
        self.cfg, self.layer, self.mapping, self.comm, self.rope = cfg, layer, mapping, comm, rope
        self.layout, self.kernels = layout, execution.kernels  # kernels: the path rule of kernels/_triton.py
        self.latent_rows = fused_on_cuda(latent_rows, execution.fuse)
        p = f"model.layers.{layer}.self_attn."
        H, P, V, L, qk = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank, cfg.qk_head_dim
        a0, a1 = layout.heads

        def get(name, *a):
            return ckpt.get(p + name, *a, dtype=dtype, device=device)

        # The q projection's output rows and W_UK only for the heads this rank attends with: all H (Helix, the
        # weights replicated) or a column-parallel slice (TP attention).
        # The two projections of x, concatenated once here so that a step reads them in one GEMV:
        # w_qkv_a = [q_proj (a (P + R) rows) or q_a_proj (q_lora_rank rows); kv_a_proj_with_mqa (Lkv + R rows)].
        if cfg.q_lora_rank:
            q_in = get("q_a_proj.weight")  # [q_lora_rank, D]
            self.q_a_norm = get("q_a_layernorm.weight")
            self.q_b = get("q_b_proj.weight", 0, a0 * qk, a1 * qk)  # [a (P + R), q_lora_rank]
        else:
            q_in = get("q_proj.weight", 0, a0 * qk, a1 * qk)  # [a (P + R), D]
        self.q_rows = q_in.shape[0]
        self.w_qkv_a = torch.cat([q_in, get("kv_a_proj_with_mqa.weight")])  # [q rows + Lkv + R, D]
        del q_in
        self.kv_a_norm = get("kv_a_layernorm.weight")
        kv_b = get("kv_b_proj.weight").view(H, P + V, L)
        self.w_uk = kv_b[a0:a1, :P].contiguous()  # [a, P, Lkv]  the attended heads (absorbed into q)
        self.h0, self.h1 = mapping.head_range(H)
        self.w_uv = kv_b[self.h0:self.h1, P:].contiguous()  # [h, V, Lkv]  local heads only
        self.o_proj = get("o_proj.weight", 1, self.h0 * V, self.h1 * V)  # [D, h V]  row-parallel slice

    # ------------------------------------------------------------------ shared pieces
    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> (q input [T, q rows], kv [T, Lkv + R]): one GEMV over the concatenated weights."""
        return F.linear(x, self.w_qkv_a).split([self.q_rows, self.w_qkv_a.shape[0] - self.q_rows], dim=-1)

    def queries(self, q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, q rows] (``project``'s) -> q_abs [T, a, Lkv], q_pe [T, a, R] (roped) for the a attended heads."""
        cfg = self.cfg
        if cfg.q_lora_rank:
            q = F.linear(add_rms_norm(q, None, self.q_a_norm, LATENT_NORM_EPS, path=self.kernels)[0], self.q_b)
        q = q.view(q.shape[0], self.layout.num_heads, cfg.qk_head_dim)
        q_nope, q_pe = q.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
        q_abs = torch.einsum("thp,hpl->thl", q_nope, self.w_uk)
        return q_abs, self.rope.apply(q_pe, cos, sin)

    def kv_entries(self, kv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """kv [T, Lkv + R] (``project``'s) -> cache rows [T, Lkv + R] = [RMSNorm(c_kv) | RoPE(k_pe)]."""
        return self.latent_rows(kv, self.kv_a_norm, cos, sin, self.cfg.kv_lora_rank, self.rope.interleave)

    def output(self, o_lat: torch.Tensor) -> torch.Tensor:
        """o_lat [T, h, Lkv] of the local heads -> W_UV -> ``o_project``."""
        return self.o_project(torch.einsum("thl,hvl->thv", o_lat, self.w_uv))

    def o_project(self, o_v: torch.Tensor) -> torch.Tensor:
        """o_v [T, h, V] of the local heads -> row-parallel o_proj -> all-reduce -> [T, D]."""
        return self.comm.all_reduce(F.linear(o_v.reshape(o_v.shape[0], -1), self.o_proj))

    # ------------------------------------------------------------------ decode (Helix)
    def decode(self, x: torch.Tensor, meta: StepMeta, cache: PagedKVCache) -> torch.Tensor:
        """x [B, D] normed hidden states of the batch -> attention output [B, D] (identical on all ranks).

        HOP-B (``layout.microbatches`` > 1): the batch is cut into micro-batches whose all-to-all is started
        asynchronously (on NCCL's stream), so it travels while the next micro-batch's attention runs; with one
        part the exchange is the step's one all-to-all, synchronous: NCCL runs it on the step's own stream, with
        no stream fork and join around it (in a CUDA graph each is a dependency edge, idle time on the GPU).
        """
        cfg, n = self.cfg, self.mapping.world_size
        H, L = cfg.num_attention_heads, cfg.kv_lora_rank
        q, kv = self.project(x)
        cache.write(self.layer, meta.slots, self.kv_entries(kv, meta.cos, meta.sin))
        q_abs, q_pe = self.queries(q, meta.cos, meta.sin)
        # mla_decode writes o_r and lse_r straight into the rows the all-to-all sends: no packing copy.
        rows = lse_rows(x.shape[0], H, L, q_abs.dtype, x.device)  # [B, H, Lkv + k]
        o_r, lse_r = unpack_lse(rows, L)
        parts = torch.arange(x.shape[0]).tensor_split(min(self.layout.microbatches, x.shape[0]))
        in_flight = []
        for part in parts:
            sl = slice(int(part[0]), int(part[-1]) + 1)
            mla_decode(q_abs[sl], q_pe[sl], cache.layers[self.layer], meta.block_table[sl], meta.local_lens[sl],
                       cfg.softmax_scale, cache.scale(self.layer), path=self.kernels, out=(o_r[sl], lse_r[sl]))
            # [b, H, *] -> [N, b, h, *]: slice j of the send buffer holds the heads rank j combines.
            send = rows[sl].view(sl.stop - sl.start, n, H // n, -1).transpose(0, 1)
            if len(parts) > 1:
                in_flight.append(self.comm.all_to_all(send, async_op=True))
            else:
                in_flight.append((self.comm.all_to_all(send), None))
        o_v = []
        for recv, work in in_flight:
            if work is not None:
                work.wait()  # stream-ordered on CUDA: no host sync
            o_parts, lse_parts = unpack_lse(recv, L)  # [N, b, h, Lkv], [N, b, h]
            o_v.append(helix_combine_uv(o_parts, lse_parts, self.w_uv, path=self.kernels))  # [b, h, V]
        return self.o_project(torch.cat(o_v) if len(o_v) > 1 else o_v[0])

    # ------------------------------------------------------------------ prefill (heads split, whole prompt)
    def prefill(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                cache: PagedKVCache) -> torch.Tensor:
        """x [T, D] of one sequence starting at position 0 -> [T, D]; writes the owned KV rows."""
        cfg = self.cfg
        q, kv = self.project(x)
        entries = self.kv_entries(kv, cos, sin)  # [T, Lkv + R], every rank computes all tokens
        cache.write(self.layer, slots, entries)
        q_abs, q_pe = self.queries(q, cos, sin)
        local = slice(self.h0 - self.layout.heads[0], self.h1 - self.layout.heads[0])  # the o_proj heads among the attended
        q = torch.cat([q_abs[:, local], q_pe[:, local]], dim=-1).transpose(0, 1)  # [h, T, Lkv + R] this rank's heads
        # Absorbed MQA: every local head attends to the one latent head, k = v = the cache rows [c_kv | k_pe]
        # expanded over the heads without a copy (with enable_gqa instead, float32 on CUDA falls back to the
        # math kernel); the first Lkv output dims are sum_s p_s c_kv(s). Fused and causal: flash on CPU,
        # memory-efficient (float32) or flash (bf16) on CUDA, no [h, T, T] scores held. In the model's dtype, as
        # the decode kernel reads the cache (the kernels accumulate in float32): bf16 takes the flash kernel on
        # CUDA, ~10x the float32 memory-efficient one (a 1M-token prompt in seconds, not a minute per layer).
        # With an FP8 cache the prompt still attends to its own unquantized rows (as vLLM's and TensorRT-LLM's
        # prefill does); decode steps read the e4m3 rows.
        kv = entries.to(x.dtype)[None, None].expand(1, q.shape[0], -1, -1)  # [1, h, T, Lkv + R]
        o = F.scaled_dot_product_attention(q.to(x.dtype)[None], kv, kv, is_causal=True, scale=cfg.softmax_scale)
        return self.output(o[0, :, :, :cfg.kv_lora_rank].transpose(0, 1).to(x.dtype))  # [T, h, Lkv]
