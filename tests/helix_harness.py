"""Rank-side functions the Helix tests run through a RankPool (module-level, so spawned ranks import them),
and the reference side they are compared with.

``run_mla_module``: layer 0's Helix MLA alone. Each sequence's context hidden states go through the
head-split prefill (writing each KV block on its owner rank), then ``steps`` batched Helix decode steps, all
sequences at once with their own positions. ``reference_mla``: the same through the naive single-device MLA
of helix/reference.py.

``FAULTS``: known Helix bugs, planted by monkeypatching inside the ranks (no switches in product code).
"""

from __future__ import annotations

import contextlib
import math

import torch

import helix.attention
import helix.engine
from helix.attention import HelixMLA, StepMeta
from helix.checkpoint import DTYPES, Checkpoint
from helix.kv_cache import SCRATCH_BLOCK, PagedKVCache
from helix.mapping import HelixMapping
from helix.model import HelixModel
from helix.reference import mla_reference
from helix.rope import Rope
from helix.spec import Execution
from helix.runner import rank_generate


# ----------------------------------------------------------------------------------------------- faults
def _uniform_combine(o_parts, lse_parts, w_uv, **_):
    """Wrong combine weights: every rank's partial weighted equally, ignoring its lse."""
    live = torch.isfinite(lse_parts)[..., None]
    o = (o_parts.float() * live).sum(0) / live.sum(0).clamp(min=1)
    return torch.einsum("bhl,hvl->bhv", o, w_uv.float()).to(o_parts.dtype)


def _drop_last_shard(o_parts, lse_parts, w_uv, **kwargs):
    """A dropped shard: the last rank's partial never reaches the combine."""
    return _ORIGINAL["combine"](o_parts[:-1], lse_parts[:-1], w_uv, **kwargs)


def _shifted_owner_slots(self, seq_id, positions):
    """Off-by-one block owner for writes: rank (b + 1) mod N writes a position of block b, into the slot its
    local index names in that rank's cache (lost where that rank holds no such block), while readers still
    expect round-robin: the owner reads whatever its slot held before."""
    m, blocks = self.mapping, self.seqs[seq_id].blocks
    out = []
    for p in positions.tolist():
        local = m.local_index(p)
        mine = (p // self.tpb + 1) % m.world_size == m.rank and local // self.tpb < len(blocks)
        out.append(blocks[local // self.tpb] * self.tpb + local % self.tpb if mine else SCRATCH_BLOCK * self.tpb)
    return torch.tensor(out, dtype=torch.long)


def _local_rope_positions(n: int, tpb: int):
    """Local instead of global RoPE position: each rank rotates by the token's index in its own shard."""
    def cos_sin(self, positions):
        return _ORIGINAL["cos_sin"](self, (positions // tpb // n) * tpb + positions % tpb)
    return cos_sin


def _base2_lse(*args, **kwargs):
    """A base-2 log-sum-exp (log2 sum 2^(s log2 e) = lse / ln 2, what an exp2-based kernel keeps) fed to the
    natural-log combine: each rank's weight becomes exp(lse_r / ln 2), too sharp across ranks. In place: Helix
    reads the lse where mla_decode's ``out`` put it, in the all-to-all's send buffer."""
    o, lse = _ORIGINAL["decode"](*args, **kwargs)
    lse.div_(math.log(2))
    return o, lse


_ORIGINAL = {"combine": helix.attention.helix_combine_uv, "cos_sin": Rope.cos_sin, "decode": helix.attention.mla_decode}


@contextlib.contextmanager
def planted(fault: str | None, n: int, tpb: int):
    if fault is None:
        yield
        return
    saved = (helix.attention.helix_combine_uv, PagedKVCache.slots, Rope.cos_sin, helix.attention.mla_decode)
    try:
        if fault == "uniform_combine":
            helix.attention.helix_combine_uv = _uniform_combine
        elif fault == "drop_shard":
            helix.attention.helix_combine_uv = _drop_last_shard
        elif fault == "wrong_owner":
            PagedKVCache.slots = _shifted_owner_slots
        elif fault == "local_rope":
            Rope.cos_sin = _local_rope_positions(n, tpb)
        elif fault == "base2_lse":
            helix.attention.mla_decode = _base2_lse
        else:
            raise ValueError(fault)
        yield
    finally:
        helix.attention.helix_combine_uv, PagedKVCache.slots, Rope.cos_sin, helix.attention.mla_decode = saved


FAULTS = ["uniform_combine", "drop_shard", "wrong_owner", "local_rope", "base2_lse"]


def rank_generate_with_fault(ctx, fault, spec, requests):
    with planted(fault, spec.world_size, spec.tokens_per_block):
        ctx.state.clear()  # a fresh engine per run: nothing built under a fault outlives it
        try:
            return rank_generate(ctx, spec, requests)
        finally:
            ctx.state.clear()


# ----------------------------------------------------------------------------------------------- MLA module
def run_mla_module(ctx, ckpt_dir: str, n: int, tpb: int, dtype: str, contexts: list[torch.Tensor],
                   decode_x: torch.Tensor, fault: str | None = None, microbatches: int = 1, kernels: str = "auto"):
    """contexts: per sequence [S_i, D]; decode_x [steps, B, D]. Returns (prefill outs, decode outs [steps, B, D])
    from rank 0 (every rank computes the same). ``microbatches`` > 1 runs the decode with HOP-B; ``kernels`` is
    the run's kernel path (``triton`` on CPU: the GPU kernels under Triton's interpreter)."""
    with planted(fault, n, tpb):
        dt = DTYPES[dtype]
        ckpt = Checkpoint(ckpt_dir)
        cfg = ckpt.config
        mapping = HelixMapping(ctx.rank, n, tpb)
        comm = ctx.comm(n)
        rope = Rope(cfg, ctx.device)
        attn = HelixMLA(cfg, 0, ckpt, mapping, comm, rope, dt, ctx.device,
                        HelixMLA.layout_for(mapping, cfg.num_attention_heads, microbatches), Execution(kernels=kernels))
        total = max(c.shape[0] for c in contexts) + decode_x.shape[0]
        cache = PagedKVCache.for_config(mapping, 1, cfg.kv_cache_dim, total, len(contexts), dt, ctx.device)
        # NaN-poison every block: a kernel that reads past a sequence's end (or an unowned slot) shows up.
        for layer in cache.layers:
            layer.fill_(float("nan"))
        prefill_out = []
        for sid, x in enumerate(contexts):
            cache.add(sid)
            slots = cache.append(sid, x.shape[0])
            if x.shape[0]:
                cos, sin = rope.cos_sin(torch.arange(x.shape[0], device=ctx.device))
                prefill_out.append(attn.prefill(x.to(ctx.device, dt), cos, sin, slots.to(ctx.device), cache).float().cpu())
            else:
                prefill_out.append(torch.zeros(0, cfg.hidden_size))
        decode_out = []
        ids = list(range(len(contexts)))
        for step in range(decode_x.shape[0]):
            lengths = [c.shape[0] + step for c in contexts]
            slots = torch.cat([cache.append(sid, 1) for sid in ids])
            table, local_lens = cache.block_table(ids, [L + 1 for L in lengths])
            cos, sin = rope.cos_sin(torch.tensor(lengths, device=ctx.device))
            meta = StepMeta(cos, sin, *(t.to(ctx.device) for t in (slots, table, local_lens)))
            decode_out.append(attn.decode(decode_x[step].to(ctx.device, dt), meta, cache).float().cpu())
        return (prefill_out, torch.stack(decode_out)) if ctx.rank == 0 else None


def reference_mla(ckpt_dir: str, dtype: torch.dtype, contexts: list[torch.Tensor], decode_x: torch.Tensor):
    """The same inputs through the naive single-device MLA, in ``dtype`` (float64 for the oracle)."""
    ckpt = Checkpoint(ckpt_dir)
    cfg = ckpt.config
    prefix = "model.layers.0.self_attn."
    w = {name[len(prefix):]: ckpt.get(name, dtype=dtype) for name in ckpt.expected if name.startswith(prefix)}
    prefill_out, pasts = [], []
    for x in contexts:
        if x.shape[0]:
            out, past = mla_reference(cfg, w, x.to(dtype), torch.arange(x.shape[0]))
        else:
            out, past = torch.zeros(0, cfg.hidden_size, dtype=dtype), None
        prefill_out.append(out)
        pasts.append(past)
    decode_out = []
    for step in range(decode_x.shape[0]):
        row = []
        for i, x in enumerate(contexts):
            pos = torch.tensor([x.shape[0] + step])
            out, pasts[i] = mla_reference(cfg, w, decode_x[step, i : i + 1].to(dtype), pos, pasts[i])
            row.append(out[0])
        decode_out.append(torch.stack(row))
    return prefill_out, torch.stack(decode_out)


class EagerPaddedStep:
    """Stands in for helix.cuda_graph.GraphedDecodeStep on CPU: the engine's captured-step path (block tables
    padded to a width fixed per engine) run eagerly, checking every table it is handed has that width."""

    def __init__(self, model, cache, batch: int, width: int):
        self.model, self.cache, self.batch, self.width = model, cache, batch, width

    def __call__(self, tokens, positions, slots, table, lens) -> torch.Tensor:
        assert table.shape == (self.batch, self.width), (table.shape, self.batch, self.width)
        return self.model.decode_step(tokens, positions, slots, table, lens, self.cache)


def rank_generate_tp_attention(ctx, ckpt_dir: str, n: int, tpb: int, requests, padded_tables: bool = False):
    """The TP-attention baseline of the benchmarks (heads split, whole cache everywhere) through the engine.
    ``padded_tables``: through the engine's CUDA-graph path (tables at ``cache.table_width``), run eagerly."""
    from helix.baselines import TPAttentionMLA
    from helix.engine import HelixEngine

    model = HelixModel(Checkpoint(ckpt_dir), HelixMapping(ctx.rank, n, tpb), ctx.comm(n), attention=TPAttentionMLA)
    saved = helix.engine.GraphedDecodeStep
    if padded_tables:
        helix.engine.GraphedDecodeStep = EagerPaddedStep
    try:
        engine = HelixEngine(model, max_tokens=256, max_batch_size=len(requests), cuda_graphs=padded_tables)
        results = engine.run(requests)
    finally:
        helix.engine.GraphedDecodeStep = saved
    if padded_tables:  # the padded path really ran
        assert engine.graphs and all(isinstance(g, EagerPaddedStep) for g in engine.graphs.values())
    return results if ctx.rank == 0 else None


def check_bf16_teacher_forced(ref64, ref16, prompts, continuations, results, label: str) -> None:
    """Each result teacher-forced the float64 reference's continuation in bf16: every step's logits against the
    float64 reference by the model-level bf16 rule (the bf16 reference as baseline); prints the figures."""
    from tests.tolerance import assert_bf16_model_logits

    agree = total = 0
    for p, c, res in zip(prompts, continuations, results):
        ids = torch.tensor([p + c[:-1]])
        want64 = ref64.forward(ids)[0, len(p) - 1:].double()
        want16 = ref16.forward(ids)[0, len(p) - 1:].double()
        got = torch.stack(res.logits).double()
        s = assert_bf16_model_logits(got, want64, want16, f"{label} request {res.req_id}")
        print(f"[{label}] request {res.req_id}: Helix {s['text']}; bf16 reference {s['baseline']}; "
              f"TensorRT-LLM criterion {100 * s['trtllm']:.2f}% (bf16 reference {100 * s['baseline_trtllm']:.2f}%)")
        agree += int((got.argmax(-1) == want64.argmax(-1)).sum())
        total += got.shape[0]
    print(f"[{label}] greedy agreement with the float64 reference {agree}/{total}")
