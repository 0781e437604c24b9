"""Needle tasks in ``helix eval``: the runs it plans (embedded default and CI slice included), KV capacity that
follows the context lengths (up to the needle checkpoint's 2^20) or the checkpoint's limit (a prompt past the old
8192-token default is served) within a deployment file's capacity, the refusal of a length past the checkpoint,
lm-eval's RULER tasks through the lm-eval CLI wrapper on a machine without network, and a short needle run on the
needle checkpoint through Helix vs the reference (100% on both sides)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from evals import run as eval_run
from evals.lm_eval_adapter import HelixLM
from helix.disagg.deploy import deployment_dict

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    eval_run.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("flags, max_length", [
    (["--tasks", "niah_restated", "--context-lengths", "2048,1024"], 2048 + 16),   # niah_restated generates <= 16
    (["--tasks", "niah_restated,niah_single_1", "--context-lengths", "1024"], 1024 + 128),  # RULER's cap is 128
    (["--tasks", "niah_single_1", "--context-lengths", "4096", "--max-gen-toks", "8"], 4096 + 8),
    (["--tasks", "niah_restated", "--context-lengths", "16384"], 16384),  # at the checkpoint's limit: not past it
    (["--tasks", "niah_restated", "--context-lengths", "4096", "--max-length", "3000"], 3000),
])
def test_capacity_follows_the_largest_length(tiny_checkpoint, tmp_path, flags, max_length):
    run, = eval_run.plan(parse("--model", tiny_checkpoint, *flags), str(tmp_path))
    spec, adapter_length = HelixLM.backend_spec(eval_run.model_args(run.deployed, run, 64))
    assert run.max_length == adapter_length == max_length
    dep = spec.run_spec()
    assert dep.context.max_tokens == dep.generation.max_tokens == max_length


def test_a_million_tokens_fit_the_needle_checkpoint_and_one_more_is_refused(needle_checkpoint, tmp_path):
    from helix.config import ConfigError

    run, = eval_run.plan(parse("--model", str(needle_checkpoint), "--tasks", "niah_restated", "--context-lengths",
                               "65536,1048576"), str(tmp_path))
    spec, max_length = HelixLM.backend_spec(eval_run.model_args(run.deployed, run, 64))
    dep = spec.run_spec()
    assert max_length == dep.context.max_tokens == dep.generation.max_tokens == 1 << 20
    with pytest.raises(ConfigError, match="--context-lengths=1048577: must be <= max_position_embeddings=1048576"):
        eval_run.plan(parse("--model", str(needle_checkpoint), "--tasks", "niah_restated", "--context-lengths",
                            "1048577"), str(tmp_path))


def test_the_deployment_built_from_model_serves_a_prompt_past_the_old_8192_default(tiny_checkpoint, tmp_path):
    """With --model and no --max-length, max_length is the checkpoint's max_position_embeddings, and the deployment
    is built to hold it: a prompt longer than the 8192 tokens a deployment held by default is served, with the
    reference's tokens (its fused attention: the plain one spends 9 s on this prompt's 8200^2 scores)."""
    from evals.backends import ReferenceBackend
    from helix.sampling import SamplingParams

    run, = eval_run.plan(parse("--model", tiny_checkpoint, "--tasks", "gsm8k"), str(tmp_path))
    assert run.max_length == 16384  # the tiny preset's max_position_embeddings
    prompt = [(7 * i) % 256 for i in range(8200)]
    sampling = SamplingParams(max_new_tokens=2)
    lm = HelixLM.from_model_args(eval_run.model_args(run.deployed, run, 64))  # owns the deployment while alive
    with lm.backend as helix:
        served = helix.generate([prompt], sampling)
    assert served == ReferenceBackend(tiny_checkpoint, attention="sdpa").generate([prompt], sampling)


def test_a_deployment_file_bounds_max_length(tiny_checkpoint, tmp_path):
    """--config: max_length defaults to the file's KV capacity where it is below max_position_embeddings, and a
    larger one is refused before anything starts (the deployment would refuse each longer request)."""
    from evals.backends import BackendSpec
    from helix.config import ConfigError

    config = tmp_path / "deploy.json"
    config.write_text(json.dumps(deployment_dict(BackendSpec(model=tiny_checkpoint, max_tokens=8192).run_spec())))
    run, = eval_run.plan(parse("--config", str(config), "--tasks", "gsm8k"), str(tmp_path))
    assert run.max_length == 8192
    with pytest.raises(ConfigError, match=f"max_length=10000: more than {config} holds per sequence "
                                          r"\(kv_cache_config.max_tokens=8192\)"):
        HelixLM.backend_spec({"config": str(config), "max_length": 10000})


def test_synthetic_weights_size_needles_with_their_byte_tokenizer(tmp_path):
    from lm_eval.tasks.ruler.common_utils import get_tokenizer

    run, = eval_run.plan(parse("--model", "synthetic:deepseek-v3-lite-tiny", "--tasks", "niah_single_1",
                               "--context-lengths", "1024"), str(tmp_path))
    assert os.path.dirname(run.needles.tokenizer) == str(tmp_path)  # written into the run's scratch directory
    assert get_tokenizer(run.needles.tokenizer)("ab").input_ids == [256, 97, 98]  # BOS, then one id per byte


def test_length_past_the_checkpoint_is_refused_in_one_line(tiny_checkpoint, tmp_path, capsys):
    from evals.cli import main

    assert main(["eval", "--model", tiny_checkpoint, "--tasks", "niah_restated", "--context-lengths", "2048,20000",
                 "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err == (f"helix: error: --context-lengths=20000: must be <= max_position_embeddings=16384 of "
                   f"{tiny_checkpoint} (a needle prompt and its generated tokens fit in each length)\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, value, rule", [("--depths", "0,150", "--depths=150: must be in [0, 100]"),
                                               ("--depths", "a", "--depths='a': must be comma-separated integers"),
                                               ("--samples-per-depth", "0", "--samples-per-depth=0: must be >= 1")])
def test_bad_needle_flags_are_refused(tiny_checkpoint, tmp_path, flag, value, rule):
    from helix.config import ConfigError

    with pytest.raises(ConfigError, match=rule.replace("[", r"\[").replace("]", r"\]")):
        eval_run.plan(parse("--model", tiny_checkpoint, "--tasks", "niah_restated", flag, value), str(tmp_path))


@pytest.fixture
def embedded(tiny_checkpoint, needle_checkpoint, monkeypatch):
    """The embedded default's checkpoints from the test session's copies; the presets asked for, in order."""
    presets, paths = [], {"deepseek-v3-lite-tiny": tiny_checkpoint, "deepseek-v3-needle": str(needle_checkpoint)}
    monkeypatch.setattr(eval_run, "ensure_checkpoint", lambda preset: presets.append(preset) or paths[preset])
    return presets


def test_embedded_default_is_the_data_run_then_the_needle_run(embedded, tmp_path):
    data, needle = eval_run.plan(parse(), str(tmp_path))
    assert embedded == ["deepseek-v3-lite-tiny", "deepseek-v3-needle"]
    assert (data.tasks, data.limits, data.max_length, data.max_gen_toks, data.needles, data.golden) == (
        ("mmlu", "gsm8k"), {"mmlu": 2, "gsm8k": 20}, 1024, 32, None, eval_run.TINY_GOLDEN)
    assert (needle.tasks, needle.limits, needle.max_length, needle.max_gen_toks, needle.golden) == (
        ("niah_restated",), {"niah_restated": None}, 8192 + 16, None, None)
    assert (needle.needles.context_lengths, needle.needles.depths, needle.needles.samples_per_depth) == (
        (2048, 8192), (0, 25, 50, 75, 100), 1)


def test_ci_flags_shorten_both_runs(embedded, tmp_path):
    data, needle = eval_run.plan(parse("--limit", "mmlu=1,gsm8k=5", "--depths", "0,50,100"), str(tmp_path))
    assert data.limits == {"mmlu": 1, "gsm8k": 5} and needle.limits == {"niah_restated": None}
    assert needle.needles.depths == (0, 50, 100) and needle.needles.context_lengths == (2048, 8192)


def test_embedded_tasks_go_to_their_checkpoint(embedded, tmp_path):
    run, = eval_run.plan(parse("--tasks", "niah_single_1,niah_restated"), str(tmp_path))
    assert embedded == ["deepseek-v3-needle"] and run.tasks == ("niah_single_1", "niah_restated")
    assert run.max_length == 8192 + 128
    run, = eval_run.plan(parse("--tasks", "gsm8k"), str(tmp_path))
    assert run.tasks == ("gsm8k",) and run.max_length == 1024


def test_ruler_tasks_through_the_lm_eval_cli_with_no_network(tiny_checkpoint, tmp_path):
    """A fresh process with no nltk data anywhere (HOME elsewhere) and the hubs offline: lm-eval's three RULER
    tasks and niah_restated load and run on the helix adapter, and nltk never tries a download (it would print
    "[nltk_data] ..." on a machine without network, and fetch punkt_tab into HOME on one with it)."""
    env = {**os.environ, "HOME": str(tmp_path), "PYTHONPATH": REPO, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    env.pop("NLTK_DATA", None)
    out = subprocess.run(
        [sys.executable, "-m", "evals.lm_eval_cli", "--model", "helix",
         "--model_args", f"pretrained={tiny_checkpoint},backend=reference,max_length=1152",
         "--tasks", "niah_single_1,niah_multikey_2,niah_multikey_3,niah_restated",
         "--metadata", json.dumps({"max_seq_lengths": [1024], "depths": [50]}), "--limit", "1",
         "--gen_kwargs", "max_gen_toks=4"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "nltk_data" not in out.stdout + out.stderr and not (tmp_path / "nltk_data").exists()
    for task in ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "niah_restated"):
        assert f"|{task}" in out.stdout.replace(" ", ""), out.stdout[-3000:]


def test_needle_run_through_helix_finds_every_needle_like_the_reference(needle_checkpoint, tmp_path):
    report = eval_run.run(parse("--model", str(needle_checkpoint), "--tasks", "niah_restated", "--context-lengths",
                                "1024", "--depths", "0,100", "--out", str(tmp_path)))
    run, = report["runs"]
    c = run["comparison"]["niah_restated"]
    assert report["passed"] and c["agreement"] == 1.0 and c["n"] == 2
    assert c["cells"] == [{"length": 1024, "depth": d, "n": 1, "deployed": 100.0, "reference": 100.0,
                           "agreement": 100.0} for d in (0, 100)]
    for side in ("deployed", "reference"):
        assert (tmp_path / f"niah_restated-{side}.png").read_bytes()[:4] == b"\x89PNG"
    with open(tmp_path / "results.json") as f:
        assert json.load(f)["runs"][0]["comparison"]["niah_restated"]["cells"] == c["cells"]
    report_md = (tmp_path / "report.md").read_text()
    assert "| 1024 | 100 | 1 |" in report_md and "![niah_restated deployed](niah_restated-deployed.png)" in report_md
