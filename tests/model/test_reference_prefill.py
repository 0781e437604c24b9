"""The reference's attention and prefill in bounded memory, against the whole-matrix definition.

``attend_plain`` takes queries in chunks whose scores fit ``SCORE_BYTES``; ``attend_sdpa`` goes through torch's
fused kernel. Both are checked against softmax(q k^T * scale, causal) v over the whole [H, T, S] score matrix in
float64, on awkward sizes: T = 1 (also decode after a past), T smaller than a chunk, T not a multiple of it,
new tokens after a past (T < S), v narrower and wider than q / k. Then the whole model: a prefill cut into
attention and FFN chunks, with either attention, gives the logits of one unchunked float64 forward.
"""

from __future__ import annotations

import pytest
import torch

import helix.reference as reference
from helix.config import ConfigError
from helix.reference import ReferenceModel, attend_plain, attend_sdpa
from tests.tolerance import assert_bf16_policy, assert_f32_parity

H, SCALE, ROWS = 5, 0.3, 8  # ROWS: query rows per attend_plain chunk, set through SCORE_BYTES
F64_REL = 1e-12  # float64 against float64: only the summation order differs
SIZES = [(1, 1), (5, 5), (37, 37), (1, 37), (20, 50)]  # (T new tokens, S keys)


def qkv(T: int, S: int, qk: int, vd: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(H, n, d, generator=g, dtype=torch.float64) for n, d in ((T, qk), (S, qk), (S, vd)))


def definition(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The T queries are the last T of S positions; query i sees keys j <= S - T + i."""
    T, S = q.shape[1], k.shape[1]
    causal = torch.arange(S)[None, :] <= torch.arange(S - T, S)[:, None]
    return (q @ k.transpose(1, 2) * SCALE).masked_fill(~causal, float("-inf")).softmax(-1) @ v


@pytest.fixture
def rows_per_chunk(monkeypatch):
    """Makes attend_plain take ROWS query rows per chunk for S keys in float64."""
    return lambda S: monkeypatch.setattr(reference, "SCORE_BYTES", ROWS * H * S * 8)


@pytest.mark.parametrize("T,S", SIZES)
def test_plain_attention_in_query_chunks_is_the_whole_softmax(rows_per_chunk, T, S):
    rows_per_chunk(S)
    q, k, v = qkv(T, S, 24, 16)
    assert_f32_parity(attend_plain(q, k, v, SCALE), definition(q, k, v), f"T={T} S={S} in {ROWS}-row chunks",
                      rel=F64_REL)


@pytest.mark.parametrize("qk,vd", [(24, 16), (16, 24)])
@pytest.mark.parametrize("T,S", SIZES)
def test_sdpa_attention_matches_the_definition_float64_and_float32(T, S, qk, vd):
    q, k, v = qkv(T, S, qk, vd)
    want = definition(q, k, v)
    assert_f32_parity(attend_sdpa(q, k, v, SCALE), want, f"sdpa float64 T={T} S={S} qk={qk} v={vd}", rel=F64_REL)
    got32 = attend_sdpa(q.float(), k.float(), v.float(), SCALE)
    assert got32.dtype == torch.float32
    assert_f32_parity(got32, want, f"sdpa float32 T={T} S={S} qk={qk} v={vd}")


@pytest.mark.parametrize("T,S", [(37, 37), (20, 50)])
def test_sdpa_attention_bf16_within_policy_of_plain_bf16(T, S):
    q, k, v = qkv(T, S, 24, 16, seed=1)
    bf = [t.bfloat16() for t in (q, k, v)]
    want = definition(*(t.double() for t in bf))  # the same bf16 inputs, exactly
    assert_bf16_policy(attend_sdpa(*bf, SCALE).double(), want, attend_plain(*bf, SCALE).double(),
                       f"sdpa bf16 T={T} S={S}")


@pytest.mark.parametrize("attention", ["plain", "sdpa"])
def test_prefill_in_chunks_then_decode_gives_the_whole_forward(tiny_checkpoint, monkeypatch, attention):
    """A 45-token prompt in 8-row attention chunks and 7-token FFN chunks, then decode steps, against one
    unchunked float64 forward of the whole sequence; ``logits_from`` returns that forward's last rows."""
    whole = ReferenceModel.from_checkpoint(tiny_checkpoint, dtype=torch.float64)
    ids = torch.randint(0, whole.cfg.vocab_size, (52,), generator=torch.Generator().manual_seed(2))
    want = whole.forward(ids[None])[0]
    monkeypatch.setattr(reference, "SCORE_BYTES", ROWS * whole.cfg.num_attention_heads * 45 * 8)
    monkeypatch.setattr(reference, "FFN_CHUNK", 7)
    model = ReferenceModel.from_checkpoint(tiny_checkpoint, dtype=torch.float64, attention=attention)
    logits, cache = model.prefill(ids[:45].tolist(), logits_from=40)
    steps = [model.decode(int(t), cache) for t in ids[45:]]
    assert logits.shape == (5, model.cfg.vocab_size) and cache.length == len(ids)
    assert_f32_parity(torch.cat([logits, torch.stack(steps)]), want[40:], f"{attention}: chunked prefill + decode",
                      rel=1e-10)


def test_attention_is_checked_at_construction(tiny_checkpoint):
    with pytest.raises(ConfigError, match="attention='flash'.*plain.*sdpa"):
        ReferenceModel.from_checkpoint(tiny_checkpoint, attention="flash")
