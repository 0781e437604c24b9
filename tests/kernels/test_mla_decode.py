"""mla_decode on CPU: the torch reference always, the Triton kernel under Triton's interpreter.

Float32: parity with a float64 token-by-token oracle (docs/design.md §6.2). bf16: error <= 2x that of plain bf16
torch + floor. Every case carries NaN in each cache slot no sequence uses and garbage block ids past each
sequence's last block.
"""

from __future__ import annotations


import pytest
import torch

from kernels import mla_decode, mla_decode_torch, mla_decode_triton
from kernels.mla_decode import MLAConfig
from tests.kernels.cases import assert_path_selection, fp8_mla_case, make_mla_case, mla_bf16_baseline, mla_oracle64
from tests.tolerance import assert_bf16_policy, assert_f32_parity

triton = pytest.importorskip("triton", reason="triton not installed: the interpreted kernel tests need it")

# (lens, heads, tokens_per_block): lengths 0 and 1, ragged last blocks, batch > 1, odd head counts
HOSTILE = [
    pytest.param([0], 4, 8, id="empty"),
    pytest.param([1], 3, 8, id="one-token-H3"),
    pytest.param([13], 5, 4, id="ragged-H5"),
    pytest.param([0, 1, 37, 8], 5, 8, id="batch-mixed-H5"),
    pytest.param([40, 17], 16, 16, id="H16-two-blocks"),
    pytest.param([29, 0, 64], 17, 8, id="H17-two-head-tiles"),
]


def _check_f32(o, lse, case, what):
    o_ref, lse_ref = mla_oracle64(case)
    assert not torch.isnan(o).any(), f"{what}: NaN in o"
    assert_f32_parity(o, o_ref, f"{what} o")
    assert_f32_parity(lse, lse_ref, f"{what} lse")
    empty = case.seq_lens == 0
    assert torch.all(lse[empty] == float("-inf")) and torch.all(o[empty] == 0), f"{what}: empty sequence not o=0, lse=-inf"


def _check_bf16(o, lse, case, what):
    o_ref, lse_ref = mla_oracle64(case)
    o_base, lse_base = mla_bf16_baseline(case)
    assert o.dtype == case.kv_cache.dtype and lse.dtype == torch.float32
    assert not torch.isnan(o).any(), f"{what}: NaN in o"
    assert_bf16_policy(o, o_ref, o_base, f"{what} o")
    assert_bf16_policy(lse, lse_ref, lse_base, f"{what} lse")


# ---------------------------------------------------------------------------------- torch reference
@pytest.mark.parametrize("lens,heads,tpb", HOSTILE)
def test_torch_reference_f32(lens, heads, tpb):
    case = make_mla_case(lens, heads, tpb=tpb, seed=len(lens) * 7 + heads)
    o, lse = mla_decode_torch(*case.args)
    assert o.shape == case.q_nope_abs.shape and lse.shape == case.q_nope_abs.shape[:2]
    _check_f32(o, lse, case, "torch f32")


@pytest.mark.parametrize("lens,heads,tpb", HOSTILE[2:4])
def test_torch_reference_bf16(lens, heads, tpb):
    case = make_mla_case(lens, heads, tpb=tpb, dtype=torch.bfloat16, seed=3)
    _check_bf16(*mla_decode_torch(*case.args), case, "torch bf16")


def test_torch_reference_float64_is_the_oracle():
    case = make_mla_case([0, 21, 5], 3, tpb=4, dtype=torch.float64, seed=5)
    o, lse = mla_decode_torch(*case.args)
    o_ref, lse_ref = mla_oracle64(case)
    assert_f32_parity(o.double(), o_ref, "torch f64 o", rel=1e-10)
    assert_f32_parity(lse.double(), lse_ref, "torch f64 lse", rel=1e-6)  # lse is returned in float32


# ---------------------------------------------------------------------------- Triton, interpreted
@pytest.mark.parametrize("lens,heads,tpb", HOSTILE)
def test_triton_interpreted_f32(lens, heads, tpb):
    case = make_mla_case(lens, heads, tpb=tpb, seed=len(lens) * 11 + heads)
    assert torch.isnan(case.kv_cache).any(), "the case must poison unused cache slots"
    _check_f32(*mla_decode_triton(*case.args), case, "triton f32")


@pytest.mark.parametrize("cfg", [
    pytest.param(MLAConfig(block_h=16, block_n=16, num_splits=1), id="one-split-direct"),
    pytest.param(MLAConfig(block_h=16, block_n=16, num_splits=3), id="3-splits"),
    pytest.param(MLAConfig(block_h=16, block_n=16, num_splits=8), id="more-splits-than-tiles"),
    pytest.param(MLAConfig(block_h=32, block_n=32, num_splits=2, tma=False), id="per-token-pages"),
])
def test_triton_interpreted_split_and_tile_variants(cfg):
    case = make_mla_case([0, 1, 45, 16], 5, tpb=8, seed=21)
    _check_f32(*mla_decode_triton(*case.args, config=cfg), case, f"triton {cfg}")


@pytest.mark.parametrize("tpb", [8, 16])
def test_triton_interpreted_bf16(tpb):
    case = make_mla_case([0, 1, 37, 8], 5, tpb=tpb, dtype=torch.bfloat16, seed=9)
    cfg = MLAConfig(block_h=16, block_n=16, num_splits=2)
    _check_bf16(*mla_decode_triton(*case.args, config=cfg), case, f"triton bf16 T={tpb}")


def test_triton_interpreted_growing_scores():
    """Scores that rise along the sequence move the running max on every tile (rescaled accumulator)."""
    case = make_mla_case([90, 45], 3, tpb=8, seed=23, poison=True)
    ramp = torch.linspace(0, 30, case.kv_cache.shape[0] * case.kv_cache.shape[1]).view(case.kv_cache.shape[:2])
    case.kv_cache[..., 64:] += ramp[..., None] * case.q_pe[0, 0].sign() * 0.3
    _check_f32(*mla_decode_triton(*case.args, config=MLAConfig(block_h=16, block_n=16, num_splits=1)), case,
               "triton rising scores")


@pytest.mark.parametrize("tma", [True, False])
def test_triton_interpreted_whole_tiles_by_descriptor(tma):
    """T a multiple of BLOCK_N: whole tiles come through the TMA descriptors (one page lookup each), the
    ragged last tile of each split through the masked per-token loads; NaN past each end stays unread."""
    case = make_mla_case([0, 1, 16, 45, 80], 5, tpb=32, seed=27)
    stats: dict = {}
    cfg = MLAConfig(block_h=16, block_n=16, num_splits=2, tma=tma)
    _check_f32(*mla_decode_triton(*case.args, config=cfg, stats=stats), case, f"triton tma={tma}")
    assert stats["tma"] is tma


@pytest.mark.parametrize("tpb", [8, 16])
def test_triton_interpreted_non_pow2_dims(tpb):
    """Lkv = 48, R = 8: with T = 16 the descriptor's box (64 wide) runs over k_pe and past the row's end
    (zero fill); those columns meet zero query columns and are never stored."""
    case = make_mla_case([11, 30], 3, lkv=48, rope=8, tpb=tpb, seed=13)
    stats: dict = {}
    _check_f32(*mla_decode_triton(*case.args, config=MLAConfig(block_n=16, num_splits=2), stats=stats), case,
               f"triton Lkv=48 R=8 T={tpb}")
    assert stats["tma"] is (tpb == 16)


@pytest.mark.parametrize("layout", ["slice", "transposed"])
@pytest.mark.parametrize("path", ["torch", "triton"])
def test_non_contiguous_q(layout, path):
    case = make_mla_case([9, 26], 5, tpb=8, seed=17, q_layout=layout)
    assert not case.q_nope_abs.is_contiguous() and not case.q_pe.is_contiguous()
    fn = mla_decode_torch if path == "torch" else mla_decode_triton
    _check_f32(*fn(*case.args), case, f"{path} q {layout}")


@pytest.mark.parametrize("path", ["torch", "triton"])
@pytest.mark.parametrize("splits", [1, 3])
def test_out_writes_strided_views_in_place(path, splits):
    """``out``: o and lse written where the caller says (Helix: the rows its all-to-all sends, lse's float32 bytes
    after o's), through one split (the split kernel stores the result) or several (the merge does); nothing
    else in the buffer is touched."""
    case = make_mla_case([0, 1, 45, 16], 5, tpb=8, seed=41)
    bsz, heads, lkv = case.q_nope_abs.shape
    buf = torch.full((bsz, heads, lkv + 3), float("nan"))
    lse = torch.full((heads, bsz), float("nan")).t()  # [B, H], column-major
    out = (buf[..., 1:lkv + 1], lse)
    kw = {} if path == "torch" else {"config": MLAConfig(block_h=16, block_n=16, num_splits=splits)}
    fn = mla_decode_torch if path == "torch" else mla_decode_triton
    got = fn(*case.args, out=out, **kw)
    assert got[0] is out[0] and got[1] is out[1]
    _check_f32(*out, case, f"{path} out= splits={splits}")
    assert torch.isnan(buf[..., 0]).all() and torch.isnan(buf[..., lkv + 1:]).all(), "out= wrote outside o"


def test_out_is_validated():
    case = make_mla_case([3], 2, tpb=8, seed=2)
    o = torch.empty(case.q_nope_abs.shape)
    lse = torch.empty(case.q_nope_abs.shape[:2])
    for bad in [(o[..., :-1], lse), (o.double(), lse), (o, lse.double()), (o.transpose(1, 2).contiguous().transpose(1, 2), lse)]:
        with pytest.raises(ValueError, match="out must be"):
            mla_decode(*case.args, out=bad)


def test_all_empty_and_zero_batch():
    case = make_mla_case([0, 0], 3, seed=1)
    for fn in (mla_decode_torch, mla_decode_triton):
        o, lse = fn(*case.args)
        assert torch.all(o == 0) and torch.all(lse == float("-inf")), fn.__name__
    z = make_mla_case([], 3, seed=1)
    for fn in (mla_decode_torch, mla_decode_triton):
        o, lse = fn(*z.args)
        assert o.shape == (0, 3, 64) and lse.shape == (0, 3)


# ------------------------------------------------------------------------------------ FP8 cache
@pytest.mark.parametrize("path", ["torch", "triton"])
@pytest.mark.parametrize("lens,heads,tpb", HOSTILE[2:5])
def test_fp8_cache_reads_each_row_times_its_scale(path, lens, heads, tpb):
    """An e4m3 cache with per-row scales: float32 parity with the oracle on the dequantized rows (the product of an
    e4m3 value and a float32 scale is one rounding away from float64's)."""
    fp8, kv_scale, dequantized = fp8_mla_case(make_mla_case(lens, heads, tpb=tpb, seed=31 + heads))
    fn = mla_decode_torch if path == "torch" else mla_decode_triton
    _check_f32(*fn(*fp8.args, kv_scale), dequantized, f"{path} fp8 cache, f32 queries")


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_fp8_cache_with_bf16_queries(path):
    fp8, kv_scale, dequantized = fp8_mla_case(make_mla_case([0, 1, 37, 8], 5, tpb=8, dtype=torch.bfloat16, seed=9))
    o, lse = (mla_decode_torch if path == "torch" else mla_decode_triton)(*fp8.args, kv_scale)
    base = make_mla_case([0, 1, 37, 8], 5, tpb=8, dtype=torch.bfloat16, seed=9)
    base.kv_cache = dequantized.kv_cache.to(torch.bfloat16)  # bf16 torch on the same (exactly bf16) rows
    o_base, lse_base = mla_bf16_baseline(base)
    o_ref, lse_ref = mla_oracle64(dequantized)
    assert o.dtype == torch.bfloat16
    assert_bf16_policy(o, o_ref, o_base, f"{path} fp8 cache bf16 o")
    assert_bf16_policy(lse, lse_ref, lse_base, f"{path} fp8 cache bf16 lse")


def test_fp8_cache_across_splits():
    """Whole tiles over two splits, the block size a multiple of the tile: the shape where a bf16 cache on Hopper
    takes the TMA descriptors; an FP8 cache's rows, scaled per token, take the per-token loads."""
    fp8, kv_scale, dequantized = fp8_mla_case(make_mla_case([0, 1, 45, 64], 5, tpb=32, seed=21))
    cfg = MLAConfig(block_h=32, block_n=32, num_splits=2, tma=True)
    _check_f32(*mla_decode_triton(*fp8.args, kv_scale, config=cfg), dequantized, "triton fp8 across splits")


# ------------------------------------------------------------------------------ path and validation
def test_path_selection(monkeypatch):
    case = make_mla_case([5], 2, seed=2)
    assert_path_selection(monkeypatch, "mla_decode", lambda **kw: mla_decode(*case.args, **kw))


@pytest.mark.parametrize("mutate,err", [
    (lambda a: (a[0][:, :, :-1],) + a[1:], ValueError),                          # Lkv + R mismatch
    (lambda a: (a[0], a[1][:1]) + a[2:], ValueError),                            # q_pe batch
    (lambda a: a[:3] + (a[3].long()[:, None],) + a[4:], ValueError),             # block_table rank
    (lambda a: a[:3] + (a[3].float(),) + a[4:], TypeError),                      # block_table dtype
    (lambda a: a[:4] + (a[4][:1],) + a[5:], ValueError),                         # seq_lens shape
    (lambda a: (a[0].double(),) + a[1:], TypeError),                             # mixed dtypes
])
def test_validation(mutate, err):
    case = make_mla_case([5, 9], 2, seed=2)
    for fn in (mla_decode_torch, mla_decode_triton):
        with pytest.raises(err):
            fn(*mutate(case.args))


def test_fp8_cache_and_kv_scale_come_together():
    case = make_mla_case([5, 9], 2, seed=2)
    fp8, kv_scale, _ = fp8_mla_case(case)
    for fn in (mla_decode_torch, mla_decode_triton):
        with pytest.raises(TypeError, match="only it comes with its per-row kv_scale"):
            fn(*fp8.args)
        with pytest.raises(TypeError, match="only it comes with its per-row kv_scale"):
            fn(*case.args, kv_scale)
        with pytest.raises(ValueError, match="kv_scale must be float32"):
            fn(*fp8.args, kv_scale[:, :1])


def test_cuda_path_refuses_what_it_was_not_compiled_for():
    """mla_decode_cuda (kernels/mla_decode.cu; its GPU tests are in test_kernels_gpu.py) names why it cannot take
    a call: CPU tensors here; the other reasons (dtype, Lkv / R, table dtype, alignment) are checked on CUDA."""
    from kernels.mla_decode import cuda_unsupported, mla_decode_cuda

    case = make_mla_case([5, 0], 4, dtype=torch.bfloat16)
    assert cuda_unsupported(case.q_nope_abs, case.kv_cache, case.block_table, case.seq_lens, None) == \
        "needs CUDA tensors, got cpu"
    with pytest.raises(ValueError, match="path='cuda': the CUDA kernel needs CUDA tensors"):
        mla_decode_cuda(*case.args)
