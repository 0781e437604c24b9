"""Deployment files for the disaggregated tests: the tiny checkpoint, KV blocks of 4 tokens so prompts span
many blocks and ownership rotates often."""

from __future__ import annotations

import copy

import pytest

TOKENS_PER_BLOCK = 4


def deployment(model_dir, n: int = 2, max_tokens: int = 128, max_batch_size: int = 2, context_tp: int = 1) -> dict:
    """A deployment file's content: context server (``context_tp`` ranks) + Helix generation server on ``n`` ranks."""
    kv = {"tokens_per_block": TOKENS_PER_BLOCK, "max_tokens": max_tokens}
    return {
        "model": {"path": str(model_dir), "dtype": "float32", "device": "cpu"},
        "context_servers": {"tensor_parallel_size": context_tp, "kv_cache_config": dict(kv)},
        "generation_servers": {"context_parallel_size": n,
                               "cp_config": {"cp_type": "HELIX", "tokens_per_block": TOKENS_PER_BLOCK},
                               "kv_cache_config": dict(kv), "max_batch_size": max_batch_size},
    }


def with_key(raw: dict, path: str, value) -> dict:
    """A copy of ``raw`` with the dotted ``path`` set to ``value`` (deleted when value is ...)."""
    out = copy.deepcopy(raw)
    *parents, last = path.split(".")
    node = out
    for key in parents:
        node = node[key]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return out


@pytest.fixture(scope="module", params=[(1, 2), (1, 3), (2, 3)], ids=lambda p: f"ctx{p[0]}+gen{p[1]}")
def cluster(request, tiny_checkpoint):
    """Context server (tensor_parallel_size 1 or 2) + Helix generation server (context_parallel_size 2 or 3), up
    for the whole module. With context TP 2 and N = 3, context rank 0 hands generation ranks 0 and 2 their blocks
    and context rank 1 rank 1."""
    from helix.disagg import launch

    t, n = request.param
    with launch(deployment(tiny_checkpoint, n=n, context_tp=t)) as c:
        yield c
