"""Paged latent KV cache of one rank, with Helix block ownership.

Per layer the rank holds ``cache[layer]``: [num_blocks, tokens_per_block, Lkv + R] (c_kv then k_pe). With
``kv_dtype`` "fp8" (``kv_cache_config.dtype: fp8``) the rows are float8_e4m3fn and ``scales[layer]`` [num_blocks,
tokens_per_block] float32 holds one scale per row: a row is written as row / scale with scale = max|row| / 448
(e4m3's largest value, so no row saturates and none needs calibrating) and read as e4m3 x scale inside
``mla_decode``. 576 + 4 bytes per token and layer instead of bf16's 1152. A sequence's global block b lives on
rank b mod N; on that rank it is local block b // N, placed in a physical
block taken from this rank's free list. Physical block 0 is a scratch block that is never handed out: writes
by non-owner ranks go there, so every rank runs the same kernels with the same shapes (CUDA-graph friendly).

Bookkeeping (block tables, lengths) is host-side and identical on every rank: each rank replays the same
allocate/append/free calls, so no rank needs to ask another where a token lives.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from helix.config import KV_DTYPES
from helix.fp8 import FP8, e4m3_scale, to_e4m3
from helix.mapping import HelixMapping

SCRATCH_BLOCK = 0


def quantize_rows(entries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, E] -> (e4m3 rows [T, E], float32 scales [T]): each row's largest magnitude maps to 448."""
    scale = e4m3_scale(entries.abs().amax(-1))
    return to_e4m3(entries, scale[:, None]), scale


class CapacityError(RuntimeError):
    """A sequence does not fit the KV cache (per-sequence limit or the rank's block pool)."""


@dataclass
class Sequence:
    seq_id: int
    length: int = 0  # global tokens written so far
    blocks: list[int] = field(default_factory=list)  # physical ids of this rank's local blocks, in order


class PagedKVCache:
    def __init__(self, mapping: HelixMapping, num_layers: int, entry_dim: int, max_tokens_per_seq: int,
                 num_blocks: int, dtype: torch.dtype, device: torch.device | str, kv_dtype: str = "auto"):
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype={kv_dtype!r}: one of {KV_DTYPES}")
        self.mapping = mapping
        self.tpb = mapping.tokens_per_block
        self.max_tokens_per_seq = max_tokens_per_seq
        self.num_blocks = num_blocks
        self.kv_dtype = kv_dtype
        fp8 = kv_dtype == "fp8"
        self.layers = [torch.zeros(num_blocks, self.tpb, entry_dim, dtype=FP8 if fp8 else dtype, device=device)
                       for _ in range(num_layers)]
        self.scales = ([torch.zeros(num_blocks, self.tpb, dtype=torch.float32, device=device) for _ in range(num_layers)]
                       if fp8 else None)
        self.free = list(range(num_blocks - 1, SCRATCH_BLOCK, -1))  # pop() hands out low ids first
        self.seqs: dict[int, Sequence] = {}

    @classmethod
    def for_config(cls, mapping: HelixMapping, num_layers: int, entry_dim: int, max_tokens_per_seq: int,
                   max_batch_size: int, dtype: torch.dtype, device, kv_dtype: str = "auto") -> "PagedKVCache":
        """A pool with room for ``max_batch_size`` sequences of ``max_tokens_per_seq`` tokens each."""
        return cls(mapping, num_layers, entry_dim, max_tokens_per_seq,
                   1 + mapping.max_local_blocks(max_tokens_per_seq) * max_batch_size, dtype, device, kv_dtype)

    @staticmethod
    def bytes_per_token(entry_dim: int, dtype: torch.dtype, kv_dtype: str = "auto") -> int:
        """Bytes one token's row takes in one layer: E values of ``dtype``, or E e4m3 bytes plus a float32 scale."""
        return entry_dim + 4 if kv_dtype == "fp8" else entry_dim * dtype.itemsize

    def scale(self, layer: int) -> torch.Tensor | None:
        """``mla_decode``'s kv_scale for ``layer``: the per-row scales of an FP8 cache, None otherwise."""
        return None if self.scales is None else self.scales[layer]

    @property
    def table_width(self) -> int:
        """A block-table width that holds any sequence this cache admits (CUDA graphs pad to it). From this
        cache's mapping, not the model's: the TP-attention baseline keeps every token on every rank (N = 1)."""
        return self.mapping.max_local_blocks(self.max_tokens_per_seq)

    # ------------------------------------------------------------------ sequence lifecycle
    def add(self, seq_id: int) -> None:
        if seq_id in self.seqs:
            raise ValueError(f"sequence {seq_id} already in the cache")
        self.seqs[seq_id] = Sequence(seq_id)

    def check_fits(self, seq_id: int | None, total_tokens: int) -> None:
        """Raise CapacityError unless a sequence can grow to ``total_tokens`` tokens."""
        if total_tokens > self.max_tokens_per_seq:
            raise CapacityError(f"sequence {seq_id}: {total_tokens} tokens exceed the KV capacity "
                                f"kv_cache_config.max_tokens={self.max_tokens_per_seq}")

    def reserve(self, seq_id: int, new_tokens: int) -> None:
        """Make room for ``new_tokens`` more tokens (allocating this rank's blocks for them)."""
        seq = self.seqs[seq_id]
        self.check_fits(seq_id, seq.length + new_tokens)
        need = -(-self.mapping.local_length(seq.length + new_tokens) // self.tpb)
        while len(seq.blocks) < need:
            if not self.free:
                raise CapacityError(f"sequence {seq_id}: rank {self.mapping.rank} ran out of KV blocks "
                                    f"({self.num_blocks - 1} in its pool); lower the batch or raise max_tokens")
            seq.blocks.append(self.free.pop())

    def append(self, seq_id: int, new_tokens: int) -> torch.Tensor:
        """Take the sequence's next ``new_tokens`` positions: allocate this rank's blocks for them, advance its
        length, and return their flat write slots [new_tokens] (scratch where this rank is not the owner)."""
        seq = self.seqs[seq_id]
        self.reserve(seq_id, new_tokens)
        slots = self.slots(seq_id, torch.arange(seq.length, seq.length + new_tokens))
        seq.length += new_tokens
        return slots

    def release(self, seq_id: int) -> None:
        seq = self.seqs.pop(seq_id)
        self.free.extend(reversed(seq.blocks))

    # ------------------------------------------------------------------ step metadata
    def slots(self, seq_id: int, positions: torch.Tensor) -> torch.Tensor:
        """Flat slot index (into cache.view(-1, entry)) for each global position; the scratch slot 0 where
        this rank is not the owner. Positions must already be reserved."""
        seq = self.seqs[seq_id]
        out = []
        for p in positions.tolist():
            if self.mapping.owner_of_position(p) != self.mapping.rank:
                out.append(SCRATCH_BLOCK * self.tpb)
                continue
            local = self.mapping.local_index(p)
            out.append(seq.blocks[local // self.tpb] * self.tpb + local % self.tpb)
        return torch.tensor(out, dtype=torch.long)

    def block_table(self, seq_ids: list[int], lengths: list[int], width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(block_table [B, width] int32, local_lens [B] int32) for sequences of the given global lengths.
        Unused entries point at the scratch block (never read: the kernels stop at local_lens)."""
        local = [self.mapping.local_length(n) for n in lengths]
        nblocks = [-(-n // self.tpb) for n in local]
        width = max([1, *nblocks]) if width is None else width
        table = torch.full((len(seq_ids), width), SCRATCH_BLOCK, dtype=torch.int32)
        for i, (sid, nb) in enumerate(zip(seq_ids, nblocks)):
            table[i, :nb] = torch.tensor(self.seqs[sid].blocks[:nb], dtype=torch.int32)
        return table, torch.tensor(local, dtype=torch.int32)

    def write(self, layer: int, slots: torch.Tensor, entries: torch.Tensor) -> None:
        """Store [T, Lkv + R] entries at flat ``slots`` [T] (device tensor); FP8: quantized, with their scales."""
        flat = self.layers[layer].view(-1, self.layers[layer].shape[-1])
        if self.scales is None:
            flat.index_copy_(0, slots, entries.to(flat.dtype))
            return
        rows, scale = quantize_rows(entries)
        flat.view(torch.uint8).index_copy_(0, slots, rows.view(torch.uint8))  # as bytes: torch has no fp8 index_copy_
        self.scales[layer].view(-1).index_copy_(0, slots, scale)

    # ------------------------------------------------------------------ whole blocks (the KV hand-over)
    def read_blocks(self, layer: int, phys: torch.Tensor) -> torch.Tensor:
        """Physical blocks ``phys`` [n] of ``layer`` as one tensor: [n, T, E] rows, or for FP8 [n, T, E + 4] bytes,
        each row's e4m3 values followed by its float32 scale, so that a block travels as one message."""
        if self.scales is None:
            return self.layers[layer].index_select(0, phys)
        rows = self.layers[layer].view(torch.uint8).index_select(0, phys)
        scale = self.scales[layer].index_select(0, phys)
        return torch.cat([rows, scale[..., None].view(torch.uint8)], dim=-1)

    def empty_blocks(self, n: int, device: torch.device | str) -> torch.Tensor:
        """A receive buffer for ``n`` blocks in ``read_blocks``' form."""
        shape, dtype = self.layers[0].shape[1:], self.layers[0].dtype
        if self.scales is not None:
            shape, dtype = (*shape[:-1], shape[-1] + 4), torch.uint8
        return torch.empty((n, *shape), dtype=dtype, device=device)

    def write_blocks(self, layer: int, phys: torch.Tensor, blocks: torch.Tensor) -> None:
        """Store ``read_blocks``' form of ``len(phys)`` blocks into physical blocks ``phys``."""
        blocks = blocks.to(self.layers[layer].device)
        if self.scales is None:
            self.layers[layer].index_copy_(0, phys, blocks)
            return
        entry = self.layers[layer].shape[-1]
        self.layers[layer].view(torch.uint8).index_copy_(0, phys, blocks[..., :entry].contiguous())
        self.scales[layer].index_copy_(0, phys, blocks[..., entry:].contiguous().view(torch.float32)[..., 0])
