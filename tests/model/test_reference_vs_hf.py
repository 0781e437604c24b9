"""The oracle checked against transformers' DeepseekV3ForCausalLM / DeepseekV2ForCausalLM.

Each model shape is a synthetic checkpoint of the tiny preset with overrides, written with helix.checkpoint
(tests/conftest.py) and loaded by transformers with ``from_pretrained(dir)``, so both sides read the same
files through their own loading code. Shapes cover:
V3 without q_lora (group-limited sigmoid routing, YaRN x32, interleaved RoPE); V3 with q_lora, YaRN x4 over
an original context of 32 (positions well beyond it), mscale != mscale_all_dim and non-interleaved RoPE;
V2 with softmax greedy routing; V2 with group_limited_greedy and q_lora. Logits and the MLA layer are checked
with both of the reference's attentions ("plain", "sdpa").
"""

from __future__ import annotations

import pytest
import torch
import transformers

from helix.config import ModelConfig
from helix.presets import get_preset
from helix.reference import ATTENTION, ReferenceModel, mla_reference, route
from tests.tolerance import assert_bf16_policy, assert_exact, assert_f32_parity

SMALL_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32.0,
              "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.8}
V2_ROUTING = {"model_type": "deepseek_v2", "scoring_func": "softmax", "n_group": 1, "topk_group": 1,
              "topk_method": "greedy", "norm_topk_prob": False, "routed_scaling_factor": 1.5,
              "max_position_embeddings": 163840,
              "rope_scaling": {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                               "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707}}
SHAPES = {
    "v3": {},
    "v3-qlora-yarn32": {"q_lora_rank": 24, "rope_scaling": SMALL_YARN, "max_position_embeddings": 128,
                        "rope_interleave": False},
    "v2-greedy": V2_ROUTING,
    "v2-group-qlora": {**V2_ROUTING, "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
                       "q_lora_rank": 24},
}
FORWARD_LEN = 112  # positions compared in one full forward (past original_max_position_embeddings=32)
PROMPT_LEN, NEW_TOKENS = 24, 40


@pytest.fixture(scope="session")
def checkpoint_dir(checkpoint_factory):
    """shape name -> directory of its synthetic float32 checkpoint (tests/conftest.py writes each once)."""
    return lambda shape: str(checkpoint_factory(seed=7, **SHAPES[shape]))


def hf_model(path: str, dtype: torch.dtype = torch.float32):
    cfg = ModelConfig.from_json(path)
    cls = transformers.DeepseekV3ForCausalLM if cfg.model_type == "deepseek_v3" else transformers.DeepseekV2ForCausalLM
    model = cls.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()
    model.generation_config.eos_token_id = None  # compare a fixed number of tokens on both sides
    return model


def token_ids(n: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", list(SHAPES))
def test_logits_match_hf(shape, checkpoint_dir):
    path = checkpoint_dir(shape)
    hf = hf_model(path)
    ids = token_ids(FORWARD_LEN, hf.config.vocab_size, seed=1)[None]
    with torch.no_grad():
        want = hf(ids).logits.float()
    for dtype in (torch.float32, torch.float64):
        for attention in ATTENTION:
            got = ReferenceModel.from_checkpoint(path, dtype=dtype, attention=attention).forward(ids)
            assert_f32_parity(got, want, f"{shape} {dtype} {attention} reference vs transformers logits over "
                                         f"{FORWARD_LEN} positions")


@pytest.mark.parametrize("shape", list(SHAPES))
def test_greedy_tokens_match_hf_generate(shape, checkpoint_dir):
    path = checkpoint_dir(shape)
    hf = hf_model(path)
    prompt = token_ids(PROMPT_LEN, hf.config.vocab_size, seed=2)
    with torch.no_grad():
        want = hf.generate(prompt[None], max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)[0, PROMPT_LEN:]
    got = ReferenceModel.from_checkpoint(path).generate(prompt.tolist(), NEW_TOKENS)
    assert_exact(torch.tensor(got), want, f"{shape}: greedy tokens, reference (incremental) vs transformers generate")


@pytest.mark.parametrize("shape", ["v3", "v2-group-qlora"])
def test_incremental_decode_matches_full_forward(shape, checkpoint_dir):
    ref = ReferenceModel.from_checkpoint(checkpoint_dir(shape), dtype=torch.float64)
    ids = token_ids(PROMPT_LEN + NEW_TOKENS, ref.cfg.vocab_size, seed=3)
    full = ref.forward(ids[None])[0]
    logits, cache = ref.prefill(ids[:PROMPT_LEN].tolist())
    steps = [ref.decode(int(t), cache) for t in ids[PROMPT_LEN:-1]]
    assert cache.length == len(ids) - 1
    assert_f32_parity(torch.cat([logits, torch.stack(steps)]), full[:-1], f"{shape}: prefill + decode vs forward")

    # generate's logits are the decode logits of its own tokens.
    gen, gen_logits = ref.generate(ids[:PROMPT_LEN].tolist(), 8, return_logits=True)
    full = ref.forward(torch.tensor([ids[:PROMPT_LEN].tolist() + gen[:-1]]))[0, PROMPT_LEN - 1:]
    assert_exact(torch.tensor(gen), full.argmax(-1), f"{shape}: generate vs argmax of forward")
    assert_f32_parity(torch.stack(gen_logits), full, f"{shape}: generate's logits vs forward")


def test_generate_stops_at_eos(checkpoint_dir):
    ref = ReferenceModel.from_checkpoint(checkpoint_dir("v3"))
    prompt = token_ids(PROMPT_LEN, ref.cfg.vocab_size, seed=2).tolist()
    free = ref.generate(prompt, 12)
    assert ref.generate(prompt, 12, eos_token_ids=(free[4],)) == free[:free.index(free[4]) + 1]


def test_score_is_log_softmax_of_forward(checkpoint_dir):
    ref = ReferenceModel.from_checkpoint(checkpoint_dir("v3"), dtype=torch.float64)
    ids = token_ids(30, ref.cfg.vocab_size, seed=4)
    context, continuation = ids[:20].tolist(), ids[20:].tolist()
    continuation[3] = int(ref.forward(torch.tensor([context + continuation[:3]]))[0, -1].argmax())  # one greedy hit
    logp, greedy = ref.score(context, continuation)
    logits = ref.forward(torch.tensor([context + continuation]))[0, 19:-1].double()
    want = logits.log_softmax(-1).gather(1, torch.tensor(continuation)[:, None])[:, 0]
    assert_f32_parity(torch.tensor(logp, dtype=torch.float64), want, "score log-probs")
    assert greedy == (logits.argmax(-1) == torch.tensor(continuation)).tolist() and greedy[3]


def _hf_attention(path: str, dtype: torch.dtype, layer: int = 1):
    attn = hf_model(path, dtype).model.layers[layer].self_attn
    return attn, {name: t.detach() for name, t in attn.state_dict().items()}


@pytest.mark.parametrize("attention", list(ATTENTION))
def test_mla_layer_matches_hf_attention(checkpoint_dir, attention):
    """The module-level entry point the runtime's parity tests call, against transformers' attention module."""
    path = checkpoint_dir("v3-qlora-yarn32")
    cfg = ModelConfig.from_json(path)
    attn, w = _hf_attention(path, torch.float32)
    x = torch.randn(1, 50, cfg.hidden_size, generator=torch.Generator().manual_seed(5))
    positions = torch.arange(50)[None]
    mask = torch.full((50, 50), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        want, _ = attn(hidden_states=x, position_embeddings=hf_model(path).model.rotary_emb(x, positions),
                       attention_mask=mask)
    head, head_kv = mla_reference(cfg, w, x[0, :30], positions[0, :30], None, ATTENTION[attention])
    tail, (k, v) = mla_reference(cfg, w, x[0, 30:], positions[0, 30:], head_kv, ATTENTION[attention])
    H = cfg.num_attention_heads
    assert k.shape == (H, 50, cfg.qk_head_dim) and v.shape == (H, 50, cfg.v_head_dim)
    assert_f32_parity(torch.cat([head, tail]), want[0], f"{attention} mla_reference (30 tokens, then 20 more) vs "
                                                        "transformers")


@pytest.mark.parametrize("attention", list(ATTENTION))
@pytest.mark.parametrize("shape", ["v3", "v2-greedy"])
def test_mla_layer_bf16_within_policy(shape, checkpoint_dir, attention):
    """bf16 mla_reference vs the float64 one: no worse than transformers' own bf16 attention (docs/design.md §6.2).

    Checked per layer: whole-model bf16 logits are dominated by MoE top-k flips on near-tied router scores,
    which both implementations suffer at different tokens."""
    path = checkpoint_dir(shape)
    cfg = ModelConfig.from_json(path)
    attn, w = _hf_attention(path, torch.bfloat16)
    x = torch.randn(64, cfg.hidden_size, generator=torch.Generator().manual_seed(6))
    positions = torch.arange(64)
    w64 = {n: t.double() for n, t in w.items()}
    ref64, _ = mla_reference(cfg, w64, x.double(), positions)
    ours, _ = mla_reference(cfg, w, x.bfloat16(), positions, None, ATTENTION[attention])
    xb = x.bfloat16()[None]
    mask = torch.full((64, 64), float("-inf")).triu(1)[None, None].bfloat16()
    with torch.no_grad():
        rotary = hf_model(path, torch.bfloat16).model.rotary_emb(xb, positions[None])
        baseline, _ = attn(hidden_states=xb, position_embeddings=rotary, attention_mask=mask)
    assert_bf16_policy(ours.float(), ref64, baseline[0].float(), f"{shape} bf16 {attention} mla_reference")


def test_v2_norm_topk_prob_normalises_instead_of_scaling():
    """DeepSeek-V2's gate normalises the top-k weights *or* scales them; transformers' V2 ignores
    norm_topk_prob (no released V2 sets it), so this branch is checked on its own."""
    logits = torch.randn(5, 12, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    probs = logits.softmax(-1)
    for norm in (False, True):
        cfg = get_preset("deepseek-v3-lite-tiny", **{**V2_ROUTING, "norm_topk_prob": norm})
        ids, weights = route(cfg, logits, None)
        assert_exact(ids.sort(-1).values, probs.topk(4, -1).indices.sort(-1).values, "greedy top-4 experts")
        top = probs.gather(1, ids)
        want = top / top.sum(-1, keepdim=True) if norm else top * cfg.routed_scaling_factor
        assert_f32_parity(weights, want, f"V2 weights, norm_topk_prob={norm}")
