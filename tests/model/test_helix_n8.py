"""Helix at N = 8 on CPU (gloo): the tiny preset widened to 16 heads and 16 experts so that 8 divides them.
Module parity and full-model greedy parity with the reference, float32 (issue: Helix at 8 GPUs)."""

import pytest
import torch

from helix.config import HelixConfig
from helix.engine import Request
from helix.reference import ReferenceModel
from helix.runner import helix_generate
from helix.sampling import SamplingParams
from helix.spec import RunSpec
from helix.workers import RankPool
from tests.helix_harness import reference_mla, run_mla_module
from tests.tolerance import assert_exact, assert_f32_parity

N = 8
WIDE = {"num_attention_heads": 16, "n_routed_experts": 16}


@pytest.fixture(scope="module")
def pool8():
    with RankPool(N) as pool:
        yield pool


def test_mla_module_n8(pool8, checkpoint_factory):
    ckpt = checkpoint_factory(**WIDE)
    g = torch.Generator().manual_seed(8)
    contexts = [torch.randn(L, 96, generator=g, dtype=torch.float64) for L in (45, 9, 1)]  # 9 < 8 blocks of 4
    decode_x = torch.randn(6, 3, 96, generator=g, dtype=torch.float64)
    _, ref = reference_mla(ckpt, torch.float64, contexts, decode_x)
    _, out = pool8.run(run_mla_module, str(ckpt), N, 4, "float32", contexts, decode_x)[0]
    for step in range(decode_x.shape[0]):
        assert_f32_parity(out[step], ref[step], f"N=8 decode step {step}")


def test_full_model_n8(pool8, checkpoint_factory):
    ckpt = checkpoint_factory(**WIDE)
    ref = ReferenceModel.from_checkpoint(ckpt, dtype=torch.float64)
    prompts = [list(range(40, 77)), [3, 1, 4]]
    expected = [ref.generate(p, 32, return_logits=True) for p in prompts]
    reqs = [Request(i, p, SamplingParams(max_new_tokens=32), keep_logits=True) for i, p in enumerate(prompts)]
    results = helix_generate(RunSpec(model=str(ckpt),
                   generation=HelixConfig(context_parallel_size=N, tokens_per_block=2, max_tokens=96,
                                          max_batch_size=2)), reqs, pool8)
    for res, (tokens, logits) in zip(results, expected):
        assert_exact(torch.tensor(res.token_ids), torch.tensor(tokens), f"N=8 request {res.req_id}")
        for step, (a, b) in enumerate(zip(res.logits, logits)):
            assert_f32_parity(a, b, f"N=8 request {res.req_id} step {step}")
