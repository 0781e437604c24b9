"""``helix eval`` as a command: the console shows one progress bar per backend and task, then the report, while
lm-eval's own output (a log line per task, a warning per few-shot setting, progress bars of its own) goes to
OUT/eval.log (-v prints it instead); a bad input ends the command in one line, naming it."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings

import pytest

from evals.run import console_output
from evals.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_console_shows_one_bar_per_backend_and_task_then_the_report(tiny_checkpoint, data_dir, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "evals", "eval", "--model", tiny_checkpoint, "--data-dir", data_dir, "--tasks", "gsm8k",
         "--limit", "1", "--max-length", "512", "--max-gen-toks", "4", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    bars = {re.match(r"[^:]*", part)[0] for part in re.split(r"[\r\n]+", proc.stderr) if part}
    assert bars == {"helix gsm8k", "reference gsm8k"}, proc.stderr  # every update of the two bars, nothing else
    assert f"lm-eval's log and every warning: `{out / 'eval.log'}`" in proc.stdout
    log = (out / "eval.log").read_text()
    for line in ("INFO lm_eval.api.task: Building contexts for gsm8k", "WARNING lm_eval.evaluator: generation_kwargs",
                 "INFO helix.eval: reference gsm8k (limit 1)"):
        assert line in log


def test_console_output_keeps_helix_warnings_and_errors_and_logs_everything(tmp_path, capsys):
    log_path = tmp_path / "eval.log"
    root = logging.getLogger()
    level, handlers = root.level, root.handlers
    root.setLevel(logging.INFO)
    try:
        with console_output(str(log_path)) as console:
            logging.getLogger("lm_eval.evaluator").info("Task: gsm8k")
            logging.getLogger("lm_eval.evaluator").warning("num_fewshot overwritten")
            logging.getLogger("datasets").error("a failure elsewhere")
            logging.getLogger("helix.eval").warning("a helix warning")
            warnings.warn("a Python warning")
            print("lm-eval's own bar", file=sys.stderr)
            print("our bar", file=console)
    finally:
        root.setLevel(level)
    assert root.handlers is handlers
    assert capsys.readouterr().err == ("ERROR datasets: a failure elsewhere\nWARNING helix.eval: a helix warning\n"
                                       "our bar\n")
    log = log_path.read_text()
    for line in ("INFO lm_eval.evaluator: Task: gsm8k", "WARNING lm_eval.evaluator: num_fewshot overwritten",
                 "ERROR datasets: a failure elsewhere", "WARNING helix.eval: a helix warning", "a Python warning",
                 "lm-eval's own bar"):
        assert line in log
    with console_output(None) as console:  # --verbose: nothing redirected
        assert console is sys.stderr and root.handlers is handlers


@pytest.mark.parametrize("case", ["limit-not-a-count", "limit-zero", "limit-unknown-task", "truncated-weights",
                                  "nan-weight-helix"])
def test_bad_inputs_end_in_one_line(case, tiny_checkpoint, truncated_checkpoint, nan_checkpoint, tmp_path, capsys):
    needle = ["--tasks", "niah_restated", "--context-lengths", "512", "--depths", "50"]  # no data files needed
    args, expected = {
        "limit-not-a-count": (["--model", tiny_checkpoint, "--limit", "mmlu=abc"],
                              "--limit='mmlu=abc': 'abc' is not a count; give N or task=N,task=N with integers N >= 1"),
        "limit-zero": (["--model", tiny_checkpoint, "--limit", "0"], "--limit='0': '0' is not a count"),
        "limit-unknown-task": (["--model", tiny_checkpoint, "--limit", "mmlu=2,mmlu_pro=3"],
                               "--limit='mmlu=2,mmlu_pro=3': unknown task(s) ['mmlu_pro']"),
        "truncated-weights": (["--model", str(truncated_checkpoint), *needle],
                              f"{truncated_checkpoint}/model.safetensors: not a valid safetensors file"),
        "nan-weight-helix": (["--model", str(nan_checkpoint), *needle],
                             "1 of 1 requests failed: helix request 0, step 1: logits hold NaN or inf"),
    }[case]
    assert main(["eval", *args, "--out", str(tmp_path / "out")]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = [line for line in re.split(r"[\r\n]+", captured.err) if line and not line.startswith("helix niah_")]
    assert len(lines) == 1 and lines[0].startswith("helix: error: ") and expected in lines[0], captured.err
