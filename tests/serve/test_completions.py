"""POST /v1/completions through the openai package and plain HTTP: greedy completions equal the float64 reference
token for token with float32-parity log-probs, echo scores the prompt, streaming sends the same text, seeded
sampling and stop strings follow the driver contract, bad requests get OpenAI's error JSON naming the parameter,
and a request sent while another decodes joins the running batch."""

from __future__ import annotations

import json
import threading

import pytest
import requests
import torch

from helix.sampling import SamplingParams
from helix.tokenizer import BOS_ID, EOS_ID
from tests.serve.conftest import MAX_TOKENS
from tests.tolerance import assert_f32_parity

PROMPTS = [[BOS_ID] + list(b"Helix shards the KV cache along the sequence."), [BOS_ID, 3, 1, 4], [9]]


def greedy(reference, prompt: list[int], n: int) -> list[int]:
    return reference.generate(prompt, n, eos_token_ids=(EOS_ID,))


def test_greedy_completions_equal_the_reference(client, served, reference):
    r = client.completions.create(model=served.model, prompt=PROMPTS, max_tokens=12, temperature=0, logprobs=0)
    tok = served.cluster.tokenizer
    assert [c.index for c in r.choices] == [0, 1, 2]
    wanted = [greedy(reference, p, 12) for p in PROMPTS]
    for prompt, choice, want in zip(PROMPTS, r.choices, wanted):
        assert choice.text == tok.decode(want, skip_special_tokens=True)
        assert choice.finish_reason == ("stop" if want[-1] == EOS_ID else "length")
        assert choice.logprobs.tokens == [tok.decode([t]) for t in want]
        want_lp, _ = reference.score(prompt, want)
        assert_f32_parity(torch.tensor(choice.logprobs.token_logprobs), torch.tensor(want_lp), f"prompt {prompt[:4]}")
        # logprobs=0: no alternatives, but always the chosen token
        assert [list(top) for top in choice.logprobs.top_logprobs] == [[t] for t in choice.logprobs.tokens]
    assert r.usage.prompt_tokens == sum(map(len, PROMPTS))
    assert r.usage.completion_tokens == sum(map(len, wanted))


def test_text_prompt_is_encoded_with_bos(client, served):
    by_text = client.completions.create(model=served.model, prompt="Helix", max_tokens=6, temperature=0)
    by_ids = client.completions.create(model=served.model, prompt=[BOS_ID] + list(b"Helix"), max_tokens=6,
                                       temperature=0)
    assert by_text.choices[0].text == by_ids.choices[0].text
    assert by_text.usage.prompt_tokens == 6


def test_echo_scores_the_prompt_like_the_reference(client, served, reference):
    prompt = PROMPTS[0]
    r = client.completions.create(model=served.model, prompt=prompt, max_tokens=3, temperature=0, logprobs=3,
                                  echo=True)
    c, tok = r.choices[0], served.cluster.tokenizer
    assert c.text.startswith(tok.decode(prompt)) and len(c.logprobs.tokens) == len(prompt) + 3
    assert c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None
    want, _ = reference.score(prompt[:1], prompt[1:])
    assert_f32_parity(torch.tensor(c.logprobs.token_logprobs[1:len(prompt)]), torch.tensor(want), "prompt log-probs")
    offsets = c.logprobs.text_offset
    assert offsets[0] == 0 and all(b - a == len(t) for a, b, t in zip(offsets, offsets[1:], c.logprobs.tokens))
    for k, (lp, top) in enumerate(zip(c.logprobs.token_logprobs[1:], c.logprobs.top_logprobs[1:]), 1):
        assert 1 <= len(top) <= 4 and lp <= max(top.values()), k
    for lp, top in zip(c.logprobs.token_logprobs[-3:], c.logprobs.top_logprobs[-3:]):
        assert lp == max(top.values())  # greedy: the chosen token is the most likely, the same float


def test_stream_sends_the_same_completion(client, served):
    kwargs = dict(model=served.model, prompt=PROMPTS, max_tokens=12, temperature=0, logprobs=1)
    whole = client.completions.create(**kwargs)
    text, tokens, finish = ["", "", ""], [[], [], []], [None] * 3
    for chunk in client.completions.create(**kwargs, stream=True):
        (c,) = chunk.choices
        assert finish[c.index] is None, "a chunk after the prompt's last"
        text[c.index] += c.text
        tokens[c.index] += c.logprobs.tokens if c.logprobs else []
        finish[c.index] = c.finish_reason
    assert text == [c.text for c in whole.choices]
    assert tokens == [c.logprobs.tokens for c in whole.choices]
    assert finish == [c.finish_reason for c in whole.choices]


def test_sse_framing_ends_with_done(served):
    with requests.post(served.v1 + "/completions", json={"prompt": [9], "max_tokens": 3, "temperature": 0,
                                                           "stream": True}, stream=True, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines(decode_unicode=True) if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_seeded_sampling_and_stop_strings_follow_the_driver_contract(client, served, tiny_checkpoint):
    from evals.backends import ReferenceBackend

    ref, prompt = ReferenceBackend(str(tiny_checkpoint)), PROMPTS[0]
    tok = served.cluster.tokenizer
    sampled = SamplingParams(max_new_tokens=10, temperature=0.8, top_p=0.9, seed=7, stop_token_ids=(EOS_ID,))
    want = tok.decode(ref.generate([prompt], sampled)[0], skip_special_tokens=True)
    for _ in range(2):  # the same seed, the same draw
        r = client.completions.create(model=served.model, prompt=prompt, max_tokens=10, temperature=0.8, top_p=0.9,
                                      seed=7)
        assert r.choices[0].text == want
    full = tok.decode(ref.generate([prompt], SamplingParams(max_new_tokens=12, stop_token_ids=(EOS_ID,)))[0],
                      skip_special_tokens=True)
    stop = full[4:6]
    r = client.completions.create(model=served.model, prompt=prompt, max_tokens=12, temperature=0, stop=[stop, "zz"])
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"


BAD = {
    "max_tokens 0": ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
    "unknown key": ({"prompt": "x", "best_of": 2}, 400, "best_of", "Unrecognized request argument supplied: best_of"),
    "temperature": ({"prompt": "x", "temperature": 3}, 400, "temperature", "less than or equal to 2"),
    "n": ({"prompt": "x", "n": 2}, 400, "n", "less than or equal to 1"),
    "logprobs": ({"prompt": "x", "logprobs": 21}, 400, "logprobs", "less than or equal to 20"),
    "prompt type": ({"prompt": {"a": 1}}, 400, "prompt", "a string, a list of strings, a list of token ids"),
    "no prompt": ({"prompt": []}, 400, "prompt", "must not be empty"),
    "empty prompt": ({"prompt": [[9], []]}, 400, "prompt", "prompt 1: empty"),
    "token id": ({"prompt": [9, 384]}, 400, "prompt", "token id 384 is outside [0, vocab_size=384)"),
    "over capacity": ({"prompt": [9] * MAX_TOKENS, "max_tokens": 4}, 400, "prompt",
                      f"1027 tokens (prompt {MAX_TOKENS} + 4 outputs - 1) exceed the KV capacity"),
    "model": ({"prompt": "x", "model": "gpt-4"}, 404, "model", "The model `gpt-4` does not exist"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_gets_openai_error_naming_the_parameter(served, case):
    body, status, param, message = BAD[case]
    r = requests.post(served.v1 + "/completions", json=body, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and message in error["message"], error
    assert error["type"] == "invalid_request_error"


def test_malformed_json_is_a_400_and_the_server_still_answers(served, client):
    r = requests.post(served.v1 + "/completions", data="{not json", headers={"content-type": "application/json"},
                      timeout=60)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert client.completions.create(model=served.model, prompt=[9], max_tokens=2, temperature=0).choices[0].text


def test_models_and_health(served, client):
    assert [m.id for m in client.models.list().data] == [served.model]
    assert requests.get(served.v1 + "/models", timeout=60).json()["data"][0]["max_model_len"] == MAX_TOKENS
    assert requests.get(served.url + "/health", timeout=60).json() == {"status": "ok"}


def test_a_request_joins_the_running_decode_batch(client, served):
    """A short request sent while a long one decodes finishes first: it did not wait for the long one."""
    long = client.completions.create(model=served.model, prompt=[BOS_ID, 7], max_tokens=300, temperature=0,
                                     stream=True)
    order = []
    chunks = iter(long)
    next(chunks)  # the long request is decoding

    def short():
        client.completions.create(model=served.model, prompt=[BOS_ID, 8], max_tokens=2, temperature=0)
        order.append("short")

    thread = threading.Thread(target=short)
    thread.start()
    for chunk in chunks:
        if chunk.choices[0].finish_reason is not None:
            order.append(f"long ({chunk.choices[0].finish_reason})")
    thread.join()
    assert order[0] == "short", order
