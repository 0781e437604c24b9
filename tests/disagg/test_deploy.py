"""Every deployment-file rule fails before any process starts, with a message naming the key, the value and the
rule; YAML and JSON files load to the same deployment."""

import json
import shutil

import pytest

from helix.config import ConfigError
from helix.disagg import launch, load_deployment
from tests.disagg.conftest import deployment, with_key as _with


@pytest.fixture(scope="module")
def good(tiny_checkpoint) -> dict:
    return deployment(tiny_checkpoint, n=2)


# (dotted path, new value, substrings of the message: key=value, rule)
RULES = [
    ("generation_servers.cp_config.cp_type", "ULYSSES", ["generation_servers.cp_config.cp_type='ULYSSES'", "must be 'HELIX'"]),
    ("generation_servers.context_parallel_size", 1, ["generation_servers.context_parallel_size=1", "integer >= 2 with cp_type HELIX"]),
    ("generation_servers.kv_cache_config.tokens_per_block", 8,
     ["generation_servers.kv_cache_config.tokens_per_block=8", "must equal cp_config.tokens_per_block=4"]),
    ("context_servers.kv_cache_config.tokens_per_block", 8,
     ["context_servers.kv_cache_config.tokens_per_block=8", "must equal generation_servers.cp_config.tokens_per_block=4"]),
    ("context_servers.kv_cache_config.tokens_per_block", ...,
     ["context_servers.kv_cache_config.tokens_per_block=None", "required, and must equal"]),
    ("generation_servers.context_parallel_size", 5,
     ["generation_servers.context_parallel_size=5", "must divide num_attention_heads=12"]),
    ("context_servers.tensor_parallel_size", 5,
     ["context_servers.tensor_parallel_size=5", "must divide num_attention_heads=12"]),
    ("context_servers.tensor_parallel_size", 0, ["context_servers.tensor_parallel_size=0", "integer >= 1"]),
    ("generation_servers.kv_cache_config.max_tokens", 2,
     ["generation_servers.kv_cache_config.max_tokens=2", "must be an integer >= tokens_per_block=4"]),
    ("model.path", "/nonexistent/ckpt", ["model.path='/nonexistent/ckpt'", "no such directory", "helix make-checkpoint"]),
    ("model.dtype", "float64", ["model.dtype='float64'", "must be one of ['float32', 'bfloat16']"]),
    ("model.device", "tpu", ["model.device='tpu'", "must be 'cpu' (gloo) or 'cuda'"]),
    ("model.revision", "main", ["model.revision='main'", "unknown key; model takes"]),
    ("generation_servers.cp_config.block_size", 4, ["generation_servers.cp_config.block_size=4", "unknown key"]),
    ("context_servers.batch", 4, ["context_servers.batch=4", "unknown key; context_servers takes"]),
    ("context_servers.colocate", "yes", ["context_servers.colocate='yes'", "must be true or false"]),
    ("generation_servers", ..., ["generation_servers=None", "required section"]),
    ("servers", {}, ["servers={}", "unknown section"]),
]


@pytest.mark.parametrize("path,value,expected", RULES, ids=[f"{p}={v!r}" for p, v, _ in RULES])
def test_rule_names_key_value_and_rule(good, path, value, expected):
    with pytest.raises(ConfigError) as info:
        launch(_with(good, path, value))  # must fail in validation: no process is started
    for part in expected:
        assert part in str(info.value), f"{part!r} not in {info.value}"


def test_experts_not_divisible(checkpoint_factory):
    # 12 heads (divisible by 3), 16 experts (not): expert parallelism cannot split them.
    ckpt = checkpoint_factory(n_routed_experts=16)
    with pytest.raises(ConfigError, match=r"generation_servers.context_parallel_size=3: must divide n_routed_experts=16"):
        load_deployment(deployment(ckpt, n=3))


def test_mismatched_checkpoint_tensor_is_named_with_both_shapes(tiny_checkpoint, tmp_path):
    broken = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["kv_lora_rank"] += 8
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"model.path=.*tensor '.*kv_a.*': checkpoint shape \(\d+, \d+\) != shape"):
        load_deployment(deployment(broken))


def test_yaml_and_json_files_load_alike_and_errors_name_the_file(good, tmp_path):
    yaml = pytest.importorskip("yaml")
    (tmp_path / "d.yaml").write_text(yaml.safe_dump(good))
    (tmp_path / "d.json").write_text(json.dumps(good))
    from_yaml, from_json = load_deployment(tmp_path / "d.yaml"), load_deployment(tmp_path / "d.json")
    assert from_yaml.generation == from_json.generation and from_yaml.context == from_json.context
    assert from_yaml.generation_ranks == [1, 2] and from_yaml.devices() == ["cpu"] * 3
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_with(good, "generation_servers.cp_config.cp_type", "helix")))
    with pytest.raises(ConfigError, match=rf"^{bad}: generation_servers.cp_config.cp_type='helix': must be 'HELIX'"):
        load_deployment(bad)
    (tmp_path / "broken.yaml").write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML/JSON"):
        load_deployment(tmp_path / "broken.yaml")
    with pytest.raises(ConfigError, match="no such deployment file"):
        load_deployment(tmp_path / "missing.yaml")


def test_rank_layout_on_gpus_and_the_colocated_context_server(good):
    """Context 1 + Helix CP 2: 3 GPUs, NCCL everywhere; colocated, the context server shares GPU 0 with generation
    rank 0 (2 GPUs), its group with the generation ranks is gloo and the KV hand-over travels via host memory."""
    from helix.comm import backend_for

    cuda = _with(good, "model.device", "cuda")
    apart, together = load_deployment(cuda), load_deployment(_with(cuda, "context_servers.colocate", True))
    assert apart.devices() == ["cuda:0", "cuda:1", "cuda:2"] and apart.handoff_device == "cuda"
    assert together.devices() == ["cuda:0", "cuda:0", "cuda:1"] and together.handoff_device == "cpu"
    assert backend_for(apart.devices()) == "nccl" and backend_for(together.devices()) == "gloo"
    assert backend_for([together.devices()[r] for r in together.generation_ranks]) == "nccl"


def test_rank_layout_of_a_tensor_parallel_context_server(good):
    """Context TP 2 + Helix CP 2: context ranks 0-1, generation ranks 2-3, one GPU each; generation rank g gets its
    blocks from context rank g mod 2."""
    from helix.disagg.kv_transfer import kv_sender

    spec = load_deployment(_with(_with(good, "model.device", "cuda"), "context_servers.tensor_parallel_size", 2))
    assert (spec.context_ranks, spec.generation_ranks) == ([0, 1], [2, 3])
    assert spec.devices() == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"] and spec.handoff_device == "cuda"
    assert [kv_sender(g, spec.context_ranks) for g in range(2)] == [0, 1]
    assert [kv_sender(g, [0, 1]) for g in range(3)] == [0, 1, 0]
    assert spec.role_of(1) == "context server rank 1 (world rank 1)"
    assert spec.role_of(2) == "generation server rank 0 (world rank 2)"
