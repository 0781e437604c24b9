"""Model and Helix configuration: every validation rule names the key, the value and the rule; RoPE in both
spellings; the presets and their parameter counts."""

from __future__ import annotations

import math

import pytest

from helix.checkpoint import tensor_shapes
from helix.config import ConfigError, HelixConfig, ModelConfig
from helix.presets import PRESETS, get_preset, preset_dict

TINY_YARN = preset_dict("deepseek-v3-lite-tiny")["rope_scaling"]


def assert_names(err: pytest.ExceptionInfo, key: str, value, rule: str) -> None:
    msg = str(err.value)
    assert f"{key}={value!r}" in msg and rule in msg, f"message {msg!r} lacks {key}={value!r} or {rule!r}"


# (preset, config.json overrides, key, value, a phrase of the rule)
MODEL_RULES = [
    ("deepseek-v3-lite-tiny", {"model_type": "llama"}, "model_type", "llama", "supported model types"),
    ("deepseek-v3-lite-tiny", {"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}},
     "quantization_config.quant_method", "bitsandbytes", "only 'fp8'"),
    ("deepseek-v3-lite-tiny", {"hidden_act": "gelu"}, "hidden_act", "gelu", "only 'silu'"),
    ("deepseek-v3-lite-tiny", {"attention_bias": True}, "attention_bias", True, "only False"),
    ("deepseek-v3-lite-tiny", {"mlp_bias": True}, "mlp_bias", True, "only False"),
    ("deepseek-v3-lite-tiny", {"pretraining_tp": 2}, "pretraining_tp", 2, "only 1"),
    ("deepseek-v3-lite-tiny", {"sliding_window": 4096}, "sliding_window", 4096, "unknown config key"),
    ("deepseek-v3-lite-tiny", {"rope_scaling": {"type": "linear", "factor": 2.0}},
     "rope_scaling.rope_type", "linear", "only 'yarn'"),
    ("deepseek-v3-lite-tiny", {"rope_scaling": None, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}},
     "rope_parameters.rope_type", "dynamic", "only 'yarn'"),
    ("deepseek-v3-lite-tiny", {"rope_scaling": {**TINY_YARN, "attention_factor": 1.2}},
     "rope_scaling.attention_factor", 1.2, "unknown RoPE parameter"),
    ("deepseek-v3-lite-tiny", {"rope_scaling": {**TINY_YARN, "factor": 0.5}}, "rope_scaling.factor", 0.5, "must be >= 1"),
    ("deepseek-v3-lite-tiny", {"rope_scaling": {**TINY_YARN, "original_max_position_embeddings": None}},
     "rope_scaling.original_max_position_embeddings", None, "original context length"),
    *[("deepseek-v3-lite-tiny", {key: 0}, key, 0, "positive integer")
      for key in ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                  "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "intermediate_size"]],
    ("deepseek-v3-lite-tiny", {"hidden_size": 95.5}, "hidden_size", 95.5, "positive integer"),
    ("deepseek-v3-lite-tiny", {"q_lora_rank": 0}, "q_lora_rank", 0, "null (no query compression)"),
    ("deepseek-v3-lite-tiny", {"qk_rope_head_dim": 7}, "qk_rope_head_dim", 7, "must be even"),
    ("deepseek-v3-lite-tiny", {"moe_layer_freq": 0}, "moe_layer_freq", 0, "must be >= 1"),
    ("deepseek-v3-lite-tiny", {"n_routed_experts": 0}, "n_routed_experts", 0, "MoE layers need"),
    ("deepseek-v3-lite-tiny", {"moe_intermediate_size": 0}, "moe_intermediate_size", 0, "moe_intermediate_size > 0"),
    ("deepseek-v3-lite-tiny", {"num_experts_per_tok": 13}, "num_experts_per_tok", 13, "[1, n_routed_experts=12]"),
    ("deepseek-v3-lite-tiny", {"n_group": 5}, "n_group", 5, "must divide n_routed_experts=12"),
    ("deepseek-v3-lite-tiny", {"topk_group": 5}, "topk_group", 5, "[1, n_group=4]"),
    ("deepseek-v3-lite-tiny", {"num_experts_per_tok": 7}, "num_experts_per_tok", 7, "topk_group selected groups"),
    ("deepseek-v3-lite-tiny", {"scoring_func": "softmax"}, "scoring_func", "softmax", "'sigmoid'"),
    ("deepseek-v3-lite-tiny", {"topk_method": "greedy"}, "topk_method", "greedy", "'noaux_tc'"),
    ("deepseek-v3-lite-tiny", {"n_group": 12, "topk_group": 4}, "n_group", 12, "groups need >= 2 experts"),
    ("deepseek-v2-lite", {"scoring_func": "sigmoid"}, "scoring_func", "sigmoid", "'softmax'"),
    ("deepseek-v2-lite", {"topk_method": "noaux_tc"}, "topk_method", "noaux_tc", "'greedy' or 'group_limited_greedy'"),
]


@pytest.mark.parametrize("preset,overrides,key,value,rule", MODEL_RULES,
                         ids=[f"{k}={v!r}" for _, _, k, v, _ in MODEL_RULES])
def test_model_rule_names_key_value_rule(preset, overrides, key, value, rule):
    raw = preset_dict(preset)
    raw.update(overrides)
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict(raw)
    assert_names(err, key, value, rule)


def test_missing_config_json_names_path(tmp_path):
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_json(tmp_path)
    assert_names(err, "config", str(tmp_path / "config.json"), "must hold config.json")


def test_both_rope_spellings_parse_to_the_same_config():
    old = preset_dict("deepseek-v3-lite-tiny")
    yarn = {k: v for k, v in old["rope_scaling"].items() if k != "rope_type"}
    old["rope_scaling"] = {"type": "yarn", **yarn}
    new = preset_dict("deepseek-v3-lite-tiny")
    theta = new.pop("rope_theta")
    new.pop("rope_scaling")
    new["rope_parameters"] = {"rope_type": "yarn", "rope_theta": theta, **yarn}
    a, b = ModelConfig.from_dict(old), ModelConfig.from_dict(new)
    assert a == b
    assert a.rope_scaling.is_yarn and a.rope_theta == theta
    # The written config.json (new spelling) reads back to the same config.
    assert ModelConfig.from_dict(a.to_hf_dict()) == a


def test_yarn_softmax_scale():
    cfg = get_preset("deepseek-v3-lite")
    m = 0.1 * cfg.rope_scaling.mscale_all_dim * math.log(cfg.rope_scaling.factor) + 1.0
    assert cfg.softmax_scale == pytest.approx(cfg.qk_head_dim ** -0.5 * m * m, rel=1e-12)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_load_and_count_parameters_by_schema(name):
    cfg = get_preset(name)
    assert cfg.to_hf_dict()["model_type"] == cfg.model_type
    assert cfg.num_parameters()["total"] == sum(math.prod(s) for s in tensor_shapes(cfg).values())


def test_v3_lite_is_about_27b_parameters():
    cfg = get_preset("deepseek-v3-lite")
    total = cfg.num_parameters()["total"]
    assert total == 27_033_548_328
    assert abs(total - 27.0e9) < 0.05e9
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.q_lora_rank, cfg.n_routed_experts, cfg.num_experts_per_tok) == (
        2560, 32, None, 72, 6)


def test_unknown_preset_is_named():
    with pytest.raises(ConfigError) as err:
        get_preset("deepseek-v4")
    assert_names(err, "preset", "deepseek-v4", "unknown preset")


# --------------------------------------------------------------------------------------------- Helix

HELIX_OK = {"context_parallel_size": 2, "cp_config": {"cp_type": "HELIX", "tokens_per_block": 32},
            "kv_cache_config": {"tokens_per_block": 32}}


def helix(**changes) -> dict:
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in HELIX_OK.items()}
    for key, value in changes.items():
        section, _, sub = key.partition("__")
        if sub:
            raw[section][sub] = value
        else:
            raw[section] = value
    return raw


def test_helix_documented_example_parses():
    cfg = HelixConfig.from_dict(HELIX_OK)
    assert (cfg.context_parallel_size, cfg.cp_type, cfg.tokens_per_block) == (2, "HELIX", 32)
    assert HelixConfig.from_dict(cfg.to_dict()) == cfg


HELIX_RULES = [
    (helix(pipeline_parallel_size=2), "pipeline_parallel_size", 2, "unknown generation-server key"),
    (helix(cp_config__cp_anchor_size=4), "cp_config.cp_anchor_size", 4, "cp_config takes cp_type and tokens_per_block"),
    (helix(kv_cache_config__free_gpu_memory_fraction=0.9), "kv_cache_config.free_gpu_memory_fraction", 0.9,
     "kv_cache_config takes tokens_per_block, max_tokens and dtype"),
    (helix(kv_cache_config__dtype="int8"), "kv_cache_config.dtype", "int8", "must be 'auto' (the model's dtype) or 'fp8'"),
    (helix(tensor_parallel_size=2), "tensor_parallel_size", 2, "TPA = 1"),
    (helix(cp_config={"cp_type": "HELIX"}, kv_cache_config={}), "cp_config.tokens_per_block", None, "required"),
    (helix(cp_config__cp_type="ULYSSES"), "cp_config.cp_type", "ULYSSES", "must be 'HELIX'"),
    (helix(context_parallel_size=1), "context_parallel_size", 1, "integer >= 2 with cp_type HELIX"),
    (helix(cp_config__tokens_per_block=0, kv_cache_config__tokens_per_block=0), "cp_config.tokens_per_block", 0,
     "positive integer"),
    (helix(kv_cache_config__tokens_per_block=64), "kv_cache_config.tokens_per_block", 64,
     "must equal cp_config.tokens_per_block=32"),
    (helix(kv_cache_config__max_tokens=16), "kv_cache_config.max_tokens", 16, ">= tokens_per_block=32"),
    (helix(max_batch_size=0), "max_batch_size", 0, "positive integer"),
    (helix(moe_parallel="dp"), "moe_parallel", "dp", "'ep' (expert parallel) or 'tp'"),
]


@pytest.mark.parametrize("raw,key,value,rule", HELIX_RULES, ids=[f"{k}={v!r}" for _, k, v, _ in HELIX_RULES])
def test_helix_rule_names_key_value_rule(raw, key, value, rule):
    with pytest.raises(ConfigError) as err:
        HelixConfig.from_dict(raw)
    assert_names(err, key, value, rule)


def test_helix_prefix_locates_the_key_in_a_deployment_file():
    with pytest.raises(ConfigError) as err:
        HelixConfig.from_dict(helix(context_parallel_size=1), prefix="generation_servers.")
    assert_names(err, "generation_servers.context_parallel_size", 1, ">= 2")


# (N, moe_parallel, tiny-preset overrides, the model width named in the rule)
DIVISIBILITY_RULES = [
    (8, "ep", {}, "num_attention_heads=12"),
    (3, "ep", {"n_routed_experts": 20}, "n_routed_experts=20"),
    (4, "tp", {"moe_intermediate_size": 50}, "moe_intermediate_size=50"),
    (4, "ep", {"moe_intermediate_size": 50}, "the shared-expert width 50"),
    (4, "ep", {"intermediate_size": 190}, "intermediate_size=190"),
]


@pytest.mark.parametrize("n,moe_parallel,overrides,rule", DIVISIBILITY_RULES, ids=[r for *_, r in DIVISIBILITY_RULES])
def test_helix_divisibility_by_n(n, moe_parallel, overrides, rule):
    model = get_preset("deepseek-v3-lite-tiny", **overrides)
    cfg = HelixConfig.from_dict(helix(context_parallel_size=n, moe_parallel=moe_parallel))
    with pytest.raises(ConfigError) as err:
        cfg.validate_for_model(model)
    assert_names(err, "context_parallel_size", n, "must divide " + rule)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_tiny_preset_fits_helix_2_3_4(n):
    HelixConfig.from_dict(helix(context_parallel_size=n)).validate_for_model(get_preset("deepseek-v3-lite-tiny"))
