"""Disaggregated serving equals the single-device reference: context server (1 rank) + Helix generation server
(N = 2, 3), greedy tokens exact and every step's logits / log-probs inside the float32 policy.

Prompts: 60 and 37 tokens (15 and 9+ blocks of 4, the last partial), 3 tokens (less than one block), 1 token
(nothing to prefill or hand over). With max_batch_size 2 the later requests join while others decode.
"""

import pytest
import torch

from helix.disagg import RequestError
from helix.engine import Request
from helix.sampling import SamplingParams
from tests.tolerance import assert_exact, assert_f32_parity

PROMPTS = [list(range(100, 160)), [3, 1, 4], [9], list(range(40, 77))]
NEW_TOKENS = [24, 6, 12, 10]
SCORE = [(list(range(40, 77)), [5, 80, 81, 200, 7, 7, 9, 1]), ([5], [6, 7, 8]), ([3, 1, 4, 1, 5], [9])]


def test_generation_equals_reference_with_requests_joining_mid_decode(cluster, reference):
    report = cluster.serve([Request(i, p, SamplingParams(max_new_tokens=n), keep_logits=True)
                            for i, (p, n) in enumerate(zip(PROMPTS, NEW_TOKENS))])
    for res, prompt, n in zip(report.results, PROMPTS, NEW_TOKENS):
        tokens, logits = reference.generate(prompt, n, return_logits=True)
        what = f"request {res.req_id} ({len(prompt)}-token prompt)"
        assert res.error is None, res.error
        assert_exact(torch.tensor(res.token_ids), torch.tensor(tokens), f"{what}: greedy tokens")
        for step, (a, b) in enumerate(zip(res.logits, logits)):
            assert_f32_parity(a, b, f"{what} step {step}")
    # Only two fit the batch: requests 2 and 3 are handed over while request 0 (steps 0..23) still decodes.
    joined = report.joined_step
    assert joined[0] == 0
    for k in (2, 3):
        assert 0 < joined[k] < joined[0] + NEW_TOKENS[0], f"request {k} joined at step {joined[k]}: {joined}"


def test_scoring_equals_reference(cluster, reference):
    got = cluster.score(SCORE)
    for i, ((logprobs, greedy), (context, continuation)) in enumerate(zip(got, SCORE)):
        want_lp, want_greedy = reference.score(context, continuation)
        assert_f32_parity(torch.tensor(logprobs), torch.tensor(want_lp), f"score request {i}: log-probs")
        assert greedy == want_greedy, f"score request {i}: greedy flags {greedy} != {want_greedy}"


def test_request_over_kv_capacity_fails_alone(cluster, reference):
    too_long = list(range(10, 110))  # 100 prompt tokens + 40 outputs > max_tokens 128
    requests = [Request(0, PROMPTS[1], SamplingParams(max_new_tokens=5)),
                Request(1, too_long, SamplingParams(max_new_tokens=40)),
                Request(2, PROMPTS[3], SamplingParams(max_new_tokens=5))]
    results = cluster.run(requests)
    assert results[1].finish_reason == "error"
    assert "139 tokens" in results[1].error and "generation_servers.kv_cache_config.max_tokens=128" in results[1].error
    for k in (0, 2):
        assert results[k].error is None
        assert results[k].token_ids == reference.generate(requests[k].prompt, 5)
    with pytest.raises(RequestError, match="1 of 2 requests failed: request 1: 139 tokens"):
        cluster.generate([PROMPTS[1], too_long], SamplingParams(max_new_tokens=40))


def test_sampling_and_stop_strings_match_the_reference_backend(cluster, tiny_checkpoint):
    """The driver contract shared with the reference backend: seeded sampling, stop token ids, stop strings."""
    from evals.backends import ReferenceBackend

    ref = ReferenceBackend(str(tiny_checkpoint))
    greedy = ref.generate([PROMPTS[3]], SamplingParams(max_new_tokens=12))[0]
    stop_text = ref.tokenizer.decode(greedy[4:6])  # a string first completed by the 6th token at the latest
    params = [SamplingParams(max_new_tokens=12, stop_strings=(stop_text,)),
              SamplingParams(max_new_tokens=12, stop_token_ids=(greedy[3],)),
              SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=7)]
    prompts = [PROMPTS[3]] * 3
    got = cluster.generate(prompts, params)
    assert got == ref.generate(prompts, params)
    assert len(got[0]) <= 6 and len(got[1]) <= 4
