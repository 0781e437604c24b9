"""Model and deployment configuration.

``ModelConfig`` fields are the keys of a Hugging Face ``config.json`` (model_type ``deepseek_v3`` or
``deepseek_v2``); only keys that change the math are kept, everything the project cannot honour fails
loudly. ``HelixConfig`` holds the generation-server keys of docs/design.md §4.2, spelled as in TensorRT-LLM's Helix
feature documentation so a user can copy theirs.

Every validation error is a ``ConfigError`` whose message names the key, the value and the rule.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v2")


class ConfigError(ValueError):
    """An invalid or unsupported setting, named by key, value and rule."""


def fail(key: str, value: Any, rule: str) -> None:
    raise ConfigError(f"{key}={value!r}: {rule}")


# --------------------------------------------------------------------------------------------- RoPE


@dataclass
class RopeScaling:
    """YaRN parameters (DeepSeek's long-context RoPE). ``rope_type`` "default" means plain RoPE."""

    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0

    @classmethod
    def parse(cls, raw: dict | None, key: str) -> "RopeScaling":
        """Accept both spellings: the older ``rope_scaling: {"type": "yarn", ...}`` and the newer
        ``rope_parameters: {"rope_type": "yarn", "rope_theta": ..., ...}``."""
        if not raw:
            return cls()
        raw = dict(raw)
        raw.pop("rope_theta", None)
        kind = raw.pop("rope_type", None) or raw.pop("type", None) or "default"
        raw.pop("type", None)
        if kind not in ("default", "yarn"):
            fail(f"{key}.rope_type", kind, "only 'yarn' (DeepSeek's YaRN) and 'default' RoPE are supported")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            fail(f"{key}.{unknown[0]}", raw[unknown[0]], f"unknown RoPE parameter; known: {sorted(known - {'rope_type'})}")
        out = cls(rope_type=kind, **raw)
        if kind == "yarn":
            if out.factor is None or out.factor < 1:
                fail(f"{key}.factor", out.factor, "YaRN factor must be >= 1")
            if not out.original_max_position_embeddings:
                fail(f"{key}.original_max_position_embeddings", out.original_max_position_embeddings,
                      "YaRN needs the original context length")
        return out

    @property
    def is_yarn(self) -> bool:
        return self.rope_type == "yarn"

    def to_hf(self, rope_theta: float) -> dict:
        d = {"rope_type": self.rope_type, "rope_theta": rope_theta}
        if self.is_yarn:
            d.update({k: v for k, v in dataclasses.asdict(self).items() if k != "rope_type"})
        return d


def yarn_mscale(scale: float, mscale: float) -> float:
    """DeepSeek's YaRN magnitude correction: 0.1 * mscale * ln(scale) + 1 (1 when scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


# --------------------------------------------------------------------------------------------- model


@dataclass
class ModelConfig:
    """A DeepSeek-V2/V3 model. Field names are Hugging Face ``config.json`` keys."""

    model_type: str = "deepseek_v3"
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    n_shared_experts: int = 1
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    n_group: int = 8
    topk_group: int = 4
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    rope_interleave: bool = True
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 163840
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1

    # Keys read and checked but not kept: they must hold these values (or be absent).
    _FIXED = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}
    # Keys that never change the math of a decode step.
    _IGNORED = {
        "architectures", "auto_map", "torch_dtype", "dtype", "transformers_version", "use_cache",
        "initializer_range", "attention_dropout", "pad_token_id", "num_key_value_heads", "head_dim",
        "aux_loss_alpha", "seq_aux", "output_router_logits", "router_aux_loss_coef", "ep_size",
        "num_nextn_predict_layers", "num_mtp_layers", "_name_or_path", "qk_head_dim", "tie_encoder_decoder",
        "return_dict", "output_hidden_states", "output_attentions", "chunk_size_feed_forward",
        "is_encoder_decoder", "id2label", "label2id", "problem_type", "tokenizer_class", "model_name",
    }

    def __post_init__(self):
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        self.kv_cache_dim = self.kv_lora_rank + self.qk_rope_head_dim  # values per token per layer
        # Softmax scale of MLA: 1/sqrt(P+R), times mscale(factor, mscale_all_dim)^2 under YaRN.
        self.softmax_scale = self.qk_head_dim ** -0.5
        if self.rope_scaling.is_yarn and self.rope_scaling.mscale_all_dim:
            m = yarn_mscale(self.rope_scaling.factor, self.rope_scaling.mscale_all_dim)
            self.softmax_scale *= m * m
        self.validate()

    # ---------------------------------------------------------------- reading and writing
    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        raw = dict(raw)
        mt = raw.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            fail("model_type", mt, f"supported model types are {list(SUPPORTED_MODEL_TYPES)}")
        if raw.get("quantization_config"):
            q = raw["quantization_config"]
            method = q.get("quant_method", q) if isinstance(q, dict) else q
            fail("quantization_config", method, "quantized checkpoints (e.g. FP8 block-scaled) are not supported; "
                  "use a bf16/fp16/fp32 checkpoint")
        for key, want in cls._FIXED.items():
            if key in raw and raw[key] != want:
                fail(key, raw[key], f"only {want!r} is supported")
        # RoPE: newer `rope_parameters` (holds rope_theta) or older `rope_theta` + `rope_scaling`.
        if raw.get("rope_parameters"):
            params = raw.pop("rope_parameters")
            if "rope_theta" in params:
                raw["rope_theta"] = params["rope_theta"]
            raw.pop("rope_scaling", None)
            raw["rope_scaling"] = RopeScaling.parse(params, "rope_parameters")
        else:
            raw["rope_scaling"] = RopeScaling.parse(raw.get("rope_scaling"), "rope_scaling")
        defaults = _MODEL_TYPE_DEFAULTS[mt]
        for key, value in defaults.items():
            if raw.get(key) is None:
                raw[key] = value
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in raw.items():
            if key in names:
                kwargs[key] = value
            elif key not in cls._IGNORED and key not in cls._FIXED and key not in ("rope_scaling", "rope_parameters"):
                fail(key, value, "unknown config key; it may change the model's math, so it is refused rather than "
                      "ignored")
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ModelConfig":
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.exists(path):
            raise ConfigError(f"config={path!r}: no such file; a checkpoint directory must hold config.json")
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_hf_dict(self) -> dict:
        """A ``config.json`` that transformers' DeepseekV3/V2 classes and this project both read."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d.pop("rope_scaling")
        d["rope_parameters"] = self.rope_scaling.to_hf(self.rope_theta)
        arch = "DeepseekV3ForCausalLM" if self.model_type == "deepseek_v3" else "DeepseekV2ForCausalLM"
        d.update(architectures=[arch], hidden_act="silu", attention_bias=False, num_key_value_heads=self.num_attention_heads,
                 head_dim=self.qk_rope_head_dim)
        if self.model_type == "deepseek_v3":
            d["num_nextn_predict_layers"] = 0
        else:  # transformers' V2 config has no scoring_func key: softmax is implied.
            d.pop("scoring_func")
        return d

    # ---------------------------------------------------------------- derived
    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace and layer % self.moe_layer_freq == 0

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))

    def num_parameters(self) -> dict[str, int]:
        """Parameter count by part, from the shapes alone (MTP layers excluded)."""
        D, H = self.hidden_size, self.num_attention_heads
        if self.q_lora_rank:
            q = D * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * H * self.qk_head_dim
        else:
            q = D * H * self.qk_head_dim
        attn = (q + D * self.kv_cache_dim + self.kv_lora_rank
                + self.kv_lora_rank * H * (self.qk_nope_head_dim + self.v_head_dim) + H * self.v_head_dim * D)
        norms = 2 * D
        dense_mlp = 3 * D * self.intermediate_size
        expert = 3 * D * self.moe_intermediate_size
        moe = (self.n_routed_experts + self.n_shared_experts) * expert + self.n_routed_experts * D
        if self.model_type == "deepseek_v3":
            moe += self.n_routed_experts  # e_score_correction_bias
        n_moe = sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))
        n_dense = self.num_hidden_layers - n_moe
        embed = self.vocab_size * D
        head = 0 if self.tie_word_embeddings else self.vocab_size * D
        parts = {
            "attention": self.num_hidden_layers * attn,
            "norms": self.num_hidden_layers * norms + D,
            "dense_mlp": n_dense * dense_mlp,
            "moe": n_moe * moe,
            "embedding": embed,
            "lm_head": head,
        }
        parts["total"] = sum(parts.values())
        return parts

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        positive = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "intermediate_size"]
        for key in positive:
            v = getattr(self, key)
            if not isinstance(v, int) or v <= 0:
                fail(key, v, "must be a positive integer")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            fail("q_lora_rank", self.q_lora_rank, "must be null (no query compression) or a positive integer")
        if self.qk_rope_head_dim % 2:
            fail("qk_rope_head_dim", self.qk_rope_head_dim, "RoPE rotates pairs: must be even")
        if self.moe_layer_freq < 1:
            fail("moe_layer_freq", self.moe_layer_freq, "must be >= 1")
        has_moe = any(self.is_moe_layer(i) for i in range(self.num_hidden_layers))
        if has_moe:
            if self.n_routed_experts <= 0:
                fail("n_routed_experts", self.n_routed_experts, "MoE layers need n_routed_experts > 0")
            if self.moe_intermediate_size <= 0:
                fail("moe_intermediate_size", self.moe_intermediate_size, "MoE layers need moe_intermediate_size > 0")
            if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
                fail("num_experts_per_tok", self.num_experts_per_tok, f"must be in [1, n_routed_experts={self.n_routed_experts}]")
            if self.n_group < 1 or self.n_routed_experts % self.n_group:
                fail("n_group", self.n_group, f"must divide n_routed_experts={self.n_routed_experts}")
            if not 1 <= self.topk_group <= self.n_group:
                fail("topk_group", self.topk_group, f"must be in [1, n_group={self.n_group}]")
            if self.num_experts_per_tok > self.topk_group * (self.n_routed_experts // self.n_group):
                fail("num_experts_per_tok", self.num_experts_per_tok,
                      "must not exceed the experts in the topk_group selected groups")
        if self.model_type == "deepseek_v3":
            if self.scoring_func != "sigmoid":
                fail("scoring_func", self.scoring_func, "deepseek_v3 routing is 'sigmoid' (with e_score_correction_bias)")
            if self.topk_method != "noaux_tc":
                fail("topk_method", self.topk_method, "deepseek_v3 routing is 'noaux_tc'")
            if has_moe and self.n_group > 1 and (self.n_routed_experts // self.n_group) < 2:
                fail("n_group", self.n_group, "V3 group scores sum the top-2 experts of a group: groups need >= 2 experts")
        else:
            if self.scoring_func != "softmax":
                fail("scoring_func", self.scoring_func, "deepseek_v2 routing is 'softmax'")
            if self.topk_method not in ("greedy", "group_limited_greedy"):
                fail("topk_method", self.topk_method, "deepseek_v2 routing is 'greedy' or 'group_limited_greedy'")


_MODEL_TYPE_DEFAULTS = {
    "deepseek_v3": {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "n_group": 1, "topk_group": 1},
    "deepseek_v2": {"scoring_func": "softmax", "topk_method": "greedy", "n_group": 1, "topk_group": 1,
                    "norm_topk_prob": False, "routed_scaling_factor": 1.0, "rope_interleave": True,
                    "first_k_dense_replace": 0},
}


# --------------------------------------------------------------------------------------------- Helix


@dataclass(frozen=True, kw_only=True)
class HelixConfig:
    """Generation-server keys (docs/design.md §4.2), as in TensorRT-LLM's Helix documentation::

        {"context_parallel_size": 2,
         "cp_config": {"cp_type": "HELIX", "tokens_per_block": 32},
         "kv_cache_config": {"tokens_per_block": 32, "max_tokens": 65536}}

    ``max_tokens`` is the KV capacity per sequence slot summed over all ranks; ``moe_parallel`` picks expert
    parallel ("ep", default) or tensor parallel ("tp") for routed experts.
    """

    context_parallel_size: int = 2
    cp_type: str = "HELIX"
    tokens_per_block: int = 32
    max_tokens: int = 8192
    max_batch_size: int = 8
    moe_parallel: str = "ep"

    @classmethod
    def from_dict(cls, raw: dict, prefix: str = "") -> "HelixConfig":
        raw = dict(raw)
        cp = dict(raw.pop("cp_config", None) or {})
        kv = dict(raw.pop("kv_cache_config", None) or {})
        allowed_top = {"context_parallel_size", "max_batch_size", "moe_parallel", "tensor_parallel_size"}
        for key in raw:
            if key not in allowed_top:
                fail(prefix + key, raw[key], f"unknown generation-server key; known: {sorted(allowed_top | {'cp_config', 'kv_cache_config'})}")
        for key in cp:
            if key not in ("cp_type", "tokens_per_block"):
                fail(prefix + "cp_config." + key, cp[key], "unknown key; cp_config takes cp_type and tokens_per_block")
        for key in kv:
            if key not in ("tokens_per_block", "max_tokens"):
                fail(prefix + "kv_cache_config." + key, kv[key], "unknown key; kv_cache_config takes tokens_per_block and max_tokens")
        tp = raw.get("tensor_parallel_size", 1)
        if tp != 1:
            fail(prefix + "tensor_parallel_size", tp, "Helix MLA uses TPA = 1; the N context-parallel ranks are re-used as "
                  "TP ranks for the FFN automatically, so leave tensor_parallel_size at 1")
        if "tokens_per_block" not in cp and "tokens_per_block" not in kv:
            fail(prefix + "cp_config.tokens_per_block", None, "required (and must equal kv_cache_config.tokens_per_block)")
        tpb = cp.get("tokens_per_block", kv.get("tokens_per_block"))
        if kv.get("tokens_per_block", tpb) != tpb:
            fail(prefix + "kv_cache_config.tokens_per_block", kv["tokens_per_block"],
                 f"must equal cp_config.tokens_per_block={tpb}: Helix ownership is decided per KV-cache block")
        out = cls(
            context_parallel_size=raw.get("context_parallel_size", cls.context_parallel_size),
            cp_type=cp.get("cp_type", "HELIX"),
            tokens_per_block=tpb,
            max_tokens=kv.get("max_tokens", cls.max_tokens),
            max_batch_size=raw.get("max_batch_size", cls.max_batch_size),
            moe_parallel=raw.get("moe_parallel", cls.moe_parallel),
        )
        out.validate(prefix)
        return out

    def validate(self, prefix: str = "") -> None:
        if self.cp_type != "HELIX":
            fail(prefix + "cp_config.cp_type", self.cp_type, "must be 'HELIX' (the only context-parallel decode mode here)")
        n = self.context_parallel_size
        if not isinstance(n, int) or n < 2:
            fail(prefix + "context_parallel_size", n, "must be an integer >= 2 with cp_type HELIX "
                  "(use the reference backend for one device)")
        t = self.tokens_per_block
        if not isinstance(t, int) or t < 1:
            fail(prefix + "cp_config.tokens_per_block", t, "must be a positive integer")
        if not isinstance(self.max_tokens, int) or self.max_tokens < t:
            fail(prefix + "kv_cache_config.max_tokens", self.max_tokens, f"must be an integer >= tokens_per_block={t}")
        if not isinstance(self.max_batch_size, int) or self.max_batch_size < 1:
            fail(prefix + "max_batch_size", self.max_batch_size, "must be a positive integer")
        if self.moe_parallel not in ("ep", "tp"):
            fail(prefix + "moe_parallel", self.moe_parallel, "must be 'ep' (expert parallel) or 'tp' (tensor parallel)")

    def validate_for_model(self, model: ModelConfig, prefix: str = "") -> None:
        """Divisibility rules between the model and N (heads for the all-to-all, experts for EP, FFN widths for TP)."""
        n = self.context_parallel_size
        key = prefix + "context_parallel_size"
        if model.num_attention_heads % n:
            fail(key, n, f"must divide num_attention_heads={model.num_attention_heads} (the all-to-all splits heads)")
        has_moe = any(model.is_moe_layer(i) for i in range(model.num_hidden_layers))
        if has_moe and self.moe_parallel == "ep" and model.n_routed_experts % n:
            fail(key, n, f"must divide n_routed_experts={model.n_routed_experts} for expert parallelism "
                  "(or set moe_parallel 'tp')")
        if has_moe and self.moe_parallel == "tp" and model.moe_intermediate_size % n:
            fail(key, n, f"must divide moe_intermediate_size={model.moe_intermediate_size} for tensor-parallel experts")
        if has_moe and (model.moe_intermediate_size * model.n_shared_experts) % n:
            fail(key, n, f"must divide the shared-expert width {model.moe_intermediate_size * model.n_shared_experts}")
        if model.first_k_dense_replace > 0 and model.intermediate_size % n:
            fail(key, n, f"must divide intermediate_size={model.intermediate_size} (dense MLP is tensor parallel)")

    def to_dict(self) -> dict:
        return {
            "context_parallel_size": self.context_parallel_size,
            "cp_config": {"cp_type": self.cp_type, "tokens_per_block": self.tokens_per_block},
            "kv_cache_config": {"tokens_per_block": self.tokens_per_block, "max_tokens": self.max_tokens},
            "max_batch_size": self.max_batch_size,
            "moe_parallel": self.moe_parallel,
        }
