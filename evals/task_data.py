"""The tasks ``helix eval`` runs, exposed to lm-eval through one-line ``include:`` files, offline.

* lm-eval's built-in ``mmlu`` and ``gsm8k`` YAMLs, with only their data source swapped when asked: every task
  and group file is re-exposed through an include of the built-in file. With a local data directory (the layout
  of ``../shared/data``: ``mmlu/{dev,test}/SUBJECT_{dev,test}.csv`` and ``gsm8k/{train,test}.jsonl``) the include
  file also overrides the data source: gsm8k reads the JSON lines through ``datasets``' json loader (same fields
  as ``openai/gsm8k``); each MMLU subject gets a ``custom_dataset`` that builds the fields of ``cais/mmlu`` that
  the templates use (``choices`` a list, ``answer`` an int) from its CSVs. Without a local directory the hub
  datasets are used unchanged.
* lm-eval's RULER needle tasks ``niah_single_1``, ``niah_multikey_2``, ``niah_multikey_3`` unchanged: they build
  their haystacks offline (lm_eval/tasks/ruler/prepare_niah.py), sized by the task metadata.
* the project's own tasks, ``evals/tasks/*.yaml`` (``niah_restated``, see evals/niah_restated.py).

Only these generated files are indexed (``TaskManager(include_defaults=False)``), which skips the ~15 s
scan of every built-in task.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterator

DATA_TASKS = ("mmlu", "gsm8k")  # read data files (local or hub)
RULER_TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3")  # lm-eval's, build their samples
NEEDLE_TASKS = RULER_TASKS + ("niah_restated",)
TASKS = DATA_TASKS + NEEDLE_TASKS
DATA_ENV = "HELIX_EVAL_DATA"
PROJECT_TASKS = Path(__file__).parent / "tasks"
# A directory where nltk finds an (empty) punkt_tab; see ruler_offline.
NLTK_STUB = Path(__file__).parent / "nltk_data"


def data_task_files() -> list[Path]:
    """lm-eval's own YAMLs of the data tasks: the 57 MMLU subjects with their groups, and gsm8k."""
    import lm_eval.tasks

    root = Path(lm_eval.tasks.__file__).parent
    return sorted((root / "mmlu" / "default").glob("*.yaml")) + [root / "gsm8k" / "gsm8k.yaml"]


def needle_task_files() -> list[Path]:
    """lm-eval's own RULER YAMLs, then the project's tasks (evals/tasks)."""
    import lm_eval.tasks

    root = Path(lm_eval.tasks.__file__).parent
    return [root / "ruler" / f"{t}.yaml" for t in RULER_TASKS] + sorted(PROJECT_TASKS.glob("*.yaml"))


def generation_cap(task: str) -> int:
    """A needle task's ``max_gen_toks``, read from its YAML (includes followed, no function resolved)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    path = {f.stem: f for f in needle_task_files()}[task]
    return int(load_yaml(path, resolve_func=False)["generation_kwargs"]["max_gen_toks"])


def resolve_data_dir(data_dir: str | os.PathLike | None) -> str | None:
    """``--data-dir``, else ``$HELIX_EVAL_DATA``, else None (the Hugging Face hub)."""
    chosen = data_dir or os.environ.get(DATA_ENV) or None
    if chosen is None:
        return None
    chosen = os.path.abspath(os.fspath(chosen))
    for sub in ("mmlu/dev", "mmlu/test", "gsm8k/train.jsonl", "gsm8k/test.jsonl"):
        if not os.path.exists(os.path.join(chosen, sub)):
            raise FileNotFoundError(f"data dir {chosen!r} lacks {sub} (expected mmlu/{{dev,test}}/*.csv and "
                                    "gsm8k/{train,test}.jsonl, the layout of ../shared/data)")
    return chosen


def go_offline() -> None:
    """Local data needs no network: make ``datasets``/``huggingface_hub`` fail fast instead of retrying.

    Must run before ``datasets`` is first imported (it reads these variables once)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def ruler_offline() -> None:
    """Let lm-eval's RULER generator import without reaching for the network (before nltk is first imported).

    lm_eval/tasks/ruler/prepare_niah.py calls ``nltk.download("punkt_tab")`` at import unless
    ``nltk.data.find("tokenizers/punkt_tab")`` succeeds. Tried without it on the development machine and on an
    H200 host, neither with network: the host name does not resolve, nltk prints a download error and returns,
    and the import goes on (the RULER tasks then work); where connecting hangs instead of failing, nltk's
    downloader would wait for its 120 s timeout. The haystacks of these tasks ("repeat", "needle")
    are never split into sentences (only RULER's "essay" haystack calls ``sent_tokenize``), so an empty
    punkt_tab directory (NLTK_STUB, shipped) is all they need: nltk finds it and downloads nothing. It does not
    hide a real punkt_tab: a tokenizer loads ``tokenizers/punkt_tab/<language>/``, which the stub lacks, so nltk
    keeps looking along its path. Spawned processes (the reference beside the deployment) inherit it."""
    paths = [p for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p]
    if str(NLTK_STUB) not in paths:
        os.environ["NLTK_DATA"] = os.pathsep.join(paths + [str(NLTK_STUB)])


def mmlu_csv(data_dir: str, subject: str, **_task_metadata):
    """One subject's ``question,choice0..3,answer`` CSVs as the ``cais/mmlu`` fields the built-in templates read
    (``choices`` a list, ``answer`` an int). Read with ``csv``, not pandas, so every choice keeps its exact text
    (pandas would turn a choice "None" into NaN and "2.50" into 2.5). lm-eval calls this with the task's
    metadata keywords too, hence ``**_task_metadata``."""
    import csv

    import datasets

    def split(name: str) -> datasets.Dataset:
        with open(os.path.join(data_dir, "mmlu", name, f"{subject}_{name}.csv"), newline="") as f:
            rows = list(csv.DictReader(f))
        return datasets.Dataset.from_list([{"question": r["question"], "subject": subject,
                                            "choices": [r[f"choice{i}"] for i in range(4)],
                                            "answer": int(r["answer"])} for r in rows])

    return datasets.DatasetDict({"dev": split("dev"), "test": split("test")})


def _local_override(builtin: Path, data_dir: str) -> list[str]:
    """YAML lines that point one built-in task at the local copy of its data (empty for group files)."""
    import yaml

    with open(builtin) as f:
        raw = yaml.load(f, Loader=yaml.BaseLoader)  # no !function resolution: only dataset_name is read
    q = json.dumps  # a JSON string is a valid YAML scalar, whatever the path holds
    if builtin.name == "gsm8k.yaml":
        files = {split: os.path.join(data_dir, "gsm8k", f"{split}.jsonl") for split in ("train", "test")}
        return ["dataset_path: json", "dataset_name: null",
                f"dataset_kwargs: {{data_files: {{train: {q(files['train'])}, test: {q(files['test'])}}}}}"]
    subject = raw.get("dataset_name")
    if subject is None:  # a group file (_mmlu.yaml, _mmlu_stem.yaml, ...)
        return []
    return ["custom_dataset: !function evals.task_data.mmlu_csv",
            f"dataset_kwargs: {{data_dir: {q(data_dir)}, subject: {q(subject)}}}"]


def write_task_dir(out: str | os.PathLike, data_dir: str | None) -> str:
    """One include file per task/group YAML in ``out`` (local data only for the data tasks); returns ``out``."""
    out = os.fspath(out)
    files = [(f, data_dir is not None) for f in data_task_files()] + [(f, False) for f in needle_task_files()]
    for task_file, local in files:
        lines = [f"include: {json.dumps(str(task_file))}"]
        if local:
            lines += _local_override(task_file, data_dir)
        with open(os.path.join(out, task_file.name), "w") as f:
            f.write("\n".join(lines) + "\n")
    return out


class _CustomDatasetNotice(logging.Filter):
    """Drops lm-eval's per-task hint about ``--metadata`` for ``custom_dataset`` tasks (57 lines, one per subject)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


@contextlib.contextmanager
def task_dir(data_dir: str | None) -> Iterator[str]:
    """A temporary directory of include files, alive for the evaluation that indexes it."""
    notice = _CustomDatasetNotice()
    logging.getLogger("lm_eval.api.task").addFilter(notice)
    try:
        with tempfile.TemporaryDirectory(prefix="helix-lm-eval-tasks-") as tmp:
            yield write_task_dir(tmp, data_dir)
    finally:
        logging.getLogger("lm_eval.api.task").removeFilter(notice)


def task_manager(path: str, metadata: dict | None = None):
    """A TaskManager that knows only the generated files; ``metadata`` reaches every task (the needle tasks'
    generators read their lengths, depths and tokenizer from it)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=False, include_path=path, metadata=metadata)
