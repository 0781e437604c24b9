"""The layout Helix replaces, for benchmarks, and the context server's: tensor-parallel attention (TPA = N, KVP = 1).

Each of the N ranks owns H/N heads and keeps the **whole** latent cache (MLA has one KV head, so TP cannot
split it); q_proj / W_UK / W_UV / o_proj are sliced by head, there is no all-to-all and no combine, and the
o_proj all-reduce and the FFN are as in Helix. With N = 1 this is the single-GPU baseline. A context server of t
ranks prefills in this layout (helix/factory.py ``build_context_model``): heads split, every row in every cache.
"""

from __future__ import annotations

import torch

from helix.attention import AttentionLayout, HelixMLA, StepMeta
from helix.kv_cache import PagedKVCache
from helix.mapping import HelixMapping
from kernels import mla_decode


class TPAttentionMLA(HelixMLA):
    @staticmethod
    def layout_for(mapping: HelixMapping, num_heads: int, microbatches: int = 1) -> AttentionLayout:
        """Heads split (the rank attends with its h = H / N, the same heads it projects out), every token in
        every rank's cache (N = 1 for the cache). There is no all-to-all for HOP-B to overlap."""
        if microbatches != 1:
            raise ValueError(f"microbatches={microbatches}: TP attention has no all-to-all to overlap (HOP-B)")
        return AttentionLayout(mapping.head_range(num_heads), HelixMapping(0, 1, mapping.tokens_per_block))

    def decode(self, x: torch.Tensor, meta: StepMeta, cache: PagedKVCache) -> torch.Tensor:
        q, kv = self.project(x)
        cache.write(self.layer, meta.slots, self.kv_entries(kv, meta.cos, meta.sin))
        q_abs, q_pe = self.queries(q, meta.cos, meta.sin)  # [B, h, *] local heads only
        o, _ = mla_decode(q_abs, q_pe, cache.layers[self.layer], meta.block_table, meta.local_lens,
                          self.cfg.softmax_scale, cache.scale(self.layer), path=self.kernels)
        return self.output(o)
