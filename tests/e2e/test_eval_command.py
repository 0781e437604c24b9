"""``helix eval`` with ``--reference-device``: the reference runs in its own process beside the deployment, and
its failure fails the command naming that device (on CPU both sides share the machine's cores)."""

from __future__ import annotations

import argparse
import json

import pytest

from evals import run as eval_run


def eval_args(tiny_checkpoint: str, data_dir: str, out: str, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    eval_run.add_arguments(parser)
    return parser.parse_args(["--model", tiny_checkpoint, "--data-dir", data_dir, "--out", out, "--tasks", "gsm8k",
                              "--limit", "gsm8k=2", "--max-length", "512", "--max-gen-toks", "8", *extra])


def test_reference_beside_the_deployment_agrees_on_every_sample(tiny_checkpoint, data_dir, tmp_path):
    report = eval_run.run(eval_args(tiny_checkpoint, data_dir, str(tmp_path), "--reference-device", "cpu"))
    assert report["passed"] and report["reference_device"] == "cpu"
    gsm8k = report["runs"][0]["comparison"]["gsm8k"]
    assert gsm8k["n"] == 2 and gsm8k["agreement"] == 1.0
    with open(tmp_path / "samples.json") as f:
        samples = json.load(f)
    assert samples["deployed"]["gsm8k"] == samples["reference"]["gsm8k"]


def test_failing_reference_process_fails_the_command_naming_its_device(tiny_checkpoint, data_dir, tmp_path):
    args = eval_args(tiny_checkpoint, data_dir, str(tmp_path), "--reference-device", "no-such-device", "--limit",
                     "gsm8k=1")
    with pytest.raises(RuntimeError, match="reference run on no-such-device failed"):
        eval_run.run(args)
    assert not (tmp_path / "results.json").exists()
