"""The parity checks must be able to fail: known Helix bugs, planted by monkeypatching inside the ranks,
each make the MLA-module parity check fail (a mismatch, or a crash the driver reports), and the full-model
greedy check fails on them too."""

import pytest
import torch

from helix.config import HelixConfig
from helix.engine import Request
from helix.sampling import SamplingParams
from helix.spec import RunSpec
from helix.workers import RankPool, WorkerError
from tests.helix_harness import FAULTS, rank_generate_with_fault, reference_mla, run_mla_module
from tests.tolerance import assert_f32_parity

N, TPB = 3, 4


def _module_parity(pool, ckpt, fault):
    g = torch.Generator().manual_seed(0)
    contexts = [torch.randn(n, 96, generator=g, dtype=torch.float64) for n in (37, 5)]
    decode_x = torch.randn(6, 2, 96, generator=g, dtype=torch.float64)
    _, ref = reference_mla(ckpt, torch.float64, contexts, decode_x)
    _, out = pool.run(run_mla_module, str(ckpt), N, TPB, "float32", contexts, decode_x, fault, n=N)[0]
    for step in range(decode_x.shape[0]):
        assert_f32_parity(out[step], ref[step], f"fault={fault} decode step {step}")


def test_clean_run_passes(rank_pool, tiny_checkpoint):
    _module_parity(rank_pool, tiny_checkpoint, None)


@pytest.mark.parametrize("fault", FAULTS)
def test_planted_bug_fails_module_parity(tiny_checkpoint, fault):
    with RankPool(N) as pool:  # its own ranks: a fault may crash them
        with pytest.raises((AssertionError, WorkerError)) as info:
            _module_parity(pool, tiny_checkpoint, fault)
    print(f"{fault}: caught by {type(info.value).__name__}: {str(info.value).splitlines()[0]}")


@pytest.mark.parametrize("fault", ["uniform_combine", "drop_shard", "local_rope"])
def test_planted_bug_changes_greedy_tokens(rank_pool, tiny_checkpoint, fault):
    """The full-model check: the same faults change the generated tokens, not just the last digits."""
    spec = RunSpec(model=str(tiny_checkpoint),
                   generation=HelixConfig(context_parallel_size=N, tokens_per_block=TPB, max_tokens=64,
                                          max_batch_size=2))
    reqs = [Request(0, list(range(40, 77)), SamplingParams(max_new_tokens=16))]
    clean = rank_pool.run(rank_generate_with_fault, None, spec, reqs, n=N)[0][0].token_ids
    faulty = rank_pool.run(rank_generate_with_fault, fault, spec, reqs, n=N)[0][0].token_ids
    assert faulty != clean, f"fault {fault} left the greedy tokens unchanged"
