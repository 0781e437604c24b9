"""The Triton kernels on CUDA at DeepSeek-V3 sizes (Lkv 512, R 64; H 16, 32, 128; S up to 1M tokens).

Oracle: the float64 token-by-token reference of tests/kernels/cases.py, computed on the GPU.
"""

from __future__ import annotations

import pytest
import torch

from kernels import helix_combine, mla_decode
from kernels.mla_decode import mla_decode_triton
from tests.kernels.cases import (combine_lowp_baseline, combine_oracle64, make_combine_case, make_mla_case,
                                 mla_bf16_baseline, mla_oracle64)
from tests.tolerance import assert_bf16_policy, assert_f32_parity, error_report

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]

LKV, R, TPB = 512, 64, 64


def _check_bf16(o, lse, case, what):
    o_ref, lse_ref = mla_oracle64(case)
    o_base, lse_base = mla_bf16_baseline(case)
    assert not torch.isnan(o).any(), f"{what}: NaN in o"
    err, base = assert_bf16_policy(o, o_ref, o_base, f"{what} o")
    lerr, lbase = assert_bf16_policy(lse, lse_ref, lse_base, f"{what} lse")
    print(f"{what}: o err {err:.3e} (bf16 torch {base:.3e}), lse err {lerr:.3e} (bf16 torch {lbase:.3e})")
    empty = case.seq_lens == 0
    assert torch.all(lse[empty] == float("-inf")) and torch.all(o[empty] == 0)


@pytest.mark.parametrize("heads", [16, 32, 128])
@pytest.mark.parametrize("lens", [
    pytest.param([1 << 20], id="S1M"),
    pytest.param([65_537, 1, 0, 4_095], id="ragged-batch"),
])
def test_mla_decode_bf16_full_size(heads, lens):
    case = make_mla_case(lens, heads, lkv=LKV, rope=R, tpb=TPB, dtype=torch.bfloat16, seed=heads,
                         device="cuda", spare_blocks=5)
    o, lse = mla_decode(*case.args)
    torch.cuda.synchronize()
    _check_bf16(o, lse, case, f"H={heads} lens={lens}")


@pytest.mark.parametrize("heads", [5, 16, 128])
def test_mla_decode_f32_parity(heads):
    case = make_mla_case([5_000, 3, 0, 700], heads, lkv=LKV, rope=R, tpb=TPB, dtype=torch.float32, seed=7,
                         device="cuda", q_layout="slice")
    o, lse = mla_decode(*case.args)
    o_ref, lse_ref = mla_oracle64(case)
    assert_f32_parity(o, o_ref, f"f32 H={heads} o")
    assert_f32_parity(lse, lse_ref, f"f32 H={heads} lse")


def test_mla_decode_cuda_graph_replay():
    """Captured once with static buffers; replays follow new lengths and queries without host syncs."""
    case = make_mla_case([3_000, 10_000], 128, lkv=LKV, rope=R, tpb=TPB, dtype=torch.bfloat16, seed=3,
                         device="cuda", poison=False)
    qn, qp, kv, bt, sl, scale = case.args
    for _ in range(2):
        mla_decode(qn, qp, kv, bt, sl, scale)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o, lse = mla_decode(qn, qp, kv, bt, sl, scale)
    for lens in ([3_000, 10_000], [1, 0], [2_999, 6_001]):
        sl.copy_(torch.tensor(lens, dtype=torch.int32))
        qn.normal_()
        graph.replay()
        torch.cuda.synchronize()
        _check_bf16(o, lse, case, f"graph replay lens={lens}")


@pytest.mark.parametrize("heads,block_h,num_warps", [(128, 64, 8), (128, 32, 4), (32, 64, 8), (32, 32, 4), (16, 16, 4)])
def test_mla_decode_tile_variants(heads, block_h, num_warps):
    from kernels.mla_decode import MLAConfig

    case = make_mla_case([20_000, 77], heads, lkv=LKV, rope=R, tpb=TPB, dtype=torch.bfloat16, seed=11,
                         device="cuda")
    cfgs = [MLAConfig(block_h=block_h, block_n=32, num_warps=num_warps, num_stages=3),
            MLAConfig(block_h=block_h, block_n=64, num_warps=num_warps),
            MLAConfig(block_h=block_h, block_n=32, num_warps=num_warps, tma=False)]  # per-token page lookups
    for cfg in cfgs:
        _check_bf16(*mla_decode_triton(*case.args, config=cfg), case, f"H={heads} {cfg}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_helix_combine_gpu(n, dtype):
    o_parts, lse_parts = make_combine_case(n, 4, 16, lkv=LKV, dtype=dtype, seed=n, device="cuda", neg_inf="row")
    o, lse = helix_combine(o_parts, lse_parts)
    o_ref, lse_ref = combine_oracle64(o_parts, lse_parts)
    if dtype == torch.float32:
        assert_f32_parity(o, o_ref, f"combine N={n} o")
    else:
        assert_bf16_policy(o, o_ref, combine_lowp_baseline(o_parts, lse_parts)[0], f"combine bf16 N={n} o")
    assert_f32_parity(lse, lse_ref, f"combine N={n} lse")
    assert torch.all(o[0, 0] == 0) and lse[0, 0] == float("-inf"), error_report(o[0, 0], torch.zeros_like(o[0, 0]))[3]
