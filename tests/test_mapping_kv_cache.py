"""Block ownership and the paged cache: exact bookkeeping (docs/design.md §3.4)."""

import pytest
import torch

from helix.kv_cache import SCRATCH_BLOCK, CapacityError, PagedKVCache
from helix.mapping import HelixMapping, even_split


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("tpb", [1, 4, 5])
def test_every_position_has_one_owner_and_local_runs_are_contiguous(n, tpb):
    maps = [HelixMapping(r, n, tpb) for r in range(n)]
    for seq_len in range(0, 4 * n * tpb + 3):
        owned = {r: [] for r in range(n)}
        for p in range(seq_len):
            owner = maps[0].owner_of_position(p)
            assert owner == (p // tpb) % n  # round-robin by global block
            owned[owner].append(maps[owner].local_index(p))
        for r in range(n):
            assert owned[r] == list(range(len(owned[r]))), "local indices must be 0..k-1 in order"
            assert maps[r].local_length(seq_len) == len(owned[r])


def test_even_split_covers_range():
    for total in range(0, 20):
        for parts in range(1, 6):
            runs = [even_split(total, parts, i) for i in range(parts)]
            assert runs[0][0] == 0 and runs[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(runs, runs[1:]))


def _cache(rank=0, n=2, tpb=4, max_tokens=40, batch=2):
    return PagedKVCache.for_config(HelixMapping(rank, n, tpb), num_layers=2, entry_dim=3,
                                   max_tokens_per_seq=max_tokens, max_batch_size=batch, dtype=torch.float32, device="cpu")


def test_slots_write_only_owned_positions_and_scratch_elsewhere():
    for rank in range(3):
        c = _cache(rank=rank, n=3, tpb=4)
        c.add(7)
        slots = c.append(7, 19)
        m = c.mapping
        for p, s in enumerate(slots.tolist()):
            if m.owner_of_position(p) == rank:
                local = m.local_index(p)
                assert s == c.seqs[7].blocks[local // 4] * 4 + local % 4
                assert s // 4 != SCRATCH_BLOCK
            else:
                assert s == SCRATCH_BLOCK * 4
        split = _cache(rank=rank, n=3, tpb=4)  # appending in pieces continues where the sequence ends
        split.add(7)
        assert torch.equal(torch.cat([split.append(7, 10), split.append(7, 9)]), slots)
        table, lens = c.block_table([7], [19])
        assert lens.tolist() == [m.local_length(19)]
        assert table[0, : -(-lens[0] // 4)].tolist() == c.seqs[7].blocks


def test_capacity_is_refused_with_a_clear_error_and_blocks_are_reused():
    c = _cache(max_tokens=40)
    c.add(1)
    with pytest.raises(CapacityError, match="41 tokens exceed the KV capacity kv_cache_config.max_tokens=40"):
        c.reserve(1, 41)
    c.reserve(1, 40)
    used = list(c.seqs[1].blocks)
    c.release(1)
    c.add(2)
    c.reserve(2, 40)
    assert sorted(c.seqs[2].blocks) == sorted(used)


def test_pool_exhaustion_is_refused():
    c = _cache(max_tokens=16, batch=1)
    c.add(1)
    c.reserve(1, 16)
    c.add(2)
    with pytest.raises(CapacityError, match="ran out of KV blocks"):
        c.reserve(2, 8)


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("max_tokens", [1, 7, 8, 40, 41])
def test_table_width_holds_the_longest_sequence_on_every_rank_and_no_more(n, max_tokens):
    """The fixed width CUDA graphs pad block tables to: exactly the most blocks any rank holds of a
    ``max_tokens``-token sequence, from the cache's own mapping (N = 1: every token on the rank)."""
    widths = []
    for rank in range(n):
        c = _cache(rank=rank, n=n, max_tokens=max_tokens, batch=1)
        c.add(0)
        c.reserve(0, max_tokens)
        widths.append(len(c.seqs[0].blocks))
        table, _ = c.block_table([0], [max_tokens], c.table_width)
        assert table.shape == (1, c.table_width)
    assert c.table_width == max(widths) == HelixMapping(0, n, 4).max_local_blocks(max_tokens)
