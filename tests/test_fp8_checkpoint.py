"""FP8 block-scaled checkpoints (DeepSeek-V3/R1's format): the config keys, dequantization of whole tensors and of
every rank's slice against an independent float64 oracle (blocks cut by rank boundaries, partial edge blocks),
against transformers' own loader on multiple-of-128 shapes, and greedy generation through the reference, Helix
N = 2, 3 and the disaggregated deployment equal to the oracle's.

The oracle: block (i, j) of a weight covers rows 128 i .. 128 i + 127 and columns 128 j .. 128 j + 127 (edge blocks
partial) and is multiplied by weight_scale_inv[i, j], in float64, one block at a time from the raw files. A product
of an e4m3 value (4 significant bits) and a float32 scale (24) is exact in float64 and correctly rounded in
float32, so the loader must match the oracle bit for bit in both.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from helix.checkpoint import (Checkpoint, CheckpointError, block_scaled, make_checkpoint, scale_name, synthetic_tensors,
                              tensor_shapes)
from helix.config import ConfigError, ModelConfig
from helix.fp8 import FP8
from helix.presets import get_preset
from tests.tolerance import assert_exact

TINY = "deepseek-v3-lite-tiny"
FP8_KEYS = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
# Blocks that divide no dimension of the tiny preset: rank slices (N = 2, 3) cut blocks, edge blocks are partial.
ODD_BLOCKS = {**FP8_KEYS, "weight_block_size": [24, 40]}
# Every projection a multiple of 128 in both dimensions: transformers' loader applies (see docs/design.md §4.1).
SHAPES_128 = dict(hidden_size=256, intermediate_size=256, moe_intermediate_size=128, num_attention_heads=2,
                  kv_lora_rank=128, qk_nope_head_dim=128, qk_rope_head_dim=128, v_head_dim=128, num_hidden_layers=2,
                  n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1)


def oracle_weights(path) -> dict[str, torch.Tensor]:
    """Every model tensor of the FP8 checkpoint at ``path``, dequantized block by block in float64."""
    cfg = ModelConfig.from_json(path)
    raw = load_file(path / "model.safetensors")
    bm, bn = cfg.quantization_config.weight_block_size
    out = {}
    for name in tensor_shapes(cfg):
        w = raw[name].double()
        if block_scaled(name):
            scale = raw[scale_name(name)]
            for i in range(scale.shape[0]):
                for j in range(scale.shape[1]):
                    w[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn] *= float(scale[i, j])
        out[name] = w
    return out


@pytest.fixture(scope="module")
def odd_fp8(checkpoint_factory):
    return checkpoint_factory(dtype="fp8", quantization_config=ODD_BLOCKS)


# --------------------------------------------------------------------------------------------- format


def test_config_accepts_the_fp8_format_with_its_exact_keys(checkpoint_factory):
    path = checkpoint_factory(dtype="fp8")
    assert json.loads((path / "config.json").read_text())["quantization_config"] == FP8_KEYS
    assert ModelConfig.from_json(path).quantization_config.weight_block_size == (128, 128)
    raw = load_file(path / "model.safetensors")
    cfg = ModelConfig.from_json(path)
    for name, shape in tensor_shapes(cfg).items():  # projections FP8 with a scale each, the rest as the format has it
        want = FP8 if block_scaled(name) else torch.float32 if name.endswith("bias") else torch.bfloat16
        assert raw[name].dtype == want, name
        if block_scaled(name):
            assert raw[scale_name(name)].dtype == torch.float32
            assert raw[scale_name(name)].shape == (-(-shape[0] // 128), -(-shape[1] // 128)), name
    assert not any(block_scaled(n) for n in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight"))


@pytest.mark.parametrize("q, key, value, rule", [
    ({"quant_method": "gptq", "bits": 4}, "quantization_config.quant_method", "gptq", "only 'fp8'"),
    ({"quant_method": "awq"}, "quantization_config.quant_method", "awq", "other quantization methods are refused"),
    ("fp8", "quantization_config", "fp8", "must be a mapping"),
    ({**FP8_KEYS, "activation_scheme": "static"}, "quantization_config.activation_scheme", "static", "must be 'dynamic'"),
    ({**FP8_KEYS, "fmt": "e5m2"}, "quantization_config.fmt", "e5m2", "must be 'e4m3'"),
    ({k: v for k, v in FP8_KEYS.items() if k != "fmt"}, "quantization_config.fmt", None, "must be 'e4m3'"),
    ({**FP8_KEYS, "modules_to_not_convert": ["lm_head"]}, "quantization_config.modules_to_not_convert", ["lm_head"],
     "unknown key"),
    ({**FP8_KEYS, "weight_block_size": [128]}, "quantization_config.weight_block_size", [128], "[rows, columns]"),
])
def test_other_quantizations_are_refused_by_name(q, key, value, rule):
    with pytest.raises(ConfigError) as err:
        get_preset(TINY, quantization_config=q)
    assert f"{key}={value!r}" in str(err.value) and rule in str(err.value), str(err.value)


def test_storage_that_contradicts_the_config_is_named(tmp_path, checkpoint_factory):
    fp8 = checkpoint_factory(dtype="fp8")
    (tmp_path / "plain").mkdir()
    cfg = json.loads((fp8 / "config.json").read_text())
    (tmp_path / "plain" / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "quantization_config"}))
    (tmp_path / "plain" / "model.safetensors").symlink_to(fp8 / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"_proj.weight': stored as F8_E4M3, but config.json has no quantization_config"):
        Checkpoint(tmp_path / "plain").check_complete()
    tensors = load_file(fp8 / "model.safetensors")
    del tensors["model.layers.1.self_attn.o_proj.weight_scale_inv"]
    (tmp_path / "noscale").mkdir()
    (tmp_path / "noscale" / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, tmp_path / "noscale" / "model.safetensors")
    with pytest.raises(CheckpointError, match="o_proj.weight_scale_inv' is missing .*expected shape \\(1, 2\\)"):
        Checkpoint(tmp_path / "noscale").check_complete()


def test_dry_run_counts_fp8_bytes():
    plan = make_checkpoint("deepseek-v3-lite", "unused", dtype="fp8", dry_run=True)
    bf16 = make_checkpoint("deepseek-v3-lite", "unused", dry_run=True)
    assert plan.parameters == bf16.parameters and plan.tensors > bf16.tensors
    assert 0.5 * bf16.bytes < plan.bytes < 0.55 * bf16.bytes  # projections at 1 byte, embeddings/head at 2


# --------------------------------------------------------------------------------------------- dequantization


def test_writer_rounds_each_weight_to_its_nearest_e4m3_step(odd_fp8):
    """The quantizer: every value within half an e4m3 step (3 mantissa bits; subnormal step 2^-9) of its scale."""
    cfg = ModelConfig.from_json(odd_fp8)
    exact = dict(synthetic_tensors(cfg, seed=0))
    c = Checkpoint(odd_fp8)
    bm, bn = cfg.quantization_config.weight_block_size
    for name in filter(block_scaled, tensor_shapes(cfg)):
        got, want = c.get(name, dtype=torch.float64), exact[name].double()
        scale = c.get(scale_name(name), dtype=torch.float64)
        scale = scale.repeat_interleave(bm, 0).repeat_interleave(bn, 1)[:want.shape[0], :want.shape[1]]
        step = torch.maximum(want.abs() / scale, torch.full_like(want, 2.0 ** -6)).log2().floor().exp2() * 2.0 ** -3
        assert ((got - want).abs() <= 0.5 * step * scale * (1 + 1e-12)).all(), name
        assert (want.abs() / scale).amax() <= 448.0 * (1 + 1e-6), name


@pytest.mark.parametrize("block", ["odd", "128"])
def test_every_rank_slice_equals_the_float64_oracle(odd_fp8, checkpoint_factory, block):
    path = odd_fp8 if block == "odd" else checkpoint_factory(dtype="fp8")
    want = oracle_weights(path)
    c = Checkpoint(path)
    for name, w in want.items():
        assert_exact(c.get(name, dtype=torch.float64), w, f"{name} whole, float64")
        assert_exact(c.get(name, dtype=torch.float32), w.float(), f"{name} whole, float32")
        if w.dim() != 2:
            continue
        for dim in (0, 1):
            for n in (2, 3):  # rank slices as the runtime cuts them, plus one uneven cut
                size = w.shape[dim]
                cuts = sorted({*(r * size // n for r in range(n + 1)), size // 3 + 1})
                for lo, hi in zip(cuts, cuts[1:]):
                    part = c.get(name, dim, lo, hi, dtype=torch.float64)
                    assert_exact(part, w.narrow(dim, lo, hi - lo), f"{name} [{lo}:{hi}] along dim {dim}")


def test_a_slice_reads_only_its_blocks(odd_fp8):
    c = Checkpoint(odd_fp8)
    name = "model.layers.1.self_attn.o_proj.weight"  # [96, 192], scale grid [4, 5] of 24 x 40 blocks
    before = c.bytes_read
    c.get(name, 1, 64, 128)  # columns 64..127: blocks 1..3
    assert c.bytes_read - before == 96 * 64 + 4 * 3 * 4


def test_transformers_dequantizes_the_same_weights(checkpoint_factory):
    """transformers' FineGrainedFP8Config(dequantize=True) on shapes that are multiples of 128 (its loader derives
    the block size from rows // scale rows, so partial blocks are checked against the oracle above instead)."""
    from transformers import DeepseekV3ForCausalLM, FineGrainedFP8Config

    path = checkpoint_factory(dtype="fp8", **SHAPES_128)
    hf = DeepseekV3ForCausalLM.from_pretrained(path, quantization_config=FineGrainedFP8Config(dequantize=True),
                                               dtype=torch.float32).state_dict()
    c = Checkpoint(path)
    cfg = c.config
    for layer in range(cfg.num_hidden_layers):  # transformers fuses the routed experts: [E, 2 I, D] and [E, D, I]
        if cfg.is_moe_layer(layer):
            p = f"model.layers.{layer}.mlp.experts."
            experts = range(cfg.n_routed_experts)
            hf[p + "gate_up_proj"] = hf[p + "gate_up_proj"].split(cfg.moe_intermediate_size, dim=1)
            for e in experts:
                hf[f"{p}{e}.gate_proj.weight"] = hf[p + "gate_up_proj"][0][e]
                hf[f"{p}{e}.up_proj.weight"] = hf[p + "gate_up_proj"][1][e]
                hf[f"{p}{e}.down_proj.weight"] = hf[p + "down_proj"][e]
    for name in tensor_shapes(cfg):
        assert_exact(c.get(name, dtype=torch.float32), hf[name].float(), f"{name}: helix vs transformers")


# --------------------------------------------------------------------------------------------- generation


PROMPTS = [list(range(40, 77)), [3, 1, 4, 1, 5]]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def oracle_tokens(odd_fp8, tmp_path_factory):
    """Greedy tokens of the float64 reference on the oracle's weights, written as a float32 checkpoint (exact)."""
    from helix.checkpoint import write_safetensors
    from helix.reference import ReferenceModel

    out = tmp_path_factory.mktemp("oracle")
    cfg = json.loads((odd_fp8 / "config.json").read_text())
    del cfg["quantization_config"]
    (out / "config.json").write_text(json.dumps(cfg))
    write_safetensors(((n, w.float()) for n, w in oracle_weights(odd_fp8).items()), str(out))
    ref = ReferenceModel.from_checkpoint(out, dtype=torch.float64)
    return [ref.generate(p, NEW_TOKENS) for p in PROMPTS]


def test_reference_on_fp8_gives_the_oracle_tokens(odd_fp8, oracle_tokens):
    from helix.reference import ReferenceModel

    ref = ReferenceModel.from_checkpoint(odd_fp8, dtype=torch.float64)
    assert [ref.generate(p, NEW_TOKENS) for p in PROMPTS] == oracle_tokens


@pytest.mark.parametrize("n", [2, 3])
def test_helix_on_fp8_gives_the_oracle_tokens(rank_pool, odd_fp8, oracle_tokens, n):
    from helix.engine import Request
    from helix.config import HelixConfig
    from helix.runner import helix_generate
    from helix.sampling import SamplingParams
    from helix.spec import RunSpec

    spec = RunSpec(model=str(odd_fp8), generation=HelixConfig(context_parallel_size=n, tokens_per_block=4,
                                                              max_tokens=128, max_batch_size=2))
    results = helix_generate(spec, [Request(i, p, SamplingParams(max_new_tokens=NEW_TOKENS))
                                    for i, p in enumerate(PROMPTS)], rank_pool)
    assert [r.token_ids for r in results] == oracle_tokens


def test_disaggregated_deployment_on_fp8_gives_the_oracle_tokens(odd_fp8, oracle_tokens):
    from helix.disagg import launch
    from helix.sampling import SamplingParams
    from tests.disagg.conftest import deployment

    with launch(deployment(odd_fp8, n=3)) as cluster:
        assert cluster.generate(PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS)) == oracle_tokens
