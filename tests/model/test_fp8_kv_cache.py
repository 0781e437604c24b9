"""The FP8 latent KV cache (``kv_cache_config.dtype: fp8``): rows stored as e4m3 with a per-row scale, within half an
e4m3 step of what was written; blocks handed over byte for byte; Helix on N = 2, 3 ranks and the disaggregated
deployment decode as one rank does with the same FP8 cache (every step's logits in the float32 policy, the same
greedy tokens), so context parallelism adds nothing to the quantization's own error. That error, against the
unquantized reference, is measured by ``helix eval --kv-dtype fp8`` (evals/README.md, golden/accuracy/)."""

from __future__ import annotations

import pytest
import torch

from helix.checkpoint import Checkpoint
from helix.comm import Comm
from helix.config import HelixConfig
from helix.engine import HelixEngine, Request
from helix.kv_cache import PagedKVCache
from helix.mapping import HelixMapping
from helix.model import HelixModel
from helix.runner import helix_generate
from helix.sampling import SamplingParams
from helix.spec import RunSpec
from tests.tolerance import assert_exact, assert_f32_parity

PROMPTS = [list(range(40, 77)), [3, 1, 4, 1, 5], [9]]
NEW_TOKENS = 16
TPB = 4


def fp8_cache(n_blocks=6, entry=10, tpb=TPB) -> PagedKVCache:
    return PagedKVCache(HelixMapping(0, 1, tpb), num_layers=2, entry_dim=entry, max_tokens_per_seq=n_blocks * tpb,
                        num_blocks=n_blocks, dtype=torch.float32, device="cpu", kv_dtype="fp8")


def test_rows_read_back_within_half_an_e4m3_step():
    cache = fp8_cache()
    entries = torch.randn(9, 10, dtype=torch.float64) * torch.logspace(-3, 3, 9, dtype=torch.float64)[:, None]
    slots = torch.tensor([4, 5, 6, 7, 8, 9, 10, 11, 20])
    cache.write(1, slots, entries.float())
    rows = cache.layers[1].view(-1, 10)[slots].double() * cache.scales[1].view(-1)[slots].double()[:, None]
    scale = entries.abs().amax(-1, keepdim=True) / 448  # each row's largest value is e4m3's 448 x its scale
    # an e4m3 step: 3 mantissa bits above 2^-6 (normal), 2^-9 below (subnormal), in units of the scale
    step = torch.maximum(entries.abs() / scale, torch.tensor(2.0 ** -6)).log2().floor().exp2() * 2.0 ** -3 * scale
    assert ((rows - entries).abs() <= 0.5 * step + scale * 448 * 1e-7).all()  # float32 input: 1e-7 relative
    assert cache.layers[1].dtype == torch.float8_e4m3fn and cache.layers[1].element_size() == 1


def test_blocks_travel_as_stored():
    src, dst = fp8_cache(), fp8_cache()
    src.write(0, torch.arange(24), torch.randn(24, 10))
    blocks = src.read_blocks(0, torch.tensor([2, 5, 1]))
    assert blocks.dtype == torch.uint8 and blocks.shape == (3, TPB, 10 + 4)  # e4m3 bytes, then the scale's 4 bytes
    dst.write_blocks(0, torch.tensor([1, 3, 4]), blocks.clone())
    for s, d in ((2, 1), (5, 3), (1, 4)):
        assert_exact(dst.layers[0][d].view(torch.uint8), src.layers[0][s].view(torch.uint8), f"rows of block {s}")
        assert_exact(dst.scales[0][d], src.scales[0][s], f"scales of block {s}")
    assert dst.empty_blocks(3, "cpu").shape == blocks.shape


def test_capacity_per_token():
    assert PagedKVCache.bytes_per_token(576, torch.bfloat16) == 1152
    assert PagedKVCache.bytes_per_token(576, torch.bfloat16, "fp8") == 580  # 1.99x the tokens in the same bytes


def _requests():
    return [Request(i, p, SamplingParams(max_new_tokens=NEW_TOKENS), keep_logits=True) for i, p in enumerate(PROMPTS)]


@pytest.fixture(scope="module")
def one_rank(tiny_checkpoint):
    """The FP8 cache on a single rank (N = 1, no collective does anything), the yardstick of the Helix runs."""
    model = HelixModel(Checkpoint(tiny_checkpoint), HelixMapping(0, 1, TPB), Comm(0, 1))
    return HelixEngine(model, max_tokens=128, max_batch_size=4, kv_dtype="fp8").run(_requests())


def _compare(results, expected, label):
    for res, want in zip(results, expected):
        assert res.error is None, res.error
        assert_exact(torch.tensor(res.token_ids), torch.tensor(want.token_ids), f"{label} request {res.req_id}: tokens")
        for step, (a, b) in enumerate(zip(res.logits or [], want.logits)):
            assert_f32_parity(a, b, f"{label} request {res.req_id} step {step}")


@pytest.mark.parametrize("n", [2, 3])
def test_helix_with_fp8_cache_decodes_as_one_rank(rank_pool, tiny_checkpoint, one_rank, n):
    spec = RunSpec(model=str(tiny_checkpoint),
                   generation=HelixConfig(context_parallel_size=n, tokens_per_block=TPB, max_tokens=128,
                                          max_batch_size=4, kv_dtype="fp8"))
    _compare(helix_generate(spec, _requests(), rank_pool), one_rank, f"FP8 KV, N={n}")


def test_disaggregated_fp8_hand_over_decodes_as_one_rank(tiny_checkpoint, one_rank):
    from helix.disagg import launch
    from tests.disagg.conftest import deployment

    dep = deployment(tiny_checkpoint, n=2, max_batch_size=4)
    dep["generation_servers"]["kv_cache_config"]["dtype"] = "fp8"
    with launch(dep) as cluster:
        assert cluster.dep.generation.kv_dtype == "fp8"
        _compare(cluster.run(_requests()), one_rank, "FP8 KV, context 1 + Helix 2")
