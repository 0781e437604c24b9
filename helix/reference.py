"""The single-device oracle: a DeepSeek-V2/V3 model in plain PyTorch, written to be obviously correct.

It shares no code with the Helix runtime (attention.py, moe.py, model.py) and is itself checked against
transformers' ``DeepseekV3ForCausalLM`` / ``DeepseekV2ForCausalLM`` (tests/model/test_reference_vs_hf.py).
Everything is computed in the weights' dtype (float64 for the oracle in tests, float32, bf16) on any device;
norms, RoPE angles, router scores and softmax run in float32 or better.

Symbols (docs/design.md §3.1, DeepSeek-V3 values): H query heads (128), D hidden (7168), Lkv = kv_lora_rank (512),
P = qk_nope_head_dim (128), R = qk_rope_head_dim (64), V = v_head_dim (128), S context length, T new tokens.

MLA, naive (no weight absorption), per token x [D]:
    q = W_Q x, or W_UQ RMSNorm(W_DQ x) with q_lora             -> per head [q_nope (P) | q_pe (R)]
    [c_kv (Lkv) | k_pe_raw (R)] = W_DKV x;  c_kv = RMSNorm(c_kv);  k_pe = RoPE(k_pe_raw, global position)
    k_h = [W_UK_h c_kv | k_pe]  (P+R),   v_h = W_UV_h c_kv  (V)     with [W_UK; W_UV] = kv_b_proj per head
    o_h = softmax_t(q_h . k_h(t) * softmax_scale) v_h;   out = W_O concat_h o_h
The cache keeps K and V per head. Memory stays linear in T: attention takes queries in chunks whose
[H, chunk, S] scores fit SCORE_BYTES (exact: each query row sees all its keys), or, with attention="sdpa",
runs torch's fused scaled_dot_product_attention; the FFNs take FFN_CHUNK tokens at a time; prefill forms
logits only for the rows its caller asks for (generate: the last).
RoPE rotates (x[2i], x[2i+1]) pairs when interleaved (DeepSeek's layout; always for V2) and writes them out
as [rotated evens | rotated odds], as transformers does; q and k share the layout, so scores are unchanged.
YaRN (DeepSeek's): inv_freq blends interpolated (/factor) and original frequencies with a linear ramp
between the beta_fast and beta_slow correction dimensions; cos/sin are multiplied by
mscale(factor, mscale) / mscale(factor, mscale_all_dim); ``cfg.softmax_scale`` carries mscale_all_dim^2.

MoE: V3 scores = sigmoid(W_g x); expert choice uses scores + e_score_correction_bias, limited to the
topk_group groups with the largest sum of their top-2 biased scores; weights are the unbiased scores of the
chosen experts, normalised if norm_topk_prob, times routed_scaling_factor. V2 scores = softmax(W_g x);
greedy top-k, or group_limited_greedy (group score = max score in the group); weights normalised if
norm_topk_prob (DeepSeek-V2's code; transformers ignores the key for V2, and no released V2 sets it),
otherwise multiplied by routed_scaling_factor. Output = sum of weighted routed experts + shared experts.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from helix.checkpoint import CheckpointError, tensor_shapes
from helix.config import ConfigError, ModelConfig, yarn_mscale
from helix.sampling import check_finite, score_rows
from helix.sources import open_source


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 or better: where norms, router scores and softmax are computed."""
    return torch.promote_types(dtype, torch.float32)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.to(_acc_dtype(x.dtype))
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


# --------------------------------------------------------------------------------------------- RoPE


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """[R/2] float64 inverse frequencies, YaRN-blended when the config asks for it."""
    R, base = cfg.qk_rope_head_dim, cfg.rope_theta
    inv_freq = 1.0 / base ** (torch.arange(0, R, 2, dtype=torch.float64) / R)
    ys = cfg.rope_scaling
    if not ys.is_yarn:
        return inv_freq

    def correction_dim(rotations: float) -> float:
        # The rotary dimension that completes `rotations` turns over the original context.
        return R * math.log(ys.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(ys.beta_fast)), 0)
    high = min(math.ceil(correction_dim(ys.beta_slow)), R - 1)
    ramp = ((torch.arange(R // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(0, 1)
    # ramp 0: high-frequency dims keep their frequency (extrapolate); ramp 1: low-frequency dims are interpolated.
    return inv_freq / ys.factor * ramp + inv_freq * (1 - ramp)


def rope_cos_sin(cfg: ModelConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, R/2] (float64) for global positions [T], including YaRN's attention factor."""
    angles = positions.to(torch.float64)[:, None] * rope_inv_freq(cfg).to(positions.device)[None, :]
    ys = cfg.rope_scaling
    attn_factor = yarn_mscale(ys.factor, ys.mscale) / yarn_mscale(ys.factor, ys.mscale_all_dim) if ys.is_yarn else 1.0
    return angles.cos() * attn_factor, angles.sin() * attn_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate x [..., T, R] by cos/sin [T, R/2]. Output layout [first of each pair | second of each pair]."""
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    x1, x2 = x1.to(cos.dtype), x2.to(cos.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


# --------------------------------------------------------------------------------------------- MLA


# Bound on one query chunk's [H, chunk, S] scores in attend_plain (a few such tensors are alive at once).
# Larger chunks are no faster: an 8K-token tiny prefill on 2 CPU cores takes 4.6 s at 16 MiB, 12.6 s at 256.
SCORE_BYTES = 16 << 20


def attend_plain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale, causal) v per head: q [H, T, E], k [H, S, E], v [H, S, V] -> [H, T, V].

    The T queries are the last T of the S positions: query i (position S - T + i) sees keys j <= S - T + i.
    Queries go in chunks whose scores [H, chunk, keys] fit SCORE_BYTES; a chunk against every key it may see
    is the whole softmax of its rows, so chunking changes nothing (keys past the chunk's last row are all
    masked and left out). Scores and softmax in float32 or better, probabilities cast back for the product.
    """
    H, T, S = q.shape[0], q.shape[1], k.shape[1]
    acc = _acc_dtype(q.dtype)
    rows = max(1, SCORE_BYTES // (H * S * acc.itemsize))
    o = q.new_empty(H, T, v.shape[-1])
    for s in range(0, T, rows):
        e = min(s + rows, T)
        keys = S - T + e  # the chunk's last query sees keys 0 .. S - T + e - 1
        scores = (q[:, s:e] @ k[:, :keys].transpose(1, 2)).to(acc) * scale  # [H, e - s, keys]
        future = (torch.arange(keys, device=q.device)[None, :]
                  > torch.arange(S - T + s, S - T + e, device=q.device)[:, None])  # key j after query i
        probs = scores.masked_fill(future, float("-inf")).softmax(dim=-1).to(q.dtype)
        o[:, s:e] = probs @ v[:, :keys]
    return o


def attend_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """attend_plain's contract through torch's fused ``scaled_dot_product_attention``, which never holds the
    scores (flash on CPU; cuDNN or memory-efficient kernels on CUDA, where float64 has only the math fallback,
    which does hold them). Its softmax runs in float32 or better whatever the inputs' dtype."""
    T, S, qk, Vd = q.shape[1], k.shape[1], q.shape[-1], v.shape[-1]
    # One head dim for q, k and v, or torch's CPU flash kernel gives way to the math one: the narrower side gets
    # zero columns, which change neither q.k nor the first V output dims.
    if Vd < qk:  # DeepSeek: V 128 < P+R 192
        v = F.pad(v, (0, qk - Vd))
    elif qk < Vd:
        q, k = F.pad(q, (0, Vd - qk)), F.pad(k, (0, Vd - qk))
    # Query i sees keys j <= S - T + i: plain causal without a past (T == S), every key for one new token; only
    # new tokens after a past (T > 1, never in prefill or decode) need the explicit [T, S] mask.
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T) if 1 < T < S else None
    o = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, is_causal=T == S, scale=scale)
    return o[0, ..., :Vd]


Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
ATTENTION: dict[str, Attend] = {"plain": attend_plain, "sdpa": attend_sdpa}


def mla_reference(cfg: ModelConfig, w: dict[str, torch.Tensor], x: torch.Tensor, positions: torch.Tensor,
                  past: tuple[torch.Tensor, torch.Tensor] | None = None, attend: Attend = attend_plain
                  ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """One naive MLA layer for one sequence.

    w: this layer's ``self_attn.*`` tensors keyed by the name after ``self_attn.`` (e.g. "kv_b_proj.weight").
    x [T, D] (already input-layernormed); positions [T] global, following the S cached tokens of ``past``
    = (K [H, S, P+R], V [H, S, V]). New token i attends to every cached token and to new tokens j <= i;
    ``attend`` (attend_plain or attend_sdpa) computes that. Returns out [T, D] and the cache extended to S + T
    tokens.
    """
    H, P, R, Vd, Lkv = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
                        cfg.kv_lora_rank)
    T = x.shape[0]
    eps = 1e-6  # transformers builds q_a_layernorm / kv_a_layernorm with the default eps, not rms_norm_eps
    if cfg.q_lora_rank:
        q = rms_norm(x @ w["q_a_proj.weight"].T, w["q_a_layernorm.weight"], eps) @ w["q_b_proj.weight"].T
    else:
        q = x @ w["q_proj.weight"].T
    q = q.view(T, H, P + R).transpose(0, 1)  # [H, T, P+R]
    q_nope, q_pe = q.split([P, R], dim=-1)

    c_kv, k_pe = (x @ w["kv_a_proj_with_mqa.weight"].T).split([Lkv, R], dim=-1)  # [T, Lkv], [T, R]
    c_kv = rms_norm(c_kv, w["kv_a_layernorm.weight"], eps)
    # DeepSeek-V2's code has no switch: its RoPE is always interleaved (transformers' V2 ignores rope_interleave).
    interleaved = cfg.rope_interleave or cfg.model_type == "deepseek_v2"
    cos, sin = rope_cos_sin(cfg, positions)
    q_pe = apply_rope(q_pe, cos, sin, interleaved)
    k_pe = apply_rope(k_pe, cos, sin, interleaved)

    kv = (c_kv @ w["kv_b_proj.weight"].T).view(T, H, P + Vd).transpose(0, 1)  # [H, T, P+V]
    k_nope, v = kv.split([P, Vd], dim=-1)
    k = torch.cat([k_nope, k_pe.expand(H, T, R)], dim=-1)  # [H, T, P+R]: k_pe is shared by all heads
    if past is not None:
        k, v = torch.cat([past[0], k], dim=1), torch.cat([past[1], v], dim=1)
    S = k.shape[1]

    o = attend(torch.cat([q_nope, q_pe], dim=-1), k, v, cfg.softmax_scale)  # [H, T, V]
    o = o.transpose(0, 1).reshape(T, H * Vd)  # [T, H*V], heads concatenated
    return o @ w["o_proj.weight"].T, (k, v)


# --------------------------------------------------------------------------------------------- FFN


# Tokens per FFN chunk: bounds the [chunk, I] (dense, shared) and [E, chunk, I] (routed) intermediates.
FFN_CHUNK = 1024


def mlp(x: torch.Tensor, w: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """SiLU-gated MLP with weights ``{prefix}gate_proj.weight`` etc.; tokens FFN_CHUNK at a time (each token
    on its own, so chunks are exact)."""
    gate, up, down = (w[prefix + n + ".weight"] for n in ("gate_proj", "up_proj", "down_proj"))
    out = torch.empty_like(x)
    for s in range(0, x.shape[0], FFN_CHUNK):
        xs = x[s:s + FFN_CHUNK]
        out[s:s + FFN_CHUNK] = (F.silu(xs @ gate.T) * (xs @ up.T)) @ down.T
    return out


def route(cfg: ModelConfig, logits: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] (float32 or better) -> expert ids [T, k] and weights [T, k]."""
    E, G, k = cfg.n_routed_experts, cfg.n_group, cfg.num_experts_per_tok
    if cfg.model_type == "deepseek_v3":
        scores = logits.sigmoid()
        choice = scores + bias
        group_score = choice.view(-1, G, E // G).topk(2, dim=-1).values.sum(-1) if G > 1 else None
    else:
        scores = logits.softmax(dim=-1)
        choice = scores
        group_score = choice.view(-1, G, E // G).amax(-1) if cfg.topk_method == "group_limited_greedy" else None
    if group_score is not None:
        keep = torch.zeros_like(group_score, dtype=torch.bool)
        keep.scatter_(1, group_score.topk(cfg.topk_group, dim=-1).indices, True)
        choice = choice.masked_fill(~keep.repeat_interleave(E // G, dim=1), float("-inf"))
    ids = choice.topk(k, dim=-1).indices
    weights = scores.gather(1, ids)
    if cfg.model_type == "deepseek_v3":
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return ids, weights * cfg.routed_scaling_factor
    if cfg.norm_topk_prob and k > 1:
        return ids, weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return ids, weights * cfg.routed_scaling_factor


def moe(cfg: ModelConfig, x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    """x [T, D] -> routed + shared experts. Dense, i.e. the definition: every routed expert runs on every
    token and is weighted by the router, with weight 0 where the token did not choose it (nothing to dispatch,
    so nothing to get wrong, and a fixed number of matmuls). ``w`` keys after ``mlp.``; the routed experts
    stacked as ``experts.gate_proj`` / ``experts.up_proj`` [E, I, D] and ``experts.down_proj`` [E, D, I].
    Tokens go FFN_CHUNK at a time."""
    acc = _acc_dtype(x.dtype)
    logits = x.to(w["gate.weight"].dtype) @ w["gate.weight"].T  # [T, E] in float32 or better
    ids, weights = route(cfg, logits, w.get("gate.e_score_correction_bias"))
    mix = torch.zeros_like(logits, dtype=acc).scatter_(1, ids, weights.to(acc))  # [T, E]
    gate, up, down = (w["experts." + n] for n in ("gate_proj", "up_proj", "down_proj"))
    out = torch.empty_like(x)
    for s in range(0, x.shape[0], FFN_CHUNK):
        xs = x[s:s + FFN_CHUNK]
        h = F.silu(torch.einsum("td,eid->eti", xs, gate)) * torch.einsum("td,eid->eti", xs, up)  # [E, t, I]
        y = torch.einsum("eti,edi->etd", h, down)  # [E, t, D]
        out[s:s + FFN_CHUNK] = torch.einsum("te,etd->td", mix[s:s + FFN_CHUNK], y.to(acc)).to(x.dtype)  # summed in acc
    if cfg.n_shared_experts:
        out = out + mlp(x, w, "shared_experts.")
    return out


# --------------------------------------------------------------------------------------------- model


@dataclass
class ReferenceCache:
    """Per layer, the full K [H, S, P+R] and V [H, S, V] of every head: naive, and easy to inspect."""

    layers: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.layers[0][0].shape[1] if self.layers else 0


class ReferenceModel:
    """A whole DeepSeek-V2/V3 decoder built from HF on-disk tensors (per-expert names)."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], attention: str = "plain"):
        """``weights`` by HF name; the routed experts' tensors are moved out of it into stacked ones (so a
        full-size model never holds them twice). ``attention``: "plain" (attend_plain, the definition) or
        "sdpa" (attend_sdpa: torch's fused kernel, for long prompts on GPU)."""
        if attention not in ATTENTION:
            raise ConfigError(f"attention={attention!r}: choose one of {list(ATTENTION)}")
        self.cfg = cfg
        self.attend = ATTENTION[attention]
        expected = tensor_shapes(cfg)
        for name, shape in expected.items():
            if name not in weights:
                raise CheckpointError(f"tensor {name!r} is missing (expected shape {shape})")
            if tuple(weights[name].shape) != shape:
                raise CheckpointError(f"tensor {name!r}: shape {tuple(weights[name].shape)} != {shape} "
                                      "implied by the config")
        self.dtype = weights["model.embed_tokens.weight"].dtype
        self.device = weights["model.embed_tokens.weight"].device
        self.embed = weights["model.embed_tokens.weight"]
        self.norm = weights["model.norm.weight"]
        self.lm_head = self.embed if cfg.tie_word_embeddings else weights["lm_head.weight"]
        acc = _acc_dtype(self.dtype)

        def sub(prefix: str) -> dict[str, torch.Tensor]:
            return {n[len(prefix):]: t for n, t in weights.items() if n.startswith(prefix) and n in expected}

        self.layers = []
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            ffn = {}
            if cfg.is_moe_layer(i):  # routed experts stacked [E, ...], moved out of ``weights``
                for n in ("gate_proj", "up_proj", "down_proj"):
                    ffn["experts." + n] = torch.stack([weights.pop(f"{p}mlp.experts.{e}.{n}.weight")
                                                       for e in range(cfg.n_routed_experts)])
            ffn.update(sub(p + "mlp."))
            # The router stays in float32 or better (as transformers keeps it): top-k picks are fragile.
            for name in ("gate.weight", "gate.e_score_correction_bias"):
                if name in ffn:
                    ffn[name] = ffn[name].to(acc)
            self.layers.append({"attn": sub(p + "self_attn."), "mlp": ffn,
                                "attn_norm": weights[p + "input_layernorm.weight"],
                                "ffn_norm": weights[p + "post_attention_layernorm.weight"]})

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", attention: str = "plain") -> "ReferenceModel":
        ckpt = open_source(path, device)
        weights = {name: ckpt.get(name, dtype=dtype, device=device) for name in ckpt.expected}
        ckpt.close()
        return cls(ckpt.config, weights, attention)

    # ---------------------------------------------------------------- one sequence
    def _run(self, ids: torch.Tensor, cache: ReferenceCache, logits_from: int = 0) -> torch.Tensor:
        """Token ids [T] following cache.length cached tokens -> float32 logits [T - logits_from, V] of the
        positions logits_from .. T-1 (the others are never formed: [T, V] is large for long prompts and real
        vocabularies); extends the cache."""
        cfg = self.cfg
        start = cache.length
        positions = torch.arange(start, start + ids.shape[0], device=self.device)
        h = self.embed[ids.to(self.device)]  # [T, D]
        # Layer i's cache is replaced as soon as it is extended: the old and the new cache never coexist whole.
        kv = cache.layers or [None] * len(self.layers)
        for i, layer in enumerate(self.layers):
            a, kv[i] = mla_reference(cfg, layer["attn"], rms_norm(h, layer["attn_norm"], cfg.rms_norm_eps), positions,
                                     kv[i], self.attend)
            h = h + a
            x = rms_norm(h, layer["ffn_norm"], cfg.rms_norm_eps)
            h = h + (moe(cfg, x, layer["mlp"]) if cfg.is_moe_layer(i) else mlp(x, layer["mlp"], ""))
        cache.layers = kv
        return (rms_norm(h[logits_from:], self.norm, cfg.rms_norm_eps) @ self.lm_head.T).float()

    @torch.no_grad()
    def forward(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """[B, T] -> float32 logits [B, T, V]; causal, positions 0..T-1, each row on its own."""
        return torch.stack([self._run(row, ReferenceCache()) for row in input_ids])

    @torch.no_grad()
    def prefill(self, input_ids: list[int], logits_from: int = 0) -> tuple[torch.Tensor, ReferenceCache]:
        """Logits [T - logits_from, V] (row j predicts the token after position logits_from + j) and the cache."""
        cache = ReferenceCache()
        return self._run(torch.tensor(input_ids, dtype=torch.long), cache, logits_from), cache

    @torch.no_grad()
    def decode(self, token_id: int, cache: ReferenceCache) -> torch.Tensor:
        return self._run(torch.tensor([token_id], dtype=torch.long), cache)[0]

    def generate(self, prompt_ids: list[int], max_new_tokens: int, eos_token_ids=(), return_logits: bool = False
                 ) -> list[int] | tuple[list[int], list[torch.Tensor]]:
        """Greedy decoding; stops after an eos token (which is returned). Logits [V] of each generated token."""
        out: list[int] = []
        all_logits: list[torch.Tensor] = []
        if max_new_tokens > 0:
            logits, cache = self.prefill(prompt_ids, logits_from=len(prompt_ids) - 1)
            logits = logits[0]
            while True:
                check_finite(logits, "reference", 0, len(out) + 1)
                all_logits.append(logits)
                out.append(int(logits.argmax()))
                if out[-1] in eos_token_ids or len(out) == max_new_tokens:
                    break
                logits = self.decode(out[-1], cache)
        return (out, all_logits) if return_logits else out

    def score(self, context_ids: list[int], continuation_ids: list[int]) -> tuple[list[float], list[bool]]:
        """Log-prob of each continuation token given everything before it, and whether greedy picks it."""
        if not context_ids:
            raise ValueError("score needs at least one context token (the first token has no prediction)")
        # Every row, then the continuation's, as evals' ReferenceBackend.score reads them from one prefill: the
        # same numbers bit for bit (a matmul's rounding depends on how many rows it has).
        logits, _ = self.prefill(list(context_ids) + list(continuation_ids)[:-1])
        logits = logits[len(context_ids) - 1:]  # [len(continuation), V]: row j predicts continuation_ids[j]
        check_finite(logits, "reference", 0)
        logprobs, greedy, _ = score_rows(logits, list(continuation_ids))
        return logprobs, greedy
