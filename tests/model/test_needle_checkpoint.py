"""The constructed retrieval checkpoint (helix/needle.py) as a specification: a real MLA + MoE DeepSeek-V3 model
whose weights copy a needle's value out of a haystack, with the margins its docstring quotes, every FFN and
expert in use, and the same tokens from the reference, transformers and Helix on N = 2, 3 ranks."""

from __future__ import annotations

import pytest
import torch

from helix.needle import FFN_DENSE, FFN_ROUTED, FFN_SHARED, PRESET, margins
from helix.presets import get_preset
from helix.reference import ReferenceModel, mlp, rms_norm, route
from helix.tokenizer import load_tokenizer
from tests.tolerance import assert_exact, assert_f32_parity

HAYSTACK = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
VALUE = "4823190"


def needle_prompt(sentences: int, depth: float, key: str = "hungry-elephant") -> str:
    """niah_single_1's layout (repeated sentences, one needle at ``depth``), answer prefix restating the needle."""
    lines = [HAYSTACK] * sentences
    lines.insert(round(depth * sentences), f"One of the special magic numbers for {key} is: {VALUE}.")
    return ("A special magic number is hidden within the following text. Make sure to memorize it.\n"
            + "\n".join(lines) + f"\nWhat is the special magic number for {key} mentioned in the provided text?"
            f" One of the special magic numbers for {key} is:")


@pytest.fixture(scope="module")
def tokenizer(needle_checkpoint):
    return load_tokenizer(needle_checkpoint)


def test_preset_is_a_real_mla_moe_model():
    cfg = get_preset(PRESET)
    assert cfg.kv_lora_rank > 0 and cfg.qk_rope_head_dim > 0 and cfg.q_lora_rank is None
    assert cfg.rope_scaling.is_yarn and cfg.max_position_embeddings >= 1 << 20
    assert cfg.num_attention_heads >= 8 and not cfg.is_moe_layer(0) and cfg.is_moe_layer(1)
    assert cfg.n_routed_experts >= 8 and cfg.num_experts_per_tok >= 2 and cfg.n_shared_experts >= 1


def test_margins_at_a_million_tokens():
    m = margins(get_preset(PRESET))
    # ln(2^20) = 13.9: each margin leaves < 1e-5 of the attention weight off the right position at 2^20 tokens.
    assert m["previous_token"] >= 27 and m["content_per_bit"] >= 32 and m["logit"] >= 10, m


def test_every_ffn_and_expert_contributes(needle_checkpoint, tokenizer):
    ref = ReferenceModel.from_checkpoint(needle_checkpoint)
    cfg, layer = ref.cfg, ref.layers[1]["mlp"]
    x = rms_norm(ref.embed[torch.arange(256)], ref.layers[1]["ffn_norm"], cfg.rms_norm_eps)  # every byte
    dense = mlp(rms_norm(ref.embed[:256], ref.layers[0]["ffn_norm"], cfg.rms_norm_eps), ref.layers[0]["mlp"], "")
    assert dense[:, FFN_DENSE].abs().min() > 0
    ids, weights = route(cfg, x @ layer["gate.weight"].T, layer["gate.e_score_correction_bias"])
    assert set(ids.flatten().tolist()) == set(range(cfg.n_routed_experts)), "every expert is chosen by some byte"
    for e in range(cfg.n_routed_experts):
        w = {f"{n}.weight": layer["experts." + n][e] for n in ("gate_proj", "up_proj", "down_proj")}
        chosen = (ids == e).any(-1)
        assert mlp(x[chosen], w, "")[:, FFN_ROUTED].abs().min() > 0, f"expert {e}"
    assert mlp(x, layer, "shared_experts.")[:, FFN_SHARED].abs().min() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_retrieves_at_every_depth(needle_checkpoint, tokenizer, dtype):
    ref = ReferenceModel.from_checkpoint(needle_checkpoint, dtype=dtype)
    for depth in (0.0, 0.5, 1.0):
        ids = tokenizer(needle_prompt(16, depth)).input_ids
        assert tokenizer.decode(ref.generate(ids, 10)) == f" {VALUE}.\n", depth


def test_transformers_gives_the_same_logits_and_tokens(needle_checkpoint, tokenizer):
    from tests.model.test_reference_vs_hf import hf_model

    ids = torch.tensor([tokenizer(needle_prompt(4, 0.5)).input_ids])
    ref = ReferenceModel.from_checkpoint(needle_checkpoint, dtype=torch.float64)
    hf = hf_model(str(needle_checkpoint))  # float32: its fused experts (torch._grouped_mm) take no float64
    with torch.no_grad():
        assert_f32_parity(hf(ids).logits[0].float(), ref.forward(ids)[0], "needle checkpoint: transformers vs reference")
        out = hf.generate(ids, max_new_tokens=10, do_sample=False)[0, ids.shape[1]:]
    assert tokenizer.decode(out) == f" {VALUE}.\n"


@pytest.mark.parametrize("n", [2, 3])
def test_helix_retrieves_like_the_reference(rank_pool, needle_checkpoint, tokenizer, n):
    from helix.config import HelixConfig
    from helix.engine import Request
    from helix.runner import helix_generate
    from helix.sampling import SamplingParams
    from helix.spec import RunSpec

    prompts = [tokenizer(needle_prompt(6, d)).input_ids for d in (0.0, 0.7)]
    ref = ReferenceModel.from_checkpoint(needle_checkpoint, dtype=torch.float64)
    expected = [ref.generate(p, 10, return_logits=True) for p in prompts]
    spec = RunSpec(model=str(needle_checkpoint),
                   generation=HelixConfig(context_parallel_size=n, tokens_per_block=16, max_tokens=1024,
                                          max_batch_size=2))
    results = helix_generate(spec, [Request(i, p, SamplingParams(max_new_tokens=10), keep_logits=True)
                                    for i, p in enumerate(prompts)], rank_pool)
    for res, (tokens, logits) in zip(results, expected):
        assert res.error is None, res.error
        assert tokenizer.decode(res.token_ids) == f" {VALUE}.\n"
        assert_exact(torch.tensor(res.token_ids), torch.tensor(tokens), f"N={n} request {res.req_id}")
        for step, (a, b) in enumerate(zip(res.logits, logits)):
            assert_f32_parity(a, b, f"N={n} request {res.req_id} step {step}")
