"""The run spec (helix/spec.py): one frozen, keyword-only description of a run, its execution switches resolved
from the environment once, where a command starts, and never read by the code that runs."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re

import pytest

from helix.config import ConfigError, HelixConfig
from helix.disagg.deploy import deployment_dict, from_checkpoint, load_deployment
from helix.spec import ContextServerConfig, Execution, RunSpec

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_execution_defaults_come_from_the_environment_then_overrides():
    assert Execution.from_env({}) == Execution()
    env = {"HELIX_KERNELS": "Torch", "HELIX_FUSE": "0", "HELIX_COLLECTIVE_TIMEOUT_S": "7.5"}
    assert Execution.from_env(env) == Execution(kernels="torch", fuse=False, collective_timeout_s=7.5)
    assert Execution.from_env(env, kernels="triton", microbatches=2).kernels == "triton"


@pytest.mark.parametrize("env, match", [
    ({"HELIX_KERNELS": "gpu"}, "HELIX_KERNELS='gpu': must be one of"),
    ({"HELIX_FUSE": "yes"}, "HELIX_FUSE='yes': must be 0"),
    ({"HELIX_COLLECTIVE_TIMEOUT_S": "soon"}, "HELIX_COLLECTIVE_TIMEOUT_S='soon'"),
    ({"HELIX_COLLECTIVE_TIMEOUT_S": "0"}, "HELIX_COLLECTIVE_TIMEOUT_S='0'"),
])
def test_bad_environment_values_are_refused_by_name(env, match):
    with pytest.raises(ConfigError, match=match):
        Execution.from_env(env)


def test_execution_refuses_bad_values():
    with pytest.raises(ConfigError, match="microbatches=0"):
        Execution(microbatches=0)
    with pytest.raises(ConfigError, match="kernels='fast'"):
        Execution(kernels="fast")


def test_run_spec_is_frozen_and_keyword_only(tiny_checkpoint):
    spec = RunSpec(model=str(tiny_checkpoint))
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.dtype = "bfloat16"
    with pytest.raises(TypeError):
        RunSpec(str(tiny_checkpoint))  # the positional form does not exist
    assert spec.world_size == 2 and spec.context_ranks == [] and spec.generation_ranks == [0, 1]


def test_rank_layout_of_a_deployment(tiny_checkpoint):
    spec = from_checkpoint(str(tiny_checkpoint), cp=3)
    assert (spec.context_ranks, spec.generation_ranks, spec.world_size) == ([0], [1, 2, 3], 4)
    cuda = dataclasses.replace(spec, device="cuda")
    assert cuda.devices() == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"] and cuda.handoff_device == "cuda"
    colocated = dataclasses.replace(cuda, context=dataclasses.replace(cuda.context, colocate=True))
    assert colocated.devices() == ["cuda:0", "cuda:0", "cuda:1", "cuda:2"] and colocated.handoff_device == "cpu"


def test_a_deployment_file_round_trips(tiny_checkpoint, tmp_path):
    spec = from_checkpoint(str(tiny_checkpoint), cp=3, tokens_per_block=16, max_tokens=4096)
    assert spec.generation == HelixConfig(context_parallel_size=3, tokens_per_block=16, max_tokens=4096)
    assert spec.context == ContextServerConfig(tokens_per_block=16, max_tokens=4096)
    assert load_deployment(deployment_dict(spec)) == spec
    path = tmp_path / "deploy.yaml"
    path.write_text(json.dumps(deployment_dict(spec)))
    assert dataclasses.replace(load_deployment(path), source=None) == spec


def test_a_deployment_file_takes_its_execution_from_the_environment(tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("HELIX_KERNELS", "torch")
    assert from_checkpoint(str(tiny_checkpoint)).execution.kernels == "torch"
    assert from_checkpoint(str(tiny_checkpoint), execution=Execution()).execution.kernels == "auto"


def test_launch_refuses_a_spec_without_a_context_server(tiny_checkpoint):
    with pytest.raises(ConfigError, match="context_servers: required"):
        load_deployment(RunSpec(model=str(tiny_checkpoint)))


@pytest.mark.parametrize("path", ["helix/model.py", "helix/attention.py", "helix/baselines.py", "helix/moe.py",
                                  "helix/rope.py", "helix/fusion.py", "helix/comm.py", "helix/engine.py",
                                  "helix/factory.py", "kernels/mla_decode.py", "kernels/helix_combine.py",
                                  "kernels/moe_decode.py", "kernels/_triton.py"])
def test_code_that_runs_reads_no_helix_switch_from_the_environment(path):
    """HELIX_KERNELS / HELIX_FUSE / HELIX_COLLECTIVE_TIMEOUT_S reach this code through the spec only."""
    source = (ROOT / path).read_text()
    assert not re.search(r"environ\.get\(\"HELIX_|getenv\(\"HELIX_", source), f"{path} reads a HELIX_ variable"
