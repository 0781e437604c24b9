"""The runtime decoder stack of one Helix rank.

Every rank holds: the embedding, norms, router gates and query / latent-KV projections (replicated), its
head slice of W_UV and o_proj, its TP slice of dense and shared-expert MLPs, its experts (EP) or expert
slices (TP), and its vocabulary slice of the LM head. Each rank reads only those slices from the checkpoint.

Per layer and step there are three collectives, all visible here and in attention.py: the attention
all-to-all, the o_proj all-reduce and the FFN all-reduce; plus one all-gather of the vocab-parallel logits
per step. A step ends with the same float32 logits [B, V] on every rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from helix.attention import AttentionLayout, HelixMLA, StepMeta, rms_norm
from helix.checkpoint import Checkpoint
from helix.comm import Comm
from helix.config import ModelConfig
from helix.fusion import fused_on_cuda
from helix.kv_cache import PagedKVCache
from helix.mapping import HelixMapping
from helix.moe import GatedMLP, MoE
from helix.rope import Rope
from helix.spec import Execution


class HelixDecoderLayer:
    def __init__(self, cfg: ModelConfig, layer: int, ckpt: Checkpoint, mapping: HelixMapping, comm: Comm,
                 rope: Rope, moe_parallel: str, dtype: torch.dtype, device, attention: type, layout: AttentionLayout,
                 execution: Execution):
        p = f"model.layers.{layer}."
        self.eps, self.comm = cfg.rms_norm_eps, comm
        self.norm = fused_on_cuda(rms_norm, execution.fuse)
        self.input_norm = ckpt.get(p + "input_layernorm.weight", dtype=dtype, device=device)
        self.post_norm = ckpt.get(p + "post_attention_layernorm.weight", dtype=dtype, device=device)
        self.attn = attention(cfg, layer, ckpt, mapping, comm, rope, dtype, device, layout, execution)
        if cfg.is_moe_layer(layer):
            self.ffn = MoE(cfg, ckpt, p + "mlp.", mapping, moe_parallel, dtype, device, execution)
        else:
            self.ffn = GatedMLP(ckpt, p + "mlp.", cfg.intermediate_size, mapping, dtype, device)

    def _ffn(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.comm.all_reduce(self.ffn(self.norm(h, self.post_norm, self.eps)))

    def decode(self, x: torch.Tensor, meta: StepMeta, cache: PagedKVCache) -> torch.Tensor:
        return self._ffn(x + self.attn.decode(self.norm(x, self.input_norm, self.eps), meta, cache))

    def prefill(self, x, cos, sin, slots, cache) -> torch.Tensor:
        return self._ffn(x + self.attn.prefill(self.norm(x, self.input_norm, self.eps), cos, sin, slots, cache))


class HelixModel:
    def __init__(self, ckpt: Checkpoint, mapping: HelixMapping, comm: Comm, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", moe_parallel: str = "ep", execution: Execution = Execution(),
                 attention: type = HelixMLA):
        """Built by helix/factory.py from a run's spec. ``attention`` swaps the attention module (benchmarks use
        it for the TP-attention baseline); ``execution.microbatches`` > 1 splits each decode batch into that many
        micro-batches whose all-to-alls overlap the next micro-batch's attention (HOP-B). Both fix
        ``self.layout`` (``attention.layout_for``: the heads each rank attends with, the tokens its cache holds,
        the micro-batches), built once here and shared by every layer and the cache. ``execution`` also gives
        the kernel path and fusion every module uses."""
        cfg = self.cfg = ckpt.config
        self.mapping, self.comm, self.dtype, self.device = mapping, comm, dtype, torch.device(device)
        self.layout = attention.layout_for(mapping, cfg.num_attention_heads, execution.microbatches)
        self.rope = Rope(cfg, self.device, execution.fuse)
        self.norm_fn = fused_on_cuda(rms_norm, execution.fuse)
        self.embed = ckpt.get("model.embed_tokens.weight", dtype=dtype, device=device)  # [V, D] replicated lookup
        self.layers = [HelixDecoderLayer(cfg, i, ckpt, mapping, comm, self.rope, moe_parallel, dtype, device, attention,
                                         self.layout, execution) for i in range(cfg.num_hidden_layers)]
        self.norm = ckpt.get("model.norm.weight", dtype=dtype, device=device)
        head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        self.v0, self.v1 = mapping.vocab_range(cfg.vocab_size)
        self.lm_head = ckpt.get(head, 0, self.v0, self.v1, dtype=dtype, device=device)  # [V_r, D]
        self.shard_sizes = [hi - lo for lo, hi in (mapping.vocab_range(cfg.vocab_size, r)
                                                   for r in range(mapping.world_size))]

    def new_cache(self, max_tokens_per_seq: int, max_batch_size: int, kv_dtype: str = "auto") -> PagedKVCache:
        """``kv_dtype``: "auto" (the model's dtype) or "fp8" (e4m3 rows with per-row scales, helix/kv_cache.py)."""
        return PagedKVCache.for_config(self.layout.cache, self.cfg.num_hidden_layers, self.cfg.kv_cache_dim,
                                       max_tokens_per_seq, max_batch_size, self.dtype, self.device, kv_dtype)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [T, D] -> float32 logits [T, V], the same on every rank (vocab-parallel head + all-gather)."""
        local = F.linear(self.norm_fn(h, self.norm, self.cfg.rms_norm_eps), self.lm_head).float()
        local = F.pad(local, (0, max(self.shard_sizes) - local.shape[1]))  # all-gather needs equal shards
        parts = self.comm.all_gather(local)  # [N, T, ceil(V/N)]
        return torch.cat([parts[r, :, :size] for r, size in enumerate(self.shard_sizes)], dim=-1)

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                    block_table: torch.Tensor, local_lens: torch.Tensor, cache: PagedKVCache) -> torch.Tensor:
        """One Helix decode step. tokens, positions [B] (global), slots [B], block_table [B, W], local_lens [B]
        (this rank's, the new token included) -> logits [B, V] float32."""
        cos, sin = self.rope.cos_sin(positions)
        meta = StepMeta(cos, sin, slots, block_table, local_lens)
        x = self.embed[tokens]
        for layer in self.layers:
            x = layer.decode(x, meta, cache)
        return self.logits(x)

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, slots: torch.Tensor, cache: PagedKVCache,
                logits_from: int | None = None) -> torch.Tensor | None:
        """Prompt tokens [T] at positions 0..T-1 of one sequence: writes the KV rows this rank owns (``slots`` [T],
        scratch elsewhere). With ``logits_from``, returns the float32 logits [T - logits_from, V] of positions
        logits_from..T-1 (row t predicts token logits_from + t + 1); without, runs no LM head."""
        cos, sin = self.rope.cos_sin(torch.arange(tokens.shape[0], device=self.device))
        x = self.embed[tokens]
        for layer in self.layers:
            x = layer.prefill(x, cos, sin, slots, cache)
        return None if logits_from is None else self.logits(x[logits_from:])
