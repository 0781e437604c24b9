"""Rank -> role. Helix uses one set of N ranks twice per layer:

* attention: KV parallel over the sequence (KVP = N, TPA = 1). Every rank holds all H query heads; after the
  all-to-all, rank r owns heads [r H/N, (r+1) H/N) for W_UV and its slice of the row-parallel o_proj.
* FFN: the same N ranks as tensor parallel (dense MLP, shared experts, TP experts) or expert parallel
  (routed experts [r E/N, (r+1) E/N)), and vocab parallel for the LM head.

KV ownership is by global block: block b (tokens [b T, (b+1) T)) lives on rank b mod N.
"""

from __future__ import annotations

from dataclasses import dataclass


def even_split(total: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of part ``index`` when ``total`` items are cut into ``parts`` nearly equal runs
    (the first ``total % parts`` runs get one extra item)."""
    base, extra = divmod(total, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


@dataclass(frozen=True)
class HelixMapping:
    rank: int
    world_size: int  # N
    tokens_per_block: int

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank={self.rank}: must be in [0, world_size={self.world_size})")

    # -------------------------------------------------------------- attention (KV parallel)
    def owner_of_position(self, pos: int) -> int:
        return (pos // self.tokens_per_block) % self.world_size  # block b lives on rank b mod N

    def num_blocks(self, seq_len: int) -> int:
        """Global blocks of a ``seq_len``-token sequence: ceil(S / T) (the last may be partial)."""
        return -(-seq_len // self.tokens_per_block)

    def owned_blocks(self, seq_len: int) -> range:
        """Global blocks of a ``seq_len``-token sequence this rank owns (the owner rule above), in local order."""
        return range(self.rank, self.num_blocks(seq_len), self.world_size)

    def max_local_blocks(self, seq_len: int) -> int:
        """Most blocks any rank holds of a ``seq_len``-token sequence: ceil(ceil(S / T) / N). Sizes a rank's
        block pool and the fixed block-table width of captured steps."""
        return -(-self.num_blocks(seq_len) // self.world_size)

    def local_length(self, seq_len: int) -> int:
        """Tokens of a ``seq_len``-token sequence that live on this rank. Only the globally last block can be
        partial, and when this rank owns it, it is also this rank's last local block, so the local tokens
        form one contiguous run [0, local_length) in local order."""
        full_blocks, tail = divmod(seq_len, self.tokens_per_block)
        n = self.world_size
        mine = full_blocks // n + (1 if self.rank < full_blocks % n else 0)
        length = mine * self.tokens_per_block
        if tail and full_blocks % n == self.rank:
            length += tail
        return length

    def local_index(self, pos: int) -> int:
        """Index of global position ``pos`` inside its owner's local run."""
        block, offset = divmod(pos, self.tokens_per_block)
        return (block // self.world_size) * self.tokens_per_block + offset

    def head_range(self, num_heads: int, rank: int | None = None) -> tuple[int, int]:
        r = self.rank if rank is None else rank
        h = num_heads // self.world_size
        return r * h, (r + 1) * h

    # -------------------------------------------------------------- FFN (TP / EP) and LM head
    def tp_range(self, width: int) -> tuple[int, int]:
        return even_split(width, self.world_size, self.rank)

    def expert_range(self, num_experts: int) -> tuple[int, int]:
        return even_split(num_experts, self.world_size, self.rank)

    def vocab_range(self, vocab_size: int, rank: int | None = None) -> tuple[int, int]:
        return even_split(vocab_size, self.world_size, self.rank if rank is None else rank)
