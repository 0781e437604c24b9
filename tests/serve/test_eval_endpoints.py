"""``helix eval`` between endpoints: the endpoint backend's scores and generations through ``helix serve`` equal the
reference's, and ``--deployed URL`` runs the accuracy suite against ``--reference-model DIR`` (the local
reference) and against ``--reference URL`` (another endpoint; here the same server), with the same report."""

from __future__ import annotations

import argparse

import pytest
import torch

from evals import run as eval_run
from evals.backends import BackendSpec, EndpointBackend, ReferenceBackend
from helix.config import ConfigError
from helix.sampling import SamplingParams
from helix.tokenizer import BOS_ID, EOS_ID
from tests.tolerance import assert_f32_parity

PAIRS = [([BOS_ID] + list(b"Answer:"), list(b" A")), ([BOS_ID, 5], [6, 7, 8]), ([9], [257])]


@pytest.fixture(scope="module")
def endpoint(served, tiny_checkpoint):
    with EndpointBackend(served.v1, str(tiny_checkpoint)) as backend:
        yield backend


def test_endpoint_backend_scores_and_generates_like_the_reference(endpoint, tiny_checkpoint):
    ref = ReferenceBackend(str(tiny_checkpoint))
    for i, ((lp, greedy), (want_lp, want_greedy)) in enumerate(zip(endpoint.score(PAIRS), ref.score(PAIRS))):
        assert_f32_parity(torch.tensor(lp), torch.tensor(want_lp), f"pair {i}")
        assert greedy == want_greedy, i
    prompts = [p + x for p, x in PAIRS]
    params = [SamplingParams(max_new_tokens=8, stop_token_ids=(EOS_ID,)),
              SamplingParams(max_new_tokens=8, temperature=0.7, seed=3, stop_token_ids=(EOS_ID,)),
              SamplingParams(max_new_tokens=0)]
    decode = ref.tokenizer.decode
    got, want = endpoint.generate(prompts, params), ref.generate(prompts, params)
    assert [decode(g, skip_special_tokens=True) for g in got] == [decode(w, skip_special_tokens=True) for w in want]


def eval_args(data_dir: str, out: str, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    eval_run.add_arguments(parser)
    return parser.parse_args(["--data-dir", data_dir, "--out", out, "--tasks", "gsm8k", "--limit", "2",
                              "--max-length", "512", "--max-gen-toks", "8", *extra])


@pytest.mark.parametrize("against", ["reference-model", "reference"])
def test_eval_deployed_endpoint(served, tiny_checkpoint, data_dir, tmp_path, against):
    other = str(tiny_checkpoint) if against == "reference-model" else served.v1
    extra = ["--tokenizer", str(tiny_checkpoint)] if against == "reference" else []
    report = eval_run.run(eval_args(data_dir, str(tmp_path), "--deployed", served.v1, f"--{against}", other, *extra))
    run = report["runs"][0]
    assert report["deployed_backend"] == "endpoint" and report["passed"]
    assert run["model"] == f"{served.model} at {served.v1}"
    gsm8k = run["comparison"]["gsm8k"]
    assert gsm8k["n"] == 2 and gsm8k["agreement"] == 1.0
    assert "# helix eval: endpoint vs " in (tmp_path / "report.md").read_text()


def test_endpoint_flags_are_checked(served, data_dir, tmp_path):
    cases = {("--deployed", served.v1): "give exactly one of --reference URL",
             ("--deployed", served.v1, "--reference", served.v1): "needs --tokenizer DIR",
             ("--reference", served.v1): "--reference='" + served.v1 + "': only with --deployed URL"}
    for flags, message in cases.items():
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("?", r"\?")):
            eval_run.plan(eval_args(data_dir, str(tmp_path), *flags), str(tmp_path))
    with pytest.raises(ConfigError, match="no model listed at http://127.0.0.1:9/v1/models"):
        BackendSpec(backend="endpoint", url="http://127.0.0.1:9/v1", tokenizer="x").capacity()
