"""Paged latent KV cache of one rank, with Helix block ownership.

Per layer the rank holds ``cache[layer]``: [num_blocks, tokens_per_block, Lkv + R] (c_kv then k_pe). A
sequence's global block b lives on rank b mod N; on that rank it is local block b // N, placed in a physical
block taken from this rank's free list. Physical block 0 is a scratch block that is never handed out: writes
by non-owner ranks go there, so every rank runs the same kernels with the same shapes (CUDA-graph friendly).

Bookkeeping (block tables, lengths) is host-side and identical on every rank: each rank replays the same
allocate/append/free calls, so no rank needs to ask another where a token lives.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from helix.mapping import HelixMapping

SCRATCH_BLOCK = 0


class CapacityError(RuntimeError):
    """A sequence does not fit the KV cache (per-sequence limit or the rank's block pool)."""


@dataclass
class Sequence:
    seq_id: int
    length: int = 0  # global tokens written so far
    blocks: list[int] = field(default_factory=list)  # physical ids of this rank's local blocks, in order


class PagedKVCache:
    def __init__(self, mapping: HelixMapping, num_layers: int, entry_dim: int, max_tokens_per_seq: int,
                 num_blocks: int, dtype: torch.dtype, device: torch.device | str):
        self.mapping = mapping
        self.tpb = mapping.tokens_per_block
        self.max_tokens_per_seq = max_tokens_per_seq
        self.num_blocks = num_blocks
        self.layers = [torch.zeros(num_blocks, self.tpb, entry_dim, dtype=dtype, device=device)
                       for _ in range(num_layers)]
        self.free = list(range(num_blocks - 1, SCRATCH_BLOCK, -1))  # pop() hands out low ids first
        self.seqs: dict[int, Sequence] = {}

    @classmethod
    def for_config(cls, mapping: HelixMapping, num_layers: int, entry_dim: int, max_tokens_per_seq: int,
                   max_batch_size: int, dtype: torch.dtype, device) -> "PagedKVCache":
        """A pool with room for ``max_batch_size`` sequences of ``max_tokens_per_seq`` tokens each."""
        return cls(mapping, num_layers, entry_dim, max_tokens_per_seq,
                   1 + mapping.max_local_blocks(max_tokens_per_seq) * max_batch_size, dtype, device)

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
        """Store [T, Lkv + R] entries at flat ``slots`` [T] (device tensor)."""
        flat = self.layers[layer].view(-1, self.layers[layer].shape[-1])
        flat.index_copy_(0, slots, entries.to(flat.dtype))
