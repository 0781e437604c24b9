"""The performance floors (docs/design.md §8.1): their arithmetic, and every recorded figure at or above its floor.

A floor is max(bytes read / read bandwidth, FLOPs / bf16 matmul rate) (+ collectives for a whole step), with
both ceilings measured in the same run. A measured point under 1.0x its floor means the floor is not one (the
copy-based floor before issue 15 was beaten by mla_decode at 0.79x); the files recorded with a read bandwidth
are checked here, point by point, from their own ceilings, bytes and FLOPs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kernels.bench import floor_s

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "perf"
CEIL = {"read_GBps": 4000.0, "copy_GBps": 2500.0, "matmul_TFLOPs": 800.0}


def test_floor_uses_read_bandwidth_for_bytes_and_matmul_rate_for_flops():
    floor, t_bytes, t_flops = floor_s(8e9, 1e12, CEIL)
    assert t_bytes == pytest.approx(8e9 / 4e12) and t_flops == pytest.approx(1e12 / 8e14)
    assert floor == t_bytes  # 2 ms of reads against 1.25 ms of FLOPs
    assert floor_s(1e9, 1e13, CEIL)[0] == pytest.approx(1e13 / 8e14)  # compute-bound: the FLOPs term


def _recorded() -> list[Path]:
    files = sorted(p for p in GOLDEN.glob("*.json") if "read_GBps" in json.loads(p.read_text()).get("ceilings", {}))
    assert files, f"no result in {GOLDEN} records a read bandwidth: run python -m kernels.bench on a GPU"
    return files


def _kernel_points(res: dict):
    """(label, seconds, bytes, FLOPs, recorded floor us) of every timed mla_decode / torch point."""
    for r in res.get("decode", []):
        for impl in ("kernel", "torch"):
            f = r[impl]
            if isinstance(f, dict):
                yield f"{impl} H={r['H']} B={r['B']} S={r['S']}", f["us"] * 1e-6, r["kv_bytes"], r["flops"], f["floor_us"]
    for r in res.get("sweep", []):
        if "us" in r:
            yield f"sweep {r['config']} H={r['H']}", r["us"] * 1e-6, r["kv_bytes"], r["flops"], r["floor_us"]


@pytest.mark.parametrize("path", _recorded(), ids=lambda p: p.name)
def test_recorded_points_are_at_or_above_their_floor(path):
    res = json.loads(path.read_text())
    ceil = res["ceilings"]
    points = 0
    for label, t, by, fl, floor_us in _kernel_points(res):
        floor = floor_s(by, fl, ceil)[0]
        assert floor * 1e6 == pytest.approx(floor_us, rel=1e-9), f"{path.name} {label}: floor not recomputable"
        assert t / floor >= 1.0, f"{path.name} {label}: {t * 1e6:.1f} us is {t / floor:.2f}x its floor"
        points += 1
    for r in res.get("rows", []):  # helix bench: whole decode steps, collectives on top
        floor_ms = floor_s(r["kv_bytes"] + r["weight_bytes"], r["attn_flops"], ceil)[0] * 1e3
        floor_ms += r["floor_parts"]["collectives_ms"]
        assert floor_ms == pytest.approx(r["floor_ms"], rel=1e-9), f"{path.name} {r['mode']}: floor not recomputable"
        assert r["ms"] / floor_ms >= 1.0, f"{path.name} {r['mode']} B={r['batch']} S={r['context']}: {r['ms'] / floor_ms:.2f}x"
        points += 1
    assert points, f"{path.name}: no timed point"
