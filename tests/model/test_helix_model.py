"""Full-model parity: Helix greedy generation on N ranks equals the single-device reference token for token
in float32, with every step's logits inside the float32 policy; ownership rotates every 4 tokens."""

import json

import pytest
import torch

from helix.checkpoint import Checkpoint
from helix.config import HelixConfig
from helix.engine import Request
from helix.reference import ReferenceModel
from helix.runner import helix_generate
from helix.sampling import SamplingParams
from helix.spec import RunSpec
from tests.tolerance import assert_exact, assert_f32_parity

NEW_TOKENS = 64
PROMPTS = [list(range(40, 77)), [3, 1, 4, 1, 5], [9]]  # 37 tokens (not a block multiple), 5, and 1


def _reference(ckpt_dir, prompts, new_tokens):
    ref = ReferenceModel.from_checkpoint(ckpt_dir, dtype=torch.float64)
    return [ref.generate(p, new_tokens, return_logits=True) for p in prompts]


def _requests(prompts, new_tokens):
    return [Request(i, p, SamplingParams(max_new_tokens=new_tokens), keep_logits=True) for i, p in enumerate(prompts)]


def _compare(results, expected, label):
    for res, (tokens, logits) in zip(results, expected):
        assert res.error is None, res.error
        assert_exact(torch.tensor(res.token_ids), torch.tensor(tokens), f"{label} request {res.req_id}: greedy tokens")
        for step, (a, b) in enumerate(zip(res.logits, logits)):
            assert_f32_parity(a, b, f"{label} request {res.req_id} step {step}")


@pytest.fixture(scope="module")
def expected(tiny_checkpoint):
    return _reference(tiny_checkpoint, PROMPTS, NEW_TOKENS)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_helix_greedy_equals_reference(rank_pool, tiny_checkpoint, expected, n):
    spec = RunSpec(model=str(tiny_checkpoint),
                   generation=HelixConfig(context_parallel_size=n, tokens_per_block=4, max_tokens=128,
                                          max_batch_size=4))
    _compare(helix_generate(spec, _requests(PROMPTS, NEW_TOKENS), rank_pool), expected, f"N={n}")


def test_tensor_parallel_experts_equal_reference(rank_pool, tiny_checkpoint, expected):
    spec = RunSpec(model=str(tiny_checkpoint),
                   generation=HelixConfig(context_parallel_size=3, tokens_per_block=4, max_tokens=128,
                                          max_batch_size=4, moe_parallel="tp"))
    _compare(helix_generate(spec, _requests(PROMPTS[:2], NEW_TOKENS), rank_pool), expected[:2], "N=3 TP experts")


def test_checkpoint_written_by_transformers(rank_pool, tmp_path_factory, tiny_checkpoint):
    """A DeepseekV3ForCausalLM.save_pretrained checkpoint (transformers' own init and file layout) loads and
    decodes identically."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = {k: v for k, v in json.load(open(tiny_checkpoint / "config.json")).items() if k != "architectures"}
    cfg["q_lora_rank"] = 24  # also cover the compressed-query path
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**cfg))
    with torch.no_grad():  # transformers initialises the correction bias to 0; make routing depend on it
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    out = tmp_path_factory.mktemp("hf_saved")
    model.save_pretrained(out)
    Checkpoint(out).check_complete()
    expected = _reference(out, PROMPTS[:2], 32)
    spec = RunSpec(model=str(out),
                   generation=HelixConfig(context_parallel_size=2, tokens_per_block=4, max_tokens=128,
                                          max_batch_size=4))
    _compare(helix_generate(spec, _requests(PROMPTS[:2], 32), rank_pool), expected, "transformers checkpoint N=2")


@pytest.mark.parametrize("n, padded_tables", [(1, False), (3, False), (3, True)])
def test_tp_attention_baseline_equals_reference(rank_pool, tiny_checkpoint, expected, n, padded_tables):
    """The benchmark's baseline must compute the same model, or its timings mean nothing. Through the engine;
    ``padded_tables``: its CUDA-graph path (block tables at the fixed width, run eagerly on CPU), whose width
    must come from the baseline's cache (every token on every rank), not from the N ranks: 37 + 64 tokens
    need 26 blocks of 4, ceil(64 / 3) = 22 would be too narrow."""
    from tests.helix_harness import rank_generate_tp_attention

    results = rank_pool.run(rank_generate_tp_attention, str(tiny_checkpoint), n, 4, _requests(PROMPTS, NEW_TOKENS),
                            padded_tables, n=n)[0]
    _compare(results, expected, f"TP attention N={n}" + (", padded block tables" if padded_tables else ""))


def test_local_engine_reuses_batch_slots(rank_pool, tiny_checkpoint, expected):
    """More requests than max_batch_size: the later ones wait for a slot, take the blocks a finished request
    freed, and still decode exactly the reference's tokens."""
    prompts = PROMPTS + [[7, 8, 9, 10], list(range(100, 110))]
    want = expected + _reference(tiny_checkpoint, prompts[3:], NEW_TOKENS)
    spec = RunSpec(model=str(tiny_checkpoint),
                   generation=HelixConfig(context_parallel_size=2, tokens_per_block=4, max_tokens=128,
                                          max_batch_size=2))
    _compare(helix_generate(spec, _requests(prompts, NEW_TOKENS), rank_pool), want, "N=2, 5 requests in 2 slots")
