"""helix_combine on CPU (torch reference; Triton under the interpreter), and the Helix identity: the
combine of per-rank mla_decode partials equals attention over all tokens."""

from __future__ import annotations


import pytest
import torch

from kernels import (helix_combine, helix_combine_torch, helix_combine_triton, helix_combine_uv, helix_combine_uv_torch,
                     helix_combine_uv_triton, mla_decode_torch, mla_decode_triton)
from tests.kernels.cases import (assert_path_selection, combine_lowp_baseline, combine_oracle64, combine_uv_oracle64,
                                 make_combine_case, make_mla_case, make_w_uv, mla_oracle64)
from tests.tolerance import assert_bf16_policy, assert_f32_parity

pytest.importorskip("triton", reason="triton not installed: the interpreted kernel tests need it")

PATHS = [pytest.param(helix_combine_torch, id="torch"), pytest.param(helix_combine_triton, id="triton")]


def _check_empty_rows(o, lse, lse_parts):
    empty = torch.all(lse_parts == float("-inf"), dim=0)
    assert torch.all(lse[empty] == float("-inf")) and torch.all(o[empty] == 0), "all -inf row not o=0, lse=-inf"
    assert not torch.isnan(o).any() and not torch.isnan(lse).any(), "NaN leaked from an empty part"


@pytest.mark.parametrize("fn", PATHS)
@pytest.mark.parametrize("n", range(1, 9))
def test_combine_f32(fn, n):
    o_parts, lse_parts = make_combine_case(n, 2, 3, seed=n, neg_inf="row")
    o, lse = fn(o_parts, lse_parts)
    o_ref, lse_ref = combine_oracle64(o_parts, lse_parts)
    assert o.dtype == torch.float32 and lse.dtype == torch.float32 and o.shape == (2, 3, 64)
    assert_f32_parity(o, o_ref, f"combine N={n} o")
    assert_f32_parity(lse, lse_ref, f"combine N={n} lse")
    _check_empty_rows(o, lse, lse_parts)


@pytest.mark.parametrize("fn", PATHS)
@pytest.mark.parametrize("n", [2, 5, 8])
def test_combine_bf16(fn, n):
    o_parts, lse_parts = make_combine_case(n, 2, 5, lkv=96, dtype=torch.bfloat16, seed=10 + n)
    o, lse = fn(o_parts, lse_parts)
    assert o.dtype == torch.bfloat16 and lse.dtype == torch.float32
    o_ref, lse_ref = combine_oracle64(o_parts, lse_parts)
    o_base, lse_base = combine_lowp_baseline(o_parts, lse_parts)
    assert_bf16_policy(o, o_ref, o_base, f"combine bf16 N={n} o")
    assert_f32_parity(lse, lse_ref, f"combine bf16 N={n} lse")


@pytest.mark.parametrize("fn", PATHS)
def test_combine_noncontiguous_and_all_empty(fn):
    # as an all-to-all might leave it: [B, N, h, Lkv] memory viewed as [N, B, h, Lkv]
    o_parts, lse_parts = make_combine_case(4, 3, 2, seed=4)
    o_nc, lse_nc = o_parts.transpose(0, 1).contiguous().transpose(0, 1), lse_parts.transpose(0, 1).contiguous().transpose(0, 1)
    assert not o_nc.is_contiguous()
    o, lse = fn(o_nc, lse_nc)
    o_ref, lse_ref = combine_oracle64(o_parts, lse_parts)
    assert_f32_parity(o, o_ref, "combine non-contiguous o")
    assert_f32_parity(lse, lse_ref, "combine non-contiguous lse")

    o_parts, lse_parts = make_combine_case(3, 2, 2, seed=5)
    lse_parts.fill_(float("-inf"))
    o_parts.fill_(float("nan"))
    o, lse = fn(o_parts, lse_parts)
    assert torch.all(o == 0) and torch.all(lse == float("-inf"))


def test_combine_validation_and_path(monkeypatch):
    o_parts, lse_parts = make_combine_case(2, 1, 2)
    with pytest.raises(ValueError):
        helix_combine(o_parts, lse_parts[:1])
    with pytest.raises(TypeError):
        helix_combine(o_parts, lse_parts.half())
    with pytest.raises(ValueError):
        helix_combine(o_parts[:0], lse_parts[:0])
    assert_path_selection(monkeypatch, "helix_combine", lambda **kw: helix_combine(o_parts, lse_parts, **kw))


UV_PATHS = [pytest.param(helix_combine_uv_torch, id="torch"), pytest.param(helix_combine_uv_triton, id="triton")]


@pytest.mark.parametrize("fn", UV_PATHS)
@pytest.mark.parametrize("n,bsz,heads,lkv,v", [(1, 1, 2, 64, 16), (2, 3, 2, 40, 24), (3, 2, 5, 96, 7), (8, 1, 3, 64, 40)])
def test_combine_uv_f32(fn, n, bsz, heads, lkv, v):
    """Awkward sizes: Lkv not a power of two, V over one BLOCK_V and not a multiple of it, every part of row
    (0, 0) empty (its o_v must be 0), NaN in the o of every empty part."""
    o_parts, lse_parts = make_combine_case(n, bsz, heads, lkv=lkv, seed=50 + n, neg_inf="row")
    w_uv = make_w_uv(heads, v, lkv, seed=n)
    o_v = fn(o_parts, lse_parts, w_uv)
    assert o_v.dtype == torch.float32 and o_v.shape == (bsz, heads, v)
    assert not torch.isnan(o_v).any(), "NaN leaked from an empty part"
    assert torch.all(o_v[0, 0] == 0), "a row with every part empty is not o_v = 0"
    assert_f32_parity(o_v, combine_uv_oracle64(o_parts, lse_parts, w_uv), f"combine_uv N={n} B={bsz} h={heads}")


@pytest.mark.parametrize("fn", UV_PATHS)
@pytest.mark.parametrize("n", [2, 5])
def test_combine_uv_bf16(fn, n):
    """bf16 against the unfused bf16 torch of before: the merge rounded to bf16, then W_UV in bf16."""
    o_parts, lse_parts = make_combine_case(n, 2, 3, lkv=96, dtype=torch.bfloat16, seed=60 + n)
    w_uv = make_w_uv(3, 24, 96, torch.bfloat16, seed=n)
    o_v = fn(o_parts, lse_parts, w_uv)
    assert o_v.dtype == torch.bfloat16
    base = torch.einsum("bhl,hvl->bhv", combine_lowp_baseline(o_parts, lse_parts)[0], w_uv)
    assert_bf16_policy(o_v, combine_uv_oracle64(o_parts, lse_parts, w_uv), base, f"combine_uv bf16 N={n}")


@pytest.mark.parametrize("fn", UV_PATHS)
def test_combine_uv_reads_the_all_to_all_buffer_in_place(fn):
    """As Helix's decode step passes them: o and lse as strided views of one receive buffer [N, B, h, Lkv + 1]
    whose last element of each row holds the lse, W_UV a slice of a larger weight."""
    o_parts, lse_parts = make_combine_case(3, 2, 4, lkv=64, seed=7)
    recv = torch.cat([o_parts, lse_parts[..., None]], dim=-1)
    w_uv = make_w_uv(6, 16, 64, seed=8)[1:5]
    o_v = fn(recv[..., :64], recv[..., 64], w_uv)
    assert_f32_parity(o_v, combine_uv_oracle64(o_parts, lse_parts, w_uv), "combine_uv strided views")


def test_combine_uv_validation_and_path(monkeypatch):
    o_parts, lse_parts = make_combine_case(2, 1, 2, lkv=32)
    w_uv = make_w_uv(2, 8, 32)
    for bad in [w_uv[:1], w_uv[..., :16], w_uv[0]]:
        with pytest.raises(ValueError, match="w_uv must be"):
            helix_combine_uv(o_parts, lse_parts, bad)
    with pytest.raises(ValueError, match="must match o_parts"):
        helix_combine_uv(o_parts, lse_parts, w_uv.double())
    assert_path_selection(monkeypatch, "helix_combine", lambda **kw: helix_combine_uv(o_parts, lse_parts, w_uv, **kw),
                          name="helix_combine_uv")


@pytest.mark.parametrize("decode,combine", [
    pytest.param(mla_decode_torch, helix_combine_torch, id="torch"),
    pytest.param(mla_decode_triton, helix_combine_triton, id="triton"),
])
@pytest.mark.parametrize("n_ranks", [2, 3])
def test_helix_identity(decode, combine, n_ranks):
    """Shard each sequence's blocks round-robin over N ranks (block b on rank b mod N, docs/design.md §3.4),
    decode each shard, combine: equals decoding the whole sequence. N=3 leaves ranks with 0 tokens."""
    case = make_mla_case([0, 3, 29, 40], 5, tpb=8, seed=31 + n_ranks)
    tpb = case.kv_cache.shape[1]
    parts = []
    for r in range(n_ranks):
        tables, lens = [], []
        for b in range(case.block_table.shape[0]):
            n = int(case.seq_lens[b])
            nb = -(-n // tpb)
            mine = [j for j in range(nb) if j % n_ranks == r]
            local = sum(min(tpb, n - j * tpb) for j in mine)
            tables.append([int(case.block_table[b, j]) for j in mine])
            lens.append(local)
        width = max(1, max(len(t) for t in tables))
        table = torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32)
        parts.append(decode(case.q_nope_abs, case.q_pe, case.kv_cache, table,
                            torch.tensor(lens, dtype=torch.int32), case.scale))
    o, lse = combine(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]))
    o_ref, lse_ref = mla_oracle64(case)
    assert_f32_parity(o, o_ref, f"helix N={n_ranks} o")
    assert_f32_parity(lse, lse_ref, f"helix N={n_ranks} lse")
