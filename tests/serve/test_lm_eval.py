"""lm-eval's own ``local-completions`` model pointed at ``helix serve`` gives the same per-sample predictions as
the in-process ``helix`` adapter on the same cluster: MMLU by echo + logprobs (same choice, log-likelihoods within
1e-3: the server's come from the context server's prefill, the adapter's from Helix decode steps), GSM8K by
generation (same text, same extracted answers).

lm-eval's API models keep ``max_length - 1`` tokens for scoring and ``max_length - 1 - max_gen_toks`` for a
generation prompt, the adapter ``max_length + 1`` and ``max_length - max_gen_toks``: the server side is given
MAX_LENGTH + 2 and MAX_LENGTH + 1 so that both cut long 5-shot prompts at the same token.
"""

from __future__ import annotations

import lm_eval
import pytest

from evals.backends import HelixBackend
from evals.compare import golden_mismatches, samples_of
from evals.lm_eval_adapter import HelixLM
from evals.task_data import go_offline, task_dir, task_manager

SLICE = {"mmlu": (["mmlu_abstract_algebra", "mmlu_world_religions"], 2), "gsm8k": (["gsm8k"], 2)}
MAX_LENGTH, MAX_GEN_TOKS = 512, 16
SERVER_MAX_LENGTH = {"mmlu": MAX_LENGTH + 2, "gsm8k": MAX_LENGTH + 1}


@pytest.fixture(scope="module")
def tm(data_dir):
    go_offline()
    with task_dir(data_dir) as path:
        yield task_manager(path)


def predictions(model, model_args, task: str, tm) -> dict[str, dict]:
    subtasks, limit = SLICE[task]
    res = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=subtasks, task_manager=tm, limit=limit,
                                  num_fewshot=5, log_samples=True, bootstrap_iters=0,
                                  gen_kwargs={"max_gen_toks": MAX_GEN_TOKS} if task == "gsm8k" else None)
    samples = samples_of(task, res)
    assert len(samples) == len(subtasks) * limit
    return samples


@pytest.mark.parametrize("task", list(SLICE))
def test_local_completions_equals_the_in_process_adapter(served, tiny_checkpoint, tm, task):
    args = (f"base_url={served.v1}/completions,model={served.model},tokenizer_backend=huggingface,"
            f"add_bos_token=True,max_length={SERVER_MAX_LENGTH[task]},max_gen_toks={MAX_GEN_TOKS},num_concurrent=8,"
            "max_retries=1,timeout=300")
    over_http = predictions("local-completions", args, task, tm)
    in_process = predictions(HelixLM(HelixBackend(served.cluster), max_length=MAX_LENGTH, max_gen_toks=MAX_GEN_TOKS),
                             None, task, tm)
    assert golden_mismatches(task, over_http, in_process) == []
