"""The reference backend reproduces golden/accuracy/tiny-synthetic-reference.json (its own predictions on the
embedded-default slice, recorded once), on a few MMLU subjects and GSM8K questions of that slice."""

from __future__ import annotations

import json

import lm_eval
import pytest

from evals.compare import golden_mismatches, samples_of
from evals.lm_eval_adapter import HelixLM
from evals.run import TINY_GOLDEN
from evals.task_data import go_offline, task_dir, task_manager


@pytest.fixture(scope="module")
def golden():
    with open(TINY_GOLDEN) as f:
        return json.load(f)


@pytest.mark.parametrize("task, subtasks, limit", [("mmlu", ["mmlu_abstract_algebra", "mmlu_world_religions"], 2),
                                                   ("gsm8k", ["gsm8k"], 2)])
def test_reference_reproduces_golden_outputs(golden, reference_backend, data_dir, task, subtasks, limit):
    settings = golden["settings"]
    assert settings["limits"][task] >= limit and settings["num_fewshot"] == 5
    go_offline()
    lm = HelixLM(reference_backend, max_length=settings["max_length"], max_gen_toks=settings["max_gen_toks"])
    with task_dir(data_dir) as path:
        res = lm_eval.simple_evaluate(model=lm, tasks=subtasks, task_manager=task_manager(path), limit=limit,
                                      num_fewshot=settings["num_fewshot"], log_samples=True, bootstrap_iters=0,
                                      gen_kwargs={"max_gen_toks": settings["max_gen_toks"]} if task == "gsm8k" else None)
    samples = samples_of(task, res)
    assert len(samples) == len(subtasks) * limit
    bad = golden_mismatches(task, samples, golden["samples"][task])
    assert not bad, {k: (samples[k], golden["samples"][task].get(k)) for k in bad}
