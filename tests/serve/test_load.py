"""Load: 64 concurrent completions of mixed lengths from 8 client threads, one of them over the KV capacity.
Every other response equals the reference's greedy tokens, none is lost, the over-capacity one fails alone
(400), and the server answers afterwards."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import openai
import torch

from helix.tokenizer import BOS_ID, EOS_ID
from tests.serve.conftest import MAX_TOKENS
from tests.tolerance import assert_f32_parity

REQUESTS, CLIENTS, OVER = 64, 8, 37  # OVER: the index of the request over the KV capacity


def workload() -> list[tuple[list[int], int]]:
    rng = random.Random(0)
    jobs = [([BOS_ID] + [rng.randrange(32, 127) for _ in range(rng.choice([0, 3, 17, 60, 150]))],
             rng.choice([1, 4, 9, 16])) for _ in range(REQUESTS)]
    jobs[OVER] = ([BOS_ID] * (MAX_TOKENS - 2), 8)
    return jobs


def test_concurrent_mixed_requests_all_equal_the_reference(served, client, reference):
    jobs = workload()

    def send(job):
        prompt, n = job
        try:
            r = client.completions.create(model=served.model, prompt=prompt, max_tokens=n, temperature=0, logprobs=0)
        except openai.BadRequestError as e:
            return e
        return r.choices[0].logprobs

    with ThreadPoolExecutor(CLIENTS) as pool:
        got = list(pool.map(send, jobs))
    tok = served.cluster.tokenizer
    for i, ((prompt, n), answer) in enumerate(zip(jobs, got)):
        if i == OVER:
            assert isinstance(answer, openai.BadRequestError) and answer.status_code == 400
            assert "exceed the KV capacity" in answer.body["message"]
            continue
        want = reference.generate(prompt, n, eos_token_ids=(EOS_ID,))
        what = f"request {i}: {len(prompt)}-token prompt, {n} tokens"
        assert answer.tokens == [tok.decode([t]) for t in want], what
        # Bytes >= 128 all read "\ufffd": the log-probs tell such tokens apart.
        assert_f32_parity(torch.tensor(answer.token_logprobs), torch.tensor(reference.score(prompt, want)[0]), what)
    after = client.completions.create(model=served.model, prompt=[BOS_ID, 5], max_tokens=3, temperature=0)
    assert after.choices[0].finish_reason in ("stop", "length")
