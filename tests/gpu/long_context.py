"""Helix MLA at long context on GPUs: the KV cache is filled with random latent rows (a 1M-token prefill is
not the point here), then Helix decode steps run over it; the oracle is the same absorbed attention done by
plain torch on one GPU over the whole, unsharded cache (float32, and bf16 for the error baseline)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from helix.attention import LATENT_NORM_EPS, HelixMLA, StepMeta
from helix.checkpoint import SyntheticCheckpoint
from helix.kv_cache import PagedKVCache
from helix.mapping import HelixMapping
from helix.presets import get_preset
from helix.rope import Rope
from kernels.rms_norm import rms_norm_torch as rms_norm

PRESET = "deepseek-v3-lite"  # H = 32, Lkv = 512, R = 64: the production layer shape


def _entries(cfg, seq_len: int, device) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(1234)
    e = torch.randn(seq_len, cfg.kv_cache_dim, generator=g, device=device)
    e[:, : cfg.kv_lora_rank] = rms_norm(e[:, : cfg.kv_lora_rank], torch.ones(cfg.kv_lora_rank, device=device), 1e-6)
    return e


def _decode_inputs(cfg, steps: int, device) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(99)
    return torch.randn(steps, 1, cfg.hidden_size, generator=g, device=device)


def run_helix_long(ctx, n: int, tpb: int, seq_len: int, steps: int):
    """Rank side: decode ``steps`` tokens of one sequence after ``seq_len`` random cached tokens, bf16."""
    cfg = get_preset(PRESET)
    src = SyntheticCheckpoint(cfg, seed=0, device=ctx.device)
    mapping = HelixMapping(ctx.rank, n, tpb)
    rope = Rope(cfg, ctx.device)
    attn = HelixMLA(cfg, 0, src, mapping, ctx.comm(n), rope, torch.bfloat16, ctx.device,
                    HelixMLA.layout_for(mapping, cfg.num_attention_heads))
    cache = PagedKVCache.for_config(mapping, 1, cfg.kv_cache_dim, seq_len + steps, 1, torch.bfloat16, ctx.device)
    cache.add(0)
    cache.write(0, cache.append(0, seq_len).to(ctx.device), _entries(cfg, seq_len, ctx.device))
    xs = _decode_inputs(cfg, steps, ctx.device)
    outs = []
    for step in range(steps):
        pos = seq_len + step
        s = cache.append(0, 1)
        table, lens = cache.block_table([0], [pos + 1])
        cos, sin = rope.cos_sin(torch.tensor([pos], device=ctx.device))
        meta = StepMeta(cos, sin, s.to(ctx.device), table.to(ctx.device), lens.to(ctx.device))
        outs.append(attn.decode(xs[step].bfloat16(), meta, cache).float().cpu())
    return torch.cat(outs) if ctx.rank == 0 else None


def reference_long(seq_len: int, steps: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Single-GPU absorbed MLA over the unsharded cache, all in ``dtype`` (float32 oracle or bf16 baseline)."""
    cfg = get_preset(PRESET)
    src = SyntheticCheckpoint(cfg, seed=0, device=device)
    p = "model.layers.0.self_attn."
    H, P, V, L, R = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    w_q = src.get(p + "q_proj.weight", dtype=dtype)
    w_kv_a = src.get(p + "kv_a_proj_with_mqa.weight", dtype=dtype)
    kv_norm = src.get(p + "kv_a_layernorm.weight", dtype=dtype)
    kv_b = src.get(p + "kv_b_proj.weight", dtype=dtype).view(H, P + V, L)
    w_o = src.get(p + "o_proj.weight", dtype=dtype)
    rope = Rope(cfg, device)
    cache = _entries(cfg, seq_len, device).to(dtype)
    xs = _decode_inputs(cfg, steps, device).to(dtype)
    outs = []
    for step in range(steps):
        x, pos = xs[step], torch.tensor([seq_len + step], device=device)
        cos, sin = rope.cos_sin(pos)
        c_kv, k_pe = F.linear(x, w_kv_a).split([L, R], dim=-1)
        new = torch.cat([rms_norm(c_kv, kv_norm, LATENT_NORM_EPS), rope.apply(k_pe, cos, sin)], -1)
        cache = torch.cat([cache, new])
        q = F.linear(x, w_q).view(1, H, P + R)
        q_abs = torch.einsum("thp,hpl->thl", q[..., :P], kv_b[:, :P])
        q_pe = rope.apply(q[..., P:], cos, sin)
        scores = (torch.einsum("thl,sl->ths", q_abs, cache[:, :L]) + torch.einsum("thr,sr->ths", q_pe, cache[:, L:]))
        probs = (scores.float() * cfg.softmax_scale).softmax(-1).to(dtype)
        o_lat = torch.einsum("ths,sl->thl", probs, cache[:, :L])
        o = torch.einsum("thl,hvl->thv", o_lat, kv_b[:, P:]).reshape(1, H * V)
        outs.append(F.linear(o, w_o).float().cpu())
    return torch.cat(outs)
