"""Deployment files for the disaggregated tests: the tiny checkpoint, KV blocks of 4 tokens so prompts span
many blocks and ownership rotates often."""

from __future__ import annotations

import pytest

TOKENS_PER_BLOCK = 4


def deployment(model_dir, n: int = 2, max_tokens: int = 128, max_batch_size: int = 2) -> dict:
    """A deployment file's content: context server (1 rank) + Helix generation server on ``n`` ranks."""
    kv = {"tokens_per_block": TOKENS_PER_BLOCK, "max_tokens": max_tokens}
    return {
        "model": {"path": str(model_dir), "dtype": "float32", "device": "cpu"},
        "context_servers": {"tensor_parallel_size": 1, "kv_cache_config": dict(kv)},
        "generation_servers": {"context_parallel_size": n,
                               "cp_config": {"cp_type": "HELIX", "tokens_per_block": TOKENS_PER_BLOCK},
                               "kv_cache_config": dict(kv), "max_batch_size": max_batch_size},
    }


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"ctx1+gen{n}")
def cluster(request, tiny_checkpoint):
    """Context server + Helix generation server with context_parallel_size 2 or 3, up for the whole module."""
    from helix.disagg import launch

    with launch(deployment(tiny_checkpoint, n=request.param)) as c:
        yield c
