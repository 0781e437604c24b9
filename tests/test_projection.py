"""The N = 8 projection recovers replicated / sharded weight bytes exactly and halves the Helix KV shard."""

import pytest

from helix.projection import project


def _row(mode, n, kv, ms=2.0):
    rep, sh = 1e9, 8e9
    return {"mode": mode, "gpus": n, "batch": 1, "context": 1 << 20, "ms": ms, "kv_bytes": kv,
            "weight_bytes": rep + sh / n, "attn_flops": 1e12,
            "floor_parts": {"memory_ms": 1.0, "collectives_ms": 0.2, "all_to_all_us": 10.0 * n, "all_reduce_us": 10.0 * n}}


def test_projection_weights_kv_and_collectives():
    result = {"ceilings": {"read_GBps": 1000.0, "copy_GBps": 600.0, "matmul_TFLOPs": 1000.0},
              "rows": [_row("helix", 2, 8e9), _row("helix", 4, 4e9), _row("tp", 2, 16e9), _row("tp", 4, 16e9)]}
    rows = {r["mode"]: r for r in project(result, 8)}
    assert rows["helix"]["weight_bytes"] == pytest.approx(1e9 + 8e9 / 8)
    assert rows["helix"]["kv_bytes"] == 2e9 and rows["tp"]["kv_bytes"] == 16e9
    # memory (2 GB KV + 2 GB weights at 1 TB/s) + collectives doubled (their latency doubled from N=2 to 4)
    # + the rest measured at N=4 (2.0 - 1.0 - 0.2 ms)
    assert rows["helix"]["projected_ms"] == pytest.approx(4.0 + 0.4 + 0.8)


def test_projection_refuses_a_result_without_read_bandwidth():
    result = {"ceilings": {"copy_GBps": 1000.0, "matmul_TFLOPs": 1000.0}, "rows": [_row("helix", 2, 8e9)]}
    with pytest.raises(ValueError, match="read_GBps"):
        project(result, 4)
