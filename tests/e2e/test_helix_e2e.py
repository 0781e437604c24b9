"""End to end on CPU: lm-eval's MMLU and GSM8K through the disaggregated deployment (context server 1 + Helix
generation CP 2, float32) agree with the single-device reference on every sample, and a Helix bug planted in
the generation ranks makes that comparison fail.

The slice: 2 questions of 3 MMLU subjects and 3 GSM8K questions, 5-shot, prompts cut to 512 tokens (16 KV
blocks of 32, so both generation ranks own blocks of every prompt), at most 16 generated tokens.
"""

from __future__ import annotations

import lm_eval
import pytest
import torch

from evals.backends import BackendSpec, HelixBackend, ReferenceBackend
from evals.compare import compare_task, samples_of
from evals.lm_eval_adapter import HelixLM
from evals.task_data import go_offline, task_dir, task_manager
from helix.disagg import launch
from tests.e2e import rank_faults
from tests.tolerance import assert_f32_parity

SLICE = {"mmlu": (["mmlu_abstract_algebra", "mmlu_high_school_biology", "mmlu_world_religions"], 2),
         "gsm8k": (["gsm8k"], 3)}
MAX_LENGTH, MAX_GEN_TOKS, CP = 512, 16, 2


@pytest.fixture(scope="module")
def tm(data_dir):
    go_offline()
    with task_dir(data_dir) as path:
        yield task_manager(path)


@pytest.fixture(scope="module")
def helix_backend(tiny_checkpoint):
    with HelixBackend(launch(BackendSpec(model=tiny_checkpoint, cp=CP).run_spec())) as backend:
        yield backend


def predictions(backend, tm) -> dict[str, dict]:
    """``{task: {sample key: prediction}}`` of lm-eval's own tasks on SLICE through ``backend``."""
    lm = HelixLM(backend, max_length=MAX_LENGTH, max_gen_toks=MAX_GEN_TOKS)
    out = {}
    for task, (subtasks, limit) in SLICE.items():
        res = lm_eval.simple_evaluate(model=lm, tasks=subtasks, task_manager=tm, limit=limit, num_fewshot=5,
                                      log_samples=True, bootstrap_iters=0,
                                      gen_kwargs={"max_gen_toks": MAX_GEN_TOKS} if task == "gsm8k" else None)
        out[task] = samples_of(task, res)
        assert len(out[task]) == len(subtasks) * limit
    return out


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, tm):
    return predictions(ReferenceBackend(tiny_checkpoint), tm)


def test_grouped_scoring_equals_one_request_per_continuation(helix_backend):
    # Same input tokens, split differently between context and continuation, plus a request alone.
    requests = [([5, 6, 7], [8]), ([5, 6, 7], [9]), ([5, 6], [7, 10]), ([5], [6, 7, 8]), ([1, 2], [3])]
    grouped = helix_backend.score(requests)
    alone = helix_backend.cluster.score(requests)
    for i, ((lp, greedy), (want_lp, want_greedy)) in enumerate(zip(grouped, alone)):
        # Float32 parity, not bit equality: a token prefilled in one and decoded in the other, other batch sizes.
        assert_f32_parity(torch.tensor(lp), torch.tensor(want_lp), f"request {i}: log-probs")
        assert greedy == want_greedy, f"request {i}: greedy flags {greedy} != {want_greedy}"


def test_helix_agrees_with_the_reference_on_every_sample(helix_backend, tm, reference):
    deployed = predictions(helix_backend, tm)
    for task in SLICE:
        c = compare_task(task, deployed[task], reference[task], min_agreement=1.0)
        assert c["passed"] and c["agreement"] == 1.0, c


@pytest.mark.parametrize("fault", ["uniform_combine", "drop_shard"])
def test_planted_helix_bug_fails_the_comparison(helix_backend, tm, reference, fault):
    ranks = helix_backend.cluster.dep.generation_ranks
    helix_backend.cluster.on_ranks(rank_faults.plant, fault, CP, 32, ranks=ranks)
    try:
        deployed = predictions(helix_backend, tm)
    finally:
        helix_backend.cluster.on_ranks(rank_faults.unplant, ranks=ranks)
    verdicts = {task: compare_task(task, deployed[task], reference[task], min_agreement=1.0) for task in SLICE}
    assert not all(c["passed"] for c in verdicts.values()), verdicts
    assert min(c["agreement"] for c in verdicts.values()) < 1.0
