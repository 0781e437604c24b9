"""lm-eval's built-in mmlu / gsm8k definitions over the local data copies, offline."""

from __future__ import annotations

import csv
import json
import os

import pytest

from evals.task_data import (data_task_files, go_offline, needle_task_files, task_dir, task_manager,
                             write_task_dir)


def test_hub_mode_only_includes_the_task_files(tmp_path):
    write_task_dir(tmp_path, None)
    files = sorted(os.listdir(tmp_path))
    # 57 subjects, 5 groups, gsm8k; RULER's three needle tasks and niah_restated
    assert len(files) == 57 + 6 + 3 + 1 and {"gsm8k.yaml", "_mmlu.yaml", "niah_single_1.yaml", "niah_restated.yaml"} <= set(files)
    for task_file in data_task_files() + needle_task_files():
        assert (tmp_path / task_file.name).read_text() == f"include: {json.dumps(str(task_file))}\n"


def test_local_data_leaves_the_needle_tasks_as_they_are(tmp_path, data_dir):
    write_task_dir(tmp_path, data_dir)
    for task_file in needle_task_files():
        assert (tmp_path / task_file.name).read_text() == f"include: {json.dumps(str(task_file))}\n"


@pytest.fixture(scope="module")
def loaded(data_dir):
    go_offline()
    with task_dir(data_dir) as path:
        yield task_manager(path).load(["mmlu", "gsm8k"])


def test_mmlu_reads_the_local_csvs_with_the_builtin_prompt(loaded, data_dir):
    tasks, groups = loaded["tasks"], loaded["groups"]
    assert len([t for t in tasks if t.startswith("mmlu_")]) == 57
    assert set(groups) == {"mmlu", "mmlu_stem", "mmlu_other", "mmlu_social_sciences", "mmlu_humanities"}
    task = tasks["mmlu_college_mathematics"]
    with open(os.path.join(data_dir, "mmlu", "test", "college_mathematics_test.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    docs = list(task.test_docs())
    assert len(docs) == len(rows)
    for doc, row in zip(docs, rows):  # exact strings: no numeric or NaN coercion of choices
        assert doc["choices"] == [row[f"choice{i}"] for i in range(4)] and doc["answer"] == int(row["answer"])
    assert len(list(task.fewshot_docs())) == 5  # the dev split
    prompt = task.doc_to_text(docs[0])
    assert prompt.endswith("\nD. " + rows[0]["choice3"] + "\nAnswer:") and task.doc_to_choice(docs[0]) == list("ABCD")


def test_gsm8k_reads_the_local_jsonl_with_the_builtin_filters(loaded, data_dir):
    task = loaded["tasks"]["gsm8k"]
    assert len(list(task.test_docs())) == 1319 and len(list(task.fewshot_docs())) == 7473
    assert task.config.num_fewshot == 5 and task.config.generation_kwargs["until"][0] == "Question:"
    assert [f.name for f in task._filters] == ["strict-match", "flexible-extract"]
    with open(os.path.join(data_dir, "gsm8k", "test.jsonl")) as f:
        first = json.loads(f.readline())
    assert task.doc_to_text(task.test_docs()[0]) == f"Question: {first['question']}\nAnswer:"
