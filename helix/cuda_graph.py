"""The whole Helix decode step (all layers, every collective) captured in one CUDA graph.

Inputs live in static buffers that are overwritten before each replay; the step has no host
synchronisation (the MoE runs kernels.moe_decode, mla_decode picks its split count from the
block-table width, NCCL collectives are captured). One graph per batch size; the block-table width is fixed
per engine, so a graph serves every sequence length up to the KV capacity.
"""

from __future__ import annotations

import torch

from helix.kv_cache import SCRATCH_BLOCK, PagedKVCache
from helix.model import HelixModel


class GraphedDecodeStep:
    def __init__(self, model: HelixModel, cache: PagedKVCache, batch: int, width: int, warmup: int = 3):
        dev = model.device
        self.tokens = torch.zeros(batch, dtype=torch.long, device=dev)
        self.positions = torch.zeros(batch, dtype=torch.long, device=dev)
        # Until real inputs arrive: write to the scratch slot, read nothing (length 0 gives o = 0, lse = -inf).
        self.slots = torch.full((batch,), SCRATCH_BLOCK * cache.tpb, dtype=torch.long, device=dev)
        self.table = torch.full((batch, width), SCRATCH_BLOCK, dtype=torch.int32, device=dev)
        self.lens = torch.zeros(batch, dtype=torch.int32, device=dev)
        args = (self.tokens, self.positions, self.slots, self.table, self.lens, cache)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # compile kernels and settle allocations outside the capture
            for _ in range(warmup):
                model.decode_step(*args)
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model.decode_step(*args)

    def __call__(self, tokens, positions, slots, table, lens) -> torch.Tensor:
        """Same arguments as HelixModel.decode_step (without the cache); returns the static logits buffer."""
        self.tokens.copy_(tokens, non_blocking=True)
        self.positions.copy_(positions, non_blocking=True)
        self.slots.copy_(slots, non_blocking=True)
        self.table.copy_(table, non_blocking=True)
        self.lens.copy_(lens, non_blocking=True)
        self.graph.replay()
        return self.logits
