"""KV hand-over from the context server to the generation ranks, by block ownership.

A prompt's prefilled tokens [0, T) form global blocks b = 0 .. ceil(T / tokens_per_block) - 1; the last
may be partial (its tail rows are never read: decode overwrites them before local_lens reaches them).
Block b belongs to generation rank b mod N (docs/design.md §3.4), where it is local block b // N. So generation rank g
receives exactly the blocks g, g + N, g + 2N, ..., in that order, which is its local block order: one
message per layer, [n_g, tokens_per_block, Lkv + R], straight from the context server to the owner. An FP8 cache
travels as it is stored (``PagedKVCache.read_blocks``): e4m3 rows with their float32 scales, [n_g,
tokens_per_block, Lkv + R + 4] bytes, half of bf16's message. No
generation rank ever holds another's blocks, and ranks with no block for a short prompt get no message.

A context server of t tensor-parallel ranks holds every block on every rank (prefill splits heads; the latent
rows are one projection each rank computes whole), so the sends are shared out, not repeated: generation rank
g gets all its blocks from context rank g mod t (``kv_sender``), and each block still travels once.

Message order on every (sending context rank, generation rank) pair is layer 0, 1, ..., L-1 for request after
request in hand-over order, on both sides, so sends and receives pair up under gloo (matched by order and
tag) and NCCL (matched by order alone).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from helix.kv_cache import PagedKVCache
from helix.mapping import HelixMapping


def kv_sender(g: int, context_ranks: list[int]) -> int:
    """The world rank of the context rank that hands generation rank ``g`` its blocks."""
    return context_ranks[g % len(context_ranks)]


def send_prompt_kv(cache: PagedKVCache, seq_id: int, num_tokens: int, rank: int, context_ranks: list[int],
                   gen_ranks: list[int], wire: str) -> list:
    """Post context rank ``rank``'s sends of a prefilled sequence's blocks (its cache holds every block: its
    local order is the global order) to the generation ranks it serves, staged on ``wire`` (the cache's device,
    or "cpu" when the hand-over goes through host memory). Returns (work, staged tensor) pairs; keep them until
    the works are done."""
    seq, n = cache.seqs[seq_id], len(gen_ranks)
    # (destination, physical blocks) of each generation rank this rank serves that owns any block: the same for
    # every layer
    routes = []
    for g, dst in enumerate(gen_ranks):
        blocks = HelixMapping(g, n, cache.tpb).owned_blocks(num_tokens) if kv_sender(g, context_ranks) == rank else []
        if blocks:
            routes.append((dst, torch.tensor([seq.blocks[b] for b in blocks], device=cache.layers[0].device)))
    pending = []
    for layer in range(len(cache.layers)):
        for dst, phys in routes:
            staged = cache.read_blocks(layer, phys).to(wire)  # [n_g, tpb, E] (FP8: E + 4 bytes), contiguous
            pending.append((dist.isend(staged, dst), staged))
    return pending


def recv_prompt_kv(cache: PagedKVCache, seq_id: int, num_tokens: int, src: int, g: int, n: int, wire: str) -> None:
    """Receive this rank's blocks of a request's prefilled tokens, sent on ``wire``, into its reserved blocks
    (engine.reserve_prompt)."""
    blocks = HelixMapping(g, n, cache.tpb).owned_blocks(num_tokens)
    if not blocks:
        return
    local = cache.seqs[seq_id].blocks
    if len(local) != len(blocks):
        raise RuntimeError(f"sequence {seq_id}: {len(local)} reserved local blocks for {len(blocks)} owned blocks")
    phys = torch.tensor(local, device=cache.layers[0].device)
    bufs = [cache.empty_blocks(len(blocks), wire) for _ in cache.layers]
    works = [dist.irecv(buf, src) for buf in bufs]
    for layer, (buf, work) in enumerate(zip(bufs, works)):
        work.wait()
        cache.write_blocks(layer, phys, buf)


def connect(rank: int, context_ranks: list[int], gen_ranks: list[int], wire: str) -> None:
    """One small message per (sending context rank, generation rank) pair at start-up, on ``wire``: proves the
    path and, on NCCL, creates the pair's communicator before the first request (its creation blocks until both
    sides join)."""
    if rank in context_ranks:
        for g, dst in enumerate(gen_ranks):
            if kv_sender(g, context_ranks) == rank:
                dist.send(torch.tensor([dst], device=wire), dst)
    else:
        src = kv_sender(gen_ranks.index(rank), context_ranks)
        buf = torch.zeros(1, dtype=torch.long, device=wire)
        dist.recv(buf, src)
        if int(buf) != rank:
            raise RuntimeError(f"KV path check: rank {rank} received {int(buf)} from context rank {src}")
