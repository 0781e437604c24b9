"""The GPU kernels (Triton, and mla_decode's CUDA C++ path) at DeepSeek-V3 sizes (Lkv 512, R 64; H 16, 32, 128;
S up to 1M tokens).

Oracle: the float64 token-by-token reference of tests/kernels/cases.py, computed on the GPU.
"""

from __future__ import annotations

import importlib
from dataclasses import replace

import pytest
import torch

from kernels import helix_combine, helix_combine_uv, mla_decode
from kernels.mla_decode import (CUDA_MMA_SYNC_CONFIG, CUDA_SM90_CONFIG, MLAConfig, cuda_config, mla_decode_cuda,
                                mla_decode_triton)
from tests.kernels.cases import (combine_lowp_baseline, combine_oracle64, combine_uv_oracle64, make_combine_case,
                                 make_mla_case, make_w_uv, mla_bf16_baseline, mla_oracle64)
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


def _hopper() -> bool:
    return torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.parametrize("path,heads", [("auto", 128), ("triton", 32), ("cuda", 32), ("cuda", 128)])
def test_mla_decode_cuda_graph_replay(path, heads):
    """Captured once with static buffers; replays follow new lengths and queries without host syncs."""
    case = make_mla_case([3_000, 10_000], heads, lkv=LKV, rope=R, tpb=TPB, dtype=torch.bfloat16, seed=3,
                         device="cuda", poison=False)
    qn, qp, kv, bt, sl, scale = case.args
    for _ in range(2):
        mla_decode(qn, qp, kv, bt, sl, scale, path=path)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o, lse = mla_decode(qn, qp, kv, bt, sl, scale, path=path)
    for lens in ([3_000, 10_000], [1, 0], [2_999, 6_001]):
        sl.copy_(torch.tensor(lens, dtype=torch.int32))
        qn.normal_()
        graph.replay()
        torch.cuda.synchronize()
        _check_bf16(o, lse, case, f"{path} graph replay lens={lens}")


@pytest.mark.parametrize("heads,block_h,num_warps", [(128, 64, 8), (128, 32, 4), (32, 64, 8), (32, 32, 4), (16, 16, 4)])
def test_mla_decode_tile_variants(heads, block_h, num_warps):
    case = make_mla_case([20_000, 77], heads, lkv=LKV, rope=R, tpb=TPB, dtype=torch.bfloat16, seed=11,
                         device="cuda")
    cfgs = [MLAConfig(block_h=block_h, block_n=32, num_warps=num_warps, num_stages=3),
            MLAConfig(block_h=block_h, block_n=64, num_warps=num_warps),
            MLAConfig(block_h=block_h, block_n=32, num_warps=num_warps, tma=False)]  # per-token page lookups
    for cfg in cfgs:
        _check_bf16(*mla_decode_triton(*case.args, config=cfg), case, f"H={heads} {cfg}")


@pytest.mark.parametrize("heads", [5, 16, 32, 64, 128])
@pytest.mark.parametrize("lens,tpb", [
    pytest.param([1 << 20], 64, id="S1M"),
    pytest.param([65_537, 1, 0, 4_095], 64, id="ragged-batch"),
    pytest.param([3_001, 77, 40], 48, id="T48-tiles-across-blocks"),
    pytest.param([1_000, 33], 16, id="T16"),
    pytest.param([4_097, 63, 65], 128, id="T128"),
])
def test_mla_decode_cuda_bf16(heads, lens, tpb):
    """The CUDA path (the card's default kernel: wgmma on Hopper) against the float64 oracle: padded and multiple
    head tiles, S not a multiple of the tile, empty and one-token sequences, cache blocks smaller than a tile, not
    dividing it, or holding two tiles."""
    case = make_mla_case(lens, heads, lkv=LKV, rope=R, tpb=tpb, dtype=torch.bfloat16, seed=heads + tpb,
                         device="cuda", spare_blocks=5, q_layout="slice")
    _check_bf16(*mla_decode(*case.args, path="cuda"), case, f"cuda H={heads} T={tpb} lens={lens}")


CUDA_KERNELS = [pytest.param(CUDA_SM90_CONFIG, id="wgmma-s2")] + [
    pytest.param(replace(CUDA_MMA_SYNC_CONFIG, num_stages=st), id=f"mma.sync-s{st}") for st in (3, 4, 5)]


@pytest.mark.parametrize("cfg", CUDA_KERNELS)
@pytest.mark.parametrize("num_splits", [1, 7, None])
@pytest.mark.parametrize("heads", [32, 128])
def test_mla_decode_cuda_configs(cfg, num_splits, heads):
    """Both compiled kernels (mma.sync at every pipeline depth) at one split (the kernel writes the final bf16
    output), a few (empty splits for the short sequences), the default."""
    if cfg is CUDA_SM90_CONFIG and not _hopper():
        pytest.skip("the wgmma kernel runs on compute capability 9.0 only")
    case = make_mla_case([20_000, 77, 0], heads, lkv=LKV, rope=R, tpb=TPB, dtype=torch.bfloat16, seed=cfg.num_stages,
                         device="cuda")
    cfg = replace(cfg, num_splits=num_splits)
    _check_bf16(*mla_decode_cuda(*case.args, config=cfg), case, f"cuda {cfg} H={heads}")


def test_mla_decode_cuda_running_max_jumps():
    """Scores that rise far above the running max mid-split (cache rows scaled x8 to x32 at a few positions, so
    some heads' scores jump by tens of units): the wgmma kernel moves its max lazily (only past 2^8) and must
    rescale the output exactly when it does; one split walks all the tiles, the default splits see the jumps in
    different programs, the last one in a ragged tile."""
    case = make_mla_case([9_000, 300], 32, lkv=LKV, rope=R, tpb=TPB, dtype=torch.bfloat16, seed=21, device="cuda")
    for t, gain in ((700, 8), (3_000, 16), (3_001, 16), (8_999, 32)):  # sequence 0's tokens, via its block table
        blk = int(case.block_table[0, t // TPB])
        case.kv_cache[blk, t % TPB] *= gain
    for num_splits in (1, None):
        cfg = replace(cuda_config(case.kv_cache.device), num_splits=num_splits)
        _check_bf16(*mla_decode_cuda(*case.args, config=cfg), case, f"cuda max jumps splits={num_splits}")


def test_mla_decode_cuda_strided_cache_and_refusals():
    """A cache that is a view with padded rows (row stride 584) is read in place; a call the kernel was not
    compiled for is refused by name under path='cuda' and takes Triton under auto."""
    case = make_mla_case([5_000, 129], 32, lkv=LKV, rope=R, tpb=TPB, dtype=torch.bfloat16, seed=5, device="cuda")
    padded = torch.full((*case.kv_cache.shape[:2], LKV + R + 8), float("nan"), dtype=torch.bfloat16, device="cuda")
    padded[..., :LKV + R] = case.kv_cache
    qn, qp, _, bt, sl, scale = case.args
    _check_bf16(*mla_decode(qn, qp, padded[..., :LKV + R], bt, sl, scale, path="cuda"), case, "cuda strided cache")
    half = make_mla_case([300], 32, lkv=LKV, rope=R, tpb=TPB, dtype=torch.float16, seed=6, device="cuda")
    with pytest.raises(ValueError, match="path='cuda': the CUDA kernel is compiled for bf16"):
        mla_decode(*half.args, path="cuda")
    with pytest.raises(ValueError, match="must be a compiled tile"):
        mla_decode_cuda(*case.args, config=MLAConfig(block_h=16, block_n=32, num_warps=4))
    _check_bf16(*mla_decode(*half.args), half, "auto fp16 (Triton)")


def test_mla_decode_without_a_cuda_toolchain_auto_takes_triton(monkeypatch):
    """A host where the extension cannot be built (no nvcc or ninja): path='cuda' is refused naming why, and
    auto at 32 heads (the CUDA kernel's range) runs the Triton kernel instead of failing."""
    md = importlib.import_module("kernels.mla_decode")  # the package's attribute of that name is the function

    monkeypatch.setattr(md, "_build", lambda: (None, "could not be built (RuntimeError: Ninja is required)"))
    case = make_mla_case([700, 33], 32, lkv=LKV, rope=R, tpb=TPB, dtype=torch.bfloat16, seed=7, device="cuda")
    with pytest.raises(ValueError, match=r"path='cuda': the CUDA kernel could not be built \(RuntimeError: Ninja"):
        mla_decode(*case.args, path="cuda")
    o, lse = mla_decode(*case.args)
    _check_bf16(o, lse, case, "auto without the extension")
    assert torch.equal(o, mla_decode_triton(*case.args)[0])  # the Triton kernel's output, bit for bit


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_helix_combine_uv_gpu(n, dtype):
    """The merge fused with W_UV at a Helix rank's V3 sizes (h = 128 / N heads, V 128, Lkv 512), B = 3."""
    heads = 128 // n
    o_parts, lse_parts = make_combine_case(n, 3, heads, lkv=LKV, dtype=dtype, seed=n, device="cuda", neg_inf="row")
    w_uv = make_w_uv(heads, 128, LKV, dtype, seed=n, device="cuda")
    o_v = helix_combine_uv(o_parts, lse_parts, w_uv)
    ref = combine_uv_oracle64(o_parts, lse_parts, w_uv)
    if dtype == torch.float32:
        assert_f32_parity(o_v, ref, f"combine_uv N={n}")
    else:
        base = torch.einsum("bhl,hvl->bhv", combine_lowp_baseline(o_parts, lse_parts)[0], w_uv)
        assert_bf16_policy(o_v, ref, base, f"combine_uv bf16 N={n}")
    assert torch.all(o_v[0, 0] == 0) and not torch.isnan(o_v).any()


@pytest.mark.parametrize("path,num_splits", [("cuda", 1), ("cuda", None), ("triton", 1), ("triton", None)])
def test_mla_decode_out_into_send_rows(path, num_splits):
    """out=: o and lse written into the rows Helix's all-to-all sends ([B, H, Lkv + 2] bf16, the lse's bytes in
    the last two elements), through one split (the split kernel stores) or the default (the merge stores)."""
    case = make_mla_case([20_000, 77, 0], 32, lkv=LKV, rope=R, tpb=TPB, dtype=torch.bfloat16, seed=11, device="cuda")
    rows = torch.full((3, 32, LKV + 2), float("nan"), dtype=torch.bfloat16, device="cuda")
    o, lse = rows[..., :LKV], rows.view(torch.float32)[..., LKV // 2]
    fn, base = ((mla_decode_cuda, cuda_config(case.kv_cache.device)) if path == "cuda"
                else (mla_decode_triton, MLAConfig(block_h=32)))
    fn(*case.args, config=replace(base, num_splits=num_splits), out=(o, lse))
    _check_bf16(o, lse, case, f"{path} out= splits={num_splits}")
