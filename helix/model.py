"""The runtime decoder stack of one Helix rank.

Every rank holds: the embedding, norms, router gates and query / latent-KV projections (replicated), its
head slice of W_UV and o_proj, its TP slice of dense and shared-expert MLPs, its experts (EP) or expert
slices (TP), and its vocabulary slice of the LM head. Each rank reads only those slices from the checkpoint.

Per layer and step there are three collectives, all visible here and in attention.py: the attention
all-to-all, the o_proj all-reduce and the FFN all-reduce; plus one all-gather of the vocab-parallel logits
per step. A step ends with the same float32 logits [B, V] on every rank.

The residual stream h travels between layers together with the last sub-block's output that is not yet added
to it (``delta``): each RMSNorm adds it first, in one kernel (kernels/rms_norm.py), so the step has no
separate residual adds::

    y, h = add_rms_norm(h, delta, input_norm)      h += delta; y = RMSNorm(h)     (delta None: first layer)
    y, h = add_rms_norm(h, attention(y), post_norm)
    delta = all_reduce(ffn(y))                     added by the next layer's input norm or the final norm
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from helix.attention import AttentionLayout, HelixMLA, StepMeta
from helix.checkpoint import Checkpoint
from helix.comm import Comm
from helix.config import ModelConfig
from helix.kv_cache import PagedKVCache
from helix.mapping import HelixMapping
from helix.moe import GatedMLP, MoE
from helix.rope import Rope
from helix.spec import Execution
from kernels.rms_norm import add_rms_norm


class HelixDecoderLayer:
    def __init__(self, cfg: ModelConfig, layer: int, ckpt: Checkpoint, mapping: HelixMapping, comm: Comm,
                 rope: Rope, moe_parallel: str, dtype: torch.dtype, device, attention: type, layout: AttentionLayout,
                 execution: Execution):
        p = f"model.layers.{layer}."
        self.comm = comm
        self.add_norm = functools.partial(add_rms_norm, eps=cfg.rms_norm_eps, path=execution.kernels)
        self.input_norm = ckpt.get(p + "input_layernorm.weight", dtype=dtype, device=device)
        self.post_norm = ckpt.get(p + "post_attention_layernorm.weight", dtype=dtype, device=device)
        self.attn = attention(cfg, layer, ckpt, mapping, comm, rope, dtype, device, layout, execution)
        if cfg.is_moe_layer(layer):
            self.ffn = MoE(cfg, ckpt, p + "mlp.", mapping, moe_parallel, dtype, device, execution)
        else:
            self.ffn = GatedMLP(ckpt, p + "mlp.", cfg.intermediate_size, mapping, dtype, device)

    def _ffn(self, h: torch.Tensor, attn_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, h = self.add_norm(h, attn_out, self.post_norm)
        return h, self.comm.all_reduce(self.ffn(y))

    def decode(self, h: torch.Tensor, delta: torch.Tensor | None, meta: StepMeta,
               cache: PagedKVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual h [B, D], delta [B, D] or None) -> the next layer's (h, delta) (module docstring)."""
        y, h = self.add_norm(h, delta, self.input_norm)
        return self._ffn(h, self.attn.decode(y, meta, cache))

    def prefill(self, h, delta, cos, sin, slots, cache) -> tuple[torch.Tensor, torch.Tensor]:
        y, h = self.add_norm(h, delta, self.input_norm)
        return self._ffn(h, self.attn.prefill(y, cos, sin, slots, cache))


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
        self.add_norm = functools.partial(add_rms_norm, eps=cfg.rms_norm_eps, path=execution.kernels)
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

    def logits(self, h: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """(h, delta) [T, D] of the last layer -> float32 logits [T, V] of h + delta, the same on every rank
        (vocab-parallel head + all-gather)."""
        local = F.linear(self.add_norm(h, delta, self.norm)[0], self.lm_head).float()
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
        h, delta = self.embed[tokens], None
        for layer in self.layers:
            h, delta = layer.decode(h, delta, meta, cache)
        return self.logits(h, delta)

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, slots: torch.Tensor, cache: PagedKVCache,
                logits_from: int | None = None) -> torch.Tensor | None:
        """Prompt tokens [T] at positions 0..T-1 of one sequence: writes the KV rows this rank owns (``slots`` [T],
        scratch elsewhere). With ``logits_from``, returns the float32 logits [T - logits_from, V] of positions
        logits_from..T-1 (row t predicts token logits_from + t + 1); without, runs no LM head."""
        cos, sin = self.rope.cos_sin(torch.arange(tokens.shape[0], device=self.device))
        h, delta = self.embed[tokens], None
        for layer in self.layers:
            h, delta = layer.prefill(h, delta, cos, sin, slots, cache)
        return None if logits_from is None else self.logits(h[logits_from:], delta[logits_from:])
