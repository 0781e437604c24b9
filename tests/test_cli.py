"""The ``helix`` command: generate (JSON contract, embedded default), make-checkpoint, one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helix.checkpoint import Checkpoint
from helix.cli import main
from helix.presets import get_preset
from helix.reference import ReferenceModel
from helix.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def reference_tokens(model_dir, prompt_ids: list[int], n: int) -> list[int]:
    model = ReferenceModel.from_checkpoint(model_dir)
    return model.generate(prompt_ids, n, eos_token_ids=model.cfg.eos_token_ids)


@pytest.mark.parametrize("prompt", [["--prompt", "The capital of France is\n"], ["--prompt-ids", "256,1,2,3,300,383"]])
def test_generate_json_holds_the_reference_tokens(tiny_checkpoint, capsys, prompt):
    n = 12
    assert main(["generate", "--model", str(tiny_checkpoint), *prompt, "--max-new-tokens", str(n),
                 "--backend", "reference", "--json"]) == 0
    out = last_json(capsys.readouterr().out)
    tok = load_tokenizer(tiny_checkpoint)
    prompt_ids = tok(prompt[1])["input_ids"] if prompt[0] == "--prompt" else [int(i) for i in prompt[1].split(",")]
    want = reference_tokens(tiny_checkpoint, prompt_ids, n)
    assert out["token_ids"] == want
    assert len(want) == n or want[-1] in get_preset("deepseek-v3-lite-tiny").eos_token_ids
    assert out["text"] == tok.decode(want, skip_special_tokens=True)


def test_generate_without_model_writes_and_uses_the_embedded_default(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HELIX_HOME", str(tmp_path))
    args = ["generate", "--prompt", "Hi", "--max-new-tokens", "4", "--dtype", "bfloat16", "--json"]
    assert main(args) == 0
    first = last_json(capsys.readouterr().out)
    default = tmp_path / "deepseek-v3-lite-tiny"
    Checkpoint(default).check_complete()
    assert 1 <= len(first["token_ids"]) <= 4
    assert main(args) == 0  # second run reuses the checkpoint and is deterministic
    assert last_json(capsys.readouterr().out) == first


def test_make_checkpoint_writes_a_loadable_checkpoint(tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert main(["make-checkpoint", "--preset", "deepseek-v3-lite-tiny", "--out", str(out), "--seed", "3",
                 "--dtype", "float32"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    c = Checkpoint(out)
    c.check_complete()
    assert c.config == get_preset("deepseek-v3-lite-tiny")
    assert c.get("model.embed_tokens.weight").dtype == torch.float32


def test_fp8_checkpoint_from_the_command_line_decodes_as_the_reference(tmp_path, capsys):
    """As a new user would: make-checkpoint --dtype fp8, then generate with Helix CP 2 prints the reference's tokens."""
    out = tmp_path / "fp8"
    assert main(["make-checkpoint", "--preset", "deepseek-v3-lite-tiny", "--dtype", "fp8", "--out", str(out)]) == 0
    assert "as fp8" in capsys.readouterr().out
    assert main(["generate", "--model", str(out), "--prompt-ids", "256,1,2,3,300,383", "--max-new-tokens", "12",
                 "--backend", "helix", "--cp", "2", "--json"]) == 0
    assert last_json(capsys.readouterr().out)["token_ids"] == reference_tokens(out, [256, 1, 2, 3, 300, 383], 12)


def test_make_checkpoint_dry_run_prints_the_formula_count(tmp_path, capsys):
    assert main(["make-checkpoint", "--preset", "deepseek-v3-lite", "--dry-run"]) == 0
    out = capsys.readouterr().out
    total = get_preset("deepseek-v3-lite").num_parameters()["total"]
    assert f"{total:,} parameters" in out and f"{2 * total:,} bytes" in out and "nothing written" in out


@pytest.fixture
def bad_config_checkpoint(tiny_checkpoint, tmp_path) -> Path:
    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["hidden_act"] = "gelu"
    (bad / "config.json").write_text(json.dumps(cfg))
    return bad


NOT_FINITE = "step 1: logits hold NaN or inf (a non-finite weight or an overflow of the compute dtype)"


@pytest.mark.parametrize("case", ["bad-config", "no-weights", "no-tokenizer", "prompt-id-out-of-vocab", "non-empty-out",
                                  "truncated-weights", "truncated-weights-helix", "nan-weight", "nan-weight-helix"])
def test_errors_are_one_line_and_exit_non_zero(case, tiny_checkpoint, bad_config_checkpoint, truncated_checkpoint,
                                               nan_checkpoint, tmp_path, capsys):
    no_weights, no_tokenizer = tmp_path / "no-weights", tmp_path / "no-tokenizer"
    shutil.copytree(tiny_checkpoint, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    shutil.copytree(tiny_checkpoint, no_tokenizer, ignore=shutil.ignore_patterns("tokenizer*"))
    gen = ["generate", "--max-new-tokens", "2", "--json", "--model"]
    truncated = f"{truncated_checkpoint}/model.safetensors: not a valid safetensors file"
    helix = ["--backend", "helix", "--cp", "2", "--tokens-per-block", "2"]
    args, expected = {
        "bad-config": (gen + [str(bad_config_checkpoint), "--prompt", "x"], "hidden_act='gelu': only 'silu'"),
        "no-weights": (gen + [str(no_weights), "--prompt-ids", "1"], "holds neither model.safetensors"),
        "no-tokenizer": (gen + [str(no_tokenizer), "--prompt-ids", "1"], "no loadable tokenizer files"),
        "prompt-id-out-of-vocab": (gen + [str(tiny_checkpoint), "--prompt-ids", "1,384"],
                                   "--prompt-ids=384: token ids must be in [0, vocab_size=384)"),
        "non-empty-out": (["make-checkpoint", "--preset", "deepseek-v3-lite-tiny", "--out", str(tiny_checkpoint)],
                          "not an empty directory"),
        "truncated-weights": (gen + [str(truncated_checkpoint), "--prompt-ids", "1"], truncated),
        # checked by the driver before the ranks start: no rank's traceback
        "truncated-weights-helix": (gen + [str(truncated_checkpoint), "--prompt-ids", "1", *helix], truncated),
        "nan-weight": (gen + [str(nan_checkpoint), "--prompt-ids", "1,2,3"], "reference request 0, " + NOT_FINITE),
        "nan-weight-helix": (gen + [str(nan_checkpoint), "--prompt-ids", "1,2,3", *helix],
                             "1 of 1 requests failed: helix request 0, " + NOT_FINITE),
    }[case]
    assert main(args) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("helix: error: ") and expected in lines[0], captured.err


def test_console_entry_point_reports_a_bad_config_without_traceback(bad_config_checkpoint):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "helix", "generate", "--model", str(bad_config_checkpoint),
                          "--prompt", "x", "--max-new-tokens", "2"], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 1
    assert run.stderr.strip() == "helix: error: hidden_act='gelu': only 'silu' is supported", run.stderr


def test_generate_under_torchrun_prints_the_reference_tokens_once(tiny_checkpoint):
    """The multi-GPU launch path (one process per rank, env:// rendezvous), run on CPU with gloo."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    prompt_ids, n = [256, 1, 2, 3, 300], 8
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "helix", "generate", "--model", str(tiny_checkpoint), "--backend", "helix", "--cp", "2",
                          "--tokens-per-block", "2", "--prompt-ids", ",".join(map(str, prompt_ids)),
                          "--max-new-tokens", str(n), "--json"],
                         capture_output=True, text=True, env=env, timeout=180)
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, run.stdout  # only rank 0 prints
    assert json.loads(lines[0])["token_ids"] == reference_tokens(tiny_checkpoint, prompt_ids, n)


def test_the_runtime_does_not_import_the_accuracy_suite():
    """helix/ sits below evals/: `python -m helix` has the runtime's subcommands and loads nothing of evals; the
    installed `helix` (evals/cli.py, also `python -m evals`) adds `eval`."""
    code = ("import sys, helix.cli, helix.disagg, helix.runner, helix.bench, helix.serve.server, helix.bench_serve; "
            "assert not [m for m in sys.modules if m.split('.')[0] == 'evals'], 'helix imported evals'; "
            "helix.cli.build_parser().parse_args(['generate', '--prompt', 'x', '--max-new-tokens', '1'])")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    from evals.cli import COMMANDS

    parser_help = subprocess.run([sys.executable, "-m", "evals", "--help"], capture_output=True, text=True, cwd=REPO)
    assert (parser_help.returncode == 0
            and "{generate,make-checkpoint,eval,serve,bench,bench-serve}" in parser_help.stdout), parser_help.stdout
    assert [c.__name__ for c in COMMANDS] == ["add_generate", "add_make_checkpoint", "add_eval", "add_serve", "add_bench",
                                              "add_bench_serve"]
