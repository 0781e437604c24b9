"""Named model shapes, as Hugging Face ``config.json`` dictionaries.

* ``deepseek-v3-lite``: the DeepSeek-V3-Lite shape used by TensorRT-LLM's Helix tests and accuracy
  references (hidden 2560, 32 heads, no q_lora, 72 routed experts top-6, one group, sigmoid routing with a
  correction bias). About 27 B parameters, ~54 GB in bf16.
* ``deepseek-v3-lite-tiny``: the same structure sized for a 2-core CPU (first layer dense, group-limited
  routing with n_group > 1 and topk_group < n_group, YaRN), head / expert / FFN widths divisible by 2, 3, 4.
* ``deepseek-v3-needle``: a small V3 whose weights are constructed to retrieve needles up to 2^20 tokens
  (helix/needle.py); ``helix make-checkpoint`` writes those weights instead of random ones.
* ``deepseek-v2-lite``: the public DeepSeek-V2-Lite ``config.json`` (softmax routing, greedy top-k).
"""

from __future__ import annotations

import copy

from helix.config import ConfigError, ModelConfig

_YARN_V3 = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0,
            "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}

PRESETS: dict[str, dict] = {
    "deepseek-v3-lite": {
        "model_type": "deepseek_v3",
        "hidden_size": 2560,
        "num_attention_heads": 32,
        "q_lora_rank": None,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "n_routed_experts": 72,
        "num_experts_per_tok": 6,
        "n_group": 1,
        "topk_group": 1,
        "routed_scaling_factor": 2.0,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "norm_topk_prob": True,
        # Inferred, not published for V3-Lite: taken from the public configs of the same family
        # (DeepSeek-V2-Lite: 2 shared experts, moe_intermediate 1408, first layer dense; V3: YaRN x40 over 4K,
        # vocab 129280), rounded to the V3-Lite width so the total lands at ~27 B parameters.
        "num_hidden_layers": 30,
        "vocab_size": 129280,
        "n_shared_experts": 2,
        "moe_intermediate_size": 1536,
        "intermediate_size": 12288,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "rope_theta": 10000.0,
        "rope_scaling": _YARN_V3,
        "rope_interleave": True,
        "max_position_embeddings": 163840,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
    },
    "deepseek-v3-lite-tiny": {
        "model_type": "deepseek_v3",
        "vocab_size": 384,  # 256 bytes + specials, padded: not a multiple of 3 or 5 (uneven vocab shards)
        "hidden_size": 96,
        "intermediate_size": 192,
        "moe_intermediate_size": 48,
        "num_hidden_layers": 4,
        "num_attention_heads": 12,
        "q_lora_rank": None,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "n_routed_experts": 12,
        "num_experts_per_tok": 4,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "n_group": 4,
        "topk_group": 2,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "rope_theta": 10000.0,
        "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 512,
                         "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
        "rope_interleave": True,
        "max_position_embeddings": 16384,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "bos_token_id": 256,
        "eos_token_id": 257,
    },
    # Weights constructed, not random (helix/needle.py): a copy circuit that retrieves needles at up to 2^20
    # tokens. 12 heads (Helix N = 2, 3, 4), 12 experts in 4 groups, YaRN x32 over 32K to 1M positions.
    "deepseek-v3-needle": {
        "model_type": "deepseek_v3",
        "vocab_size": 320,  # 259 byte-tokenizer ids, padded; not a multiple of 3 (uneven vocab shards at N = 3)
        "hidden_size": 128,
        "intermediate_size": 48,
        "moe_intermediate_size": 24,
        "num_hidden_layers": 2,
        "num_attention_heads": 12,
        "q_lora_rank": None,
        "kv_lora_rank": 128,
        "qk_nope_head_dim": 96,
        "qk_rope_head_dim": 32,
        "v_head_dim": 16,
        "n_routed_experts": 12,
        "num_experts_per_tok": 4,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "n_group": 4,
        "topk_group": 2,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "rope_theta": 10000.0,
        "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 32768,
                         "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
        "rope_interleave": True,
        "max_position_embeddings": 1048576,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "bos_token_id": 256,
        "eos_token_id": 257,
    },
    # https://huggingface.co/deepseek-ai/DeepSeek-V2-Lite/blob/main/config.json
    "deepseek-v2-lite": {
        "model_type": "deepseek_v2",
        "vocab_size": 102400,
        "hidden_size": 2048,
        "intermediate_size": 10944,
        "moe_intermediate_size": 1408,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "q_lora_rank": None,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "n_routed_experts": 64,
        "num_experts_per_tok": 6,
        "n_shared_experts": 2,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "n_group": 1,
        "topk_group": 1,
        "topk_method": "greedy",
        "scoring_func": "softmax",
        "norm_topk_prob": False,
        "routed_scaling_factor": 1.0,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                         "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707},
        "max_position_embeddings": 163840,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "bos_token_id": 100000,
        "eos_token_id": 100001,
    },
}


CONSTRUCTED = ("deepseek-v3-needle",)  # presets whose checkpoint weights are written down, not drawn


def preset_dict(name: str) -> dict:
    if name not in PRESETS:
        raise ConfigError(f"preset={name!r}: unknown preset; choose one of {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def get_preset(name: str, **overrides) -> ModelConfig:
    """The preset as a ModelConfig; ``overrides`` replace config.json keys (e.g. q_lora_rank=24)."""
    d = preset_dict(name)
    d.update(overrides)
    return ModelConfig.from_dict(d)
