"""The layout Helix replaces, for benchmarks: tensor-parallel attention (TPA = N, KVP = 1).

Each of the N ranks owns H/N heads and keeps the **whole** latent cache (MLA has one KV head, so TP cannot
split it); q_proj / W_UK / W_UV / o_proj are sliced by head, there is no all-to-all and no combine, and the
o_proj all-reduce and the FFN are as in Helix. With N = 1 this is the single-GPU baseline.
"""

from __future__ import annotations

import torch

from helix.attention import HelixMLA, StepMeta
from helix.kv_cache import PagedKVCache
from helix.mapping import HelixMapping
from kernels import mla_decode


class TPAttentionMLA(HelixMLA):
    def __init__(self, cfg, layer, ckpt, mapping: HelixMapping, comm, rope, dtype, device):
        super().__init__(cfg, layer, ckpt, mapping, comm, rope, dtype, device)
        self.cache_mapping = HelixMapping(0, 1, mapping.tokens_per_block)  # every token on every rank
        h0, h1, qk = self.h0, self.h1, cfg.qk_head_dim
        if cfg.q_lora_rank:
            self.q_b = self.q_b[h0 * qk:h1 * qk].contiguous()  # column-parallel: local heads only
        else:
            self.q_proj = self.q_proj[h0 * qk:h1 * qk].contiguous()
        self.w_uk = self.w_uk[h0:h1].contiguous()

    def decode(self, x: torch.Tensor, meta: StepMeta, cache: PagedKVCache) -> torch.Tensor:
        cache.write(self.layer, meta.slots, self.kv_entries(x, meta.cos, meta.sin))
        q_abs, q_pe = self.queries(x, meta.cos, meta.sin)  # local heads only
        o, _ = mla_decode(q_abs, q_pe, cache.layers[self.layer], meta.block_table, meta.local_lens,
                          self.cfg.softmax_scale)
        return self.output(o)
