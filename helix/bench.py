"""`helix bench`: token-to-token decode latency against context length (docs/design.md §8).

One run on one machine measures, on the same synthetic DeepSeek-V3-Lite-shaped weights:

* ``single``: one GPU holds every weight and the whole latent cache;
* ``tp``: tensor-parallel attention on N GPUs (heads split, the whole latent cache on every GPU: the layout
  Helix replaces), FFN tensor / expert parallel as in Helix;
* ``helix``: Helix on N GPUs (cache sharded by blocks, one all-to-all per layer).

Each configuration runs with every KV cache dtype asked for (``--kv-dtype auto fp8``: the model's bf16, and
e4m3 rows with a per-row scale), in the same run on the same cards.

Each configuration times the whole decode step (all layers, one CUDA graph): the median of ``iters`` graph
replays after warm-up, CUDA events, random cache contents. The floor of a step is
max(bytes read / read bandwidth, attention FLOPs / matmul rate) + collectives x in-graph collective latency, all
measured in the same run (bytes: this rank's KV shard plus the weights a step must read; read bandwidth: the
best read-only stream of ``kernels.bench.measure_read_bandwidth``).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist

from helix.attention import HelixMLA
from helix.baselines import TPAttentionMLA
from helix.checkpoint import SyntheticCheckpoint
from helix.config import HelixConfig, ModelConfig
from helix.cuda_graph import GraphedDecodeStep
from helix.factory import build_model
from helix.kv_cache import PagedKVCache
from helix.mapping import HelixMapping
from helix.model import HelixModel
from helix.presets import get_preset
from helix.spec import Execution, RunSpec
from helix.workers import RankContext, RankPool
from kernels import bench as kernel_bench
from kernels.mla_decode import flops as mla_flops

log = logging.getLogger(__name__)
BF16 = 2  # bytes


@dataclass
class Row:
    mode: str
    gpus: int
    kv_dtype: str  # "auto" (bf16) or "fp8"
    layers: int
    batch: int
    context: int
    ms: float  # median token-to-token latency
    ms_p10: float
    ms_p90: float
    tokens_per_s_per_user: float
    kv_bytes: int  # per rank per step
    weight_bytes: int  # per rank per step (weights a step must read)
    attn_flops: float  # per rank per step
    collectives: int  # per step
    floor_ms: float
    floor_parts: dict
    vs_floor: float


# --------------------------------------------------------------------------------------------- ceilings


def _time_replays(replay, iters: int, device, warmup: int = 5) -> list[float]:
    for _ in range(warmup):
        replay()
    torch.cuda.synchronize(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for a, b in events:
        a.record()
        replay()
        b.record()
    torch.cuda.synchronize(device)
    return [a.elapsed_time(b) for a, b in events]


def measure_ceilings(device) -> dict:
    """Read bandwidth, copy bandwidth (read + write) and bf16 matmul rate of this GPU: the kernel benchmark's
    measurement."""
    with torch.cuda.device(device):
        return {**kernel_bench.measure_ceilings(), "device": torch.cuda.get_device_name(device)}


def measure_collectives(ctx: RankContext, n: int, cfg: ModelConfig, batch: int, reps: int = 20) -> dict:
    """In-graph latency (us) of the step's collectives at their real sizes on ``n`` ranks."""
    comm = ctx.comm(n)
    h = cfg.num_attention_heads // n
    a2a = torch.randn(n, batch, h, cfg.kv_lora_rank + 2, device=ctx.device, dtype=torch.bfloat16)
    ar = torch.randn(batch, cfg.hidden_size, device=ctx.device, dtype=torch.bfloat16)

    out = {}
    for name, op in (("all_to_all", lambda: comm.all_to_all(a2a)), ("all_reduce", lambda: comm.all_reduce(ar))):
        dist.barrier(group=comm.group)
        out[name + "_us"] = kernel_bench.time_graph_batched(op, inner=reps, replays=10) * 1e6
    return out


# --------------------------------------------------------------------------------------------- byte model


def step_bytes_and_flops(model: HelixModel, batch: int, context: int, kv_dtype: str = "auto") -> tuple[int, int, float]:
    """(KV bytes, weight bytes, attention FLOPs) one rank must move / do in one decode step."""
    cfg = model.cfg
    L = cfg.num_hidden_layers
    local = model.layout.cache.local_length(context + 1)
    kv = batch * local * PagedKVCache.bytes_per_token(cfg.kv_cache_dim, torch.bfloat16, kv_dtype) * L
    heads = model.layout.num_heads  # H for Helix, H / N for TP attention
    flops = float(mla_flops(batch, heads, local, cfg.kv_lora_rank, cfg.qk_rope_head_dim) * L)
    w = 0
    for layer in model.layers:
        a = layer.attn
        for name in ("w_qkv_a", "q_b", "w_uk", "w_uv", "o_proj"):
            t = getattr(a, name, None)
            w += t.numel() * BF16 if t is not None else 0
        ffn = layer.ffn
        if hasattr(ffn, "w_gate"):  # MoE: shared slice + the routed experts this rank is expected to touch
            e_local, e_total, k = ffn.w_gate.shape[0], cfg.n_routed_experts, cfg.num_experts_per_tok
            hit = e_local * (1 - (1 - k / e_total) ** batch)
            per_expert = (ffn.w_gate[0].numel() + ffn.w_up[0].numel() + ffn.w_down[0].numel()) * BF16
            w += int(hit * per_expert) + ffn.gate.numel() * 4
            if ffn.shared is not None:
                w += sum(t.numel() for t in (ffn.shared.gate, ffn.shared.up, ffn.shared.down)) * BF16
        else:
            w += sum(t.numel() for t in (ffn.gate, ffn.up, ffn.down)) * BF16
    w += model.lm_head.numel() * BF16 + batch * cfg.hidden_size * BF16
    return kv, w, flops


def collectives_per_step(mode: str, n: int, layers: int) -> tuple[int, int]:
    """(all-to-alls, all-reduce-like collectives) per decode step; the logits all-gather counts as the latter."""
    if n == 1:
        return 0, 0
    return (layers if mode == "helix" else 0), 2 * layers + 1


# --------------------------------------------------------------------------------------------- rank side


def fill_random(cache: PagedKVCache) -> None:
    """Random latent rows everywhere (never zeros: they flatter the kernels), a few thousand blocks at a time (no
    full-size float32 temporary); an FP8 cache's scales near 1/448, so its rows are N(0, 1)-sized as bf16's."""
    for layer, t in enumerate(cache.layers):
        for start in range(0, t.shape[0], 4096):
            part = t[start:start + 4096]
            part.copy_(torch.randn(part.shape, device=t.device, dtype=torch.bfloat16).to(t.dtype))
        if cache.scales is not None:
            cache.scales[layer].uniform_(0.5 / 448, 2 / 448)


def rank_bench(ctx: RankContext, preset: str, layers: int, mode: str, n: int, batches: list[int],
               contexts: list[int], tpb: int, iters: int, ceilings: dict, execution: Execution, profile: bool = False,
               moe_parallel: str = "ep", kv_dtype: str = "auto") -> list[dict] | None:
    cfg = get_preset(preset, num_hidden_layers=layers)
    src = SyntheticCheckpoint(cfg, seed=0, device=ctx.device)  # `layers` of the preset, kept across variants
    spec = RunSpec(model=f"synthetic:{preset}", dtype="bfloat16", device="cuda", execution=execution,
                   generation=HelixConfig(context_parallel_size=n, tokens_per_block=tpb, moe_parallel=moe_parallel))
    mapping = HelixMapping(ctx.rank, n, tpb)
    comm = ctx.comm(n)
    attention = TPAttentionMLA if mode in ("tp", "single") else HelixMLA
    built: dict[int, HelixModel] = {}

    def model_with(microbatches: int) -> HelixModel:
        """The model of this HOP-B setting (fixed at construction): one held at a time, rebuilt on a change."""
        if microbatches not in built:
            built.clear()
            torch.cuda.empty_cache()
            variant = replace(spec, execution=replace(execution, microbatches=microbatches))
            built[microbatches] = build_model(variant, mapping, comm, ctx.device, attention, source=src)
        return built[microbatches]

    max_s, max_b = max(contexts) + 1, max(batches)
    cache = model_with(1).new_cache(max_s, max_b, kv_dtype)  # every HOP-B setting shares the layout's cache
    fill_random(cache)
    ids = list(range(max_b))
    for sid in ids:
        cache.add(sid)
        cache.reserve(sid, max_s)
    width = cache.table_width
    rows = []
    for batch in batches:
        coll = measure_collectives(ctx, n, cfg, batch) if n > 1 else {"all_to_all_us": 0.0, "all_reduce_us": 0.0}
        microbatch_variants = [1, 2] if mode == "helix" and batch > 1 else [1]  # HOP-B needs a batch to split
        for microbatches in microbatch_variants:
            model = model_with(microbatches)
            graph = GraphedDecodeStep(model, cache, batch, width)
            gen = torch.Generator().manual_seed(batch)
            name = mode if microbatches == 1 else f"{mode}+hopb{microbatches}"
            for context in contexts:
                rows.append(_time_point(ctx, model, cache, graph, comm, coll, ceilings, name, mode, n, layers,
                                        batch, context, width, gen, iters, profile, kv_dtype))
            del graph, model
    built.clear()
    del cache
    torch.cuda.empty_cache()
    return rows


def _time_point(ctx, model, cache, graph, comm, coll, ceilings, name, mode, n, layers, batch, context, width, gen,
                iters, profile: bool = False, kv_dtype: str = "auto") -> dict:
    cfg = model.cfg
    b_ids = list(range(batch))
    tokens = torch.randint(0, cfg.vocab_size, (batch,), generator=gen)
    positions = torch.full((batch,), context)
    slots = torch.cat([cache.slots(s, positions[:1]) for s in b_ids])
    table, lens = cache.block_table(b_ids, [context + 1] * batch, width)
    if comm.group is not None:
        dist.barrier(group=comm.group)
    times = _time_replays(lambda: graph(tokens, positions, slots, table, lens), iters, ctx.device)
    kv, w, flops = step_bytes_and_flops(model, batch, context, kv_dtype)
    a2a, other = collectives_per_step(mode, n, layers)
    t_roof, t_mem, t_flop = (x * 1e3 for x in kernel_bench.floor_s(kv + w, flops, ceilings))
    t_coll = (a2a * coll["all_to_all_us"] + other * coll["all_reduce_us"]) * 1e-3
    floor = t_roof + t_coll
    med = statistics.median(times)
    q = statistics.quantiles(times, n=10)
    log.info("%s N=%d %s KV B=%d S=%d: %.3f ms (floor %.3f)", name, n, kv_dtype, batch, context, med, floor)
    row = asdict(Row(name, n, kv_dtype, layers, batch, context, med, q[0], q[-1], 1e3 / med, kv, w, flops, a2a + other, floor,
                     {"memory_ms": t_mem, "flops_ms": t_flop, "collectives_ms": t_coll, **coll}, med / floor))
    if profile:
        row["profile"] = kernel_profile(lambda: graph(tokens, positions, slots, table, lens), ctx.device)
        row["profile"]["per_layer_us"] = per_layer(row["profile"]["categories_us"], med, layers)
    return row


# Kernel name -> part of the step, first match wins (names as torch.profiler reports them: Triton kernels by their
# function name, cuBLAS GEMVs as nvjet / gemv / splitK / dot kernels, NCCL as ncclDevKernel_*).
CATEGORIES = (("kv_kernel", ("mla",)), ("merge", ("lse_combine",)), ("collectives", ("nccl",)),
              ("weights", ("nvjet", "gemv", "gemm", "splitk", "dot_kernel", "reduce_1block", "cutlass", "xmma",
                           "_gate_up", "_down_kernel", "_logits_kernel")))


def category(kernel: str) -> str:
    """The step part a GPU kernel belongs to: kv_kernel, merge (log-sum-exp merges: the KV splits' and Helix's),
    collectives, weights (GEMVs and the expert kernels), or other (norms, RoPE, routing choice, copies)."""
    name = kernel.lower()
    return next((c for c, keys in CATEGORIES if any(k in name for k in keys)), "other")


def per_layer(categories_us: dict, step_ms: float, layers: int) -> dict:
    """A step's per-category GPU time, per layer (us), plus idle (step time not covered by any kernel) and
    outside_kv: the step's time not spent in the KV kernel."""
    out = {c: t / layers for c, t in categories_us.items()}
    out["idle"] = max(0.0, step_ms * 1e3 - sum(categories_us.values())) / layers
    out["outside_kv"] = (step_ms * 1e3 - categories_us.get("kv_kernel", 0.0)) / layers
    return out


def kernel_profile(replay, device, steps: int = 5, top: int = 25) -> dict:
    """Per decode step: GPU kernels by total time (torch.profiler over graph replays), their count, the
    step's busy time and its split by ``category``, so the gap to the floor can be read as 'which kernels'
    versus 'idle between kernels'."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            replay()
        torch.cuda.synchronize(device)
    kernels: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels.setdefault(e.name, []).append(e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total)
    table = sorted(((sum(v) / steps, len(v) / steps, k) for k, v in kernels.items()), reverse=True)
    categories = {c: 0.0 for c, _ in CATEGORIES} | {"other": 0.0}
    for t, _, k in table:
        categories[category(k)] += t
    return {"kernels_per_step": sum(c for _, c, _ in table), "busy_us_per_step": sum(t for t, _, _ in table),
            "categories_us": categories, "top": [{"us": round(t, 1), "count": c, "name": k[:90]} for t, c, k in table[:top]]}


# --------------------------------------------------------------------------------------------- driver


def kv_capacity(cfg: ModelConfig, mode: str, n: int, gpu_bytes: int, weight_bytes_rank: int, kv_dtype: str = "auto") -> int:
    """Longest context (B = 1) whose KV fits beside this rank's weights, 90% of GPU memory usable."""
    per_token = PagedKVCache.bytes_per_token(cfg.kv_cache_dim, torch.bfloat16, kv_dtype) * cfg.num_hidden_layers
    room = 0.9 * gpu_bytes - weight_bytes_rank
    tokens = max(0, int(room // per_token))
    return tokens * (n if mode == "helix" else 1)


def resident_weight_bytes(cfg: ModelConfig, mode: str, n: int) -> int:
    """Bytes of weights one rank holds (bf16): replicated attention, 1/N of the o_proj, FFN, experts, LM head."""
    p = cfg.num_parameters()
    replicated = p["attention"] - cfg.num_hidden_layers * cfg.num_attention_heads * cfg.v_head_dim * cfg.hidden_size
    sharded = p["total"] - p["attention"] - p["embedding"] + (p["attention"] - replicated)
    return int((replicated + p["embedding"] + sharded / n) * BF16)


def run_bench(out_dir: str, preset: str = "deepseek-v3-lite", layers: int = 4, gpus: int | None = None,
              batches=(1, 8), contexts=(65536, 131072, 524288, 1048576), tpb: int = 64, iters: int = 60,
              configs: list[tuple[str, int]] | None = None, profile: bool = False, moe_parallel: str = "ep",
              execution: Execution = Execution(), kv_dtypes=("auto",)) -> dict:
    gpus = gpus or torch.cuda.device_count()
    configs = configs or [("single", 1)] + [(m, k) for k in (2, 4) if k <= gpus for m in ("tp", "helix")]
    os.makedirs(out_dir, exist_ok=True)
    ceilings = measure_ceilings("cuda:0")
    log.info("ceilings: %s", ceilings)
    rows = []
    with RankPool(gpus, [f"cuda:{i}" for i in range(gpus)], collective_timeout_s=execution.collective_timeout_s) as pool:
        for mode, n in configs:
            for kv_dtype in kv_dtypes:
                per_rank = pool.run(rank_bench, preset, layers, mode, n, list(batches), list(contexts), tpb, iters,
                                    ceilings, execution, profile, moe_parallel, kv_dtype, n=n)
                for i, row in enumerate(per_rank[0]):  # rank 0's rows; each rank's profile split beside it
                    if profile:  # ranks that wait for each other show it as collective time on the faster one
                        row["profile"]["per_layer_us_by_rank"] = [r[i]["profile"]["per_layer_us"] for r in per_rank]
                    rows.append(row)
    full_cfg = get_preset(preset)
    gpu_mem = torch.cuda.get_device_properties(0).total_memory
    capacity = {f"{m}-x{n}" + ("-fp8" if kv == "fp8" else ""):
                kv_capacity(full_cfg, m, n, gpu_mem, resident_weight_bytes(full_cfg, m, n), kv)
                for m, n in configs for kv in kv_dtypes}
    card = ceilings["device"]
    result = {"card": card, "gpus": gpus, "preset": preset, "layers": layers, "tokens_per_block": tpb, "moe": moe_parallel,
              "kv_dtypes": list(kv_dtypes), "ceilings": ceilings, "kv_capacity_tokens": capacity,
              "kv_capacity_layers": full_cfg.num_hidden_layers, "rows": rows}
    base = os.path.join(out_dir, f"{kernel_bench.card_tag(card)}-x{gpus}" + ("-fp8kv" if "fp8" in kv_dtypes else ""))
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(markdown_table(result))
    plot(result, base)
    return result


BREAKDOWN = ("outside_kv", "kv_kernel", "merge", "weights", "collectives", "other", "idle")


def breakdown_line(b: dict) -> str:
    return ", ".join(f"{c} {b[c]:.1f}" for c in BREAKDOWN)


def profile_text(result: dict) -> str:
    out = []
    for r in result["rows"]:
        if "profile" in r:
            p = r["profile"]
            out.append(f"## {label(r)} B={r['batch']} S={r['context']}: {r['ms']:.3f} ms/step, GPU busy "
                       f"{p['busy_us_per_step'] / 1e3:.3f} ms in {p['kernels_per_step']:.0f} kernels")
            for rank, b in enumerate(p.get("per_layer_us_by_rank", [p["per_layer_us"]])):
                out.append(f"  per layer, rank {rank} (us): {breakdown_line(b)}")
            out += [f"  {k['us']:8.1f} us  x{k['count']:<5g} {k['name']}" for k in p["top"]]
    return "\n".join(out)


def label(row: dict) -> str:
    mode = row["mode"]
    if mode == "single":
        return "single GPU" + (" FP8 KV" if row.get("kv_dtype") == "fp8" else "")
    name = "Helix" if mode.startswith("helix") else "TP-attn"
    kv = " FP8 KV" if row.get("kv_dtype") == "fp8" else ""
    return f"{name} N={row['gpus']}" + (" HOP-B" if "hopb" in mode else "") + kv


def markdown_table(result: dict) -> str:
    c = result["ceilings"]
    lines = [f"# Decode latency: {result['card']} x{result['gpus']}, {result['preset']} ({result['layers']} layers)",
             "", f"Measured in the same run: read {c['read_GBps']:.0f} GB/s (best read-only stream), copy "
             f"{c['copy_GBps']:.0f} GB/s (read + write, not used in the floor), bf16 matmul {c['matmul_TFLOPs']:.0f} "
             "TFLOP/s; floor = max(bytes read / read, attention FLOPs / matmul) + collectives x in-graph latency. "
             "Median of CUDA-graph replays.", "",
             "| config | B | context | ms/token | tok/s/user | KV GB/rank | weights GB/rank | floor ms | x floor | collectives ms |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {label(r)} | {r['batch']} | {r['context'] // 1024}K | {r['ms']:.3f} | {r['tokens_per_s_per_user']:.0f} | "
                     f"{r['kv_bytes'] / 1e9:.2f} | {r['weight_bytes'] / 1e9:.2f} | {r['floor_ms']:.3f} | "
                     f"{r['vs_floor']:.2f} | {r['floor_parts']['collectives_ms']:.3f} |")
    profiled = [r for r in result["rows"] if "profile" in r]
    if profiled:
        lines += ["", "Per layer (us, rank 0, from `--profile`): outside_kv = (step time - KV kernel time) / layers; the "
                  "rest splits the GPU time by kernel (merge: log-sum-exp merges; weights: GEMVs and expert kernels; "
                  "other: norms, RoPE, routing choice, copies; idle: no kernel running).", "",
                  "| config | B | context | " + " | ".join(BREAKDOWN) + " |", "|---|---|---|" + "---|" * len(BREAKDOWN)]
        for r in profiled:
            b = r["profile"]["per_layer_us"]
            lines.append(f"| {label(r)} | {r['batch']} | {r['context'] // 1024}K | " +
                         " | ".join(f"{b[c]:.1f}" for c in BREAKDOWN) + " |")
    lines += ["", f"KV capacity per deployment (B = 1, all {result['kv_capacity_layers']} layers, 90% of GPU memory): " +
              ", ".join(f"{k}: {v / 1e6:.2f}M tokens" for k, v in result["kv_capacity_tokens"].items()), ""]
    return "\n".join(lines)


def plot(result: dict, base: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib missing: no plots")
        return
    rows = result["rows"]
    keys = sorted({(r["mode"], r["gpus"], r.get("kv_dtype", "auto")) for r in rows})
    names = {(r["mode"], r["gpus"], r.get("kv_dtype", "auto")): label(r) for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, batch in zip(axes, sorted({r["batch"] for r in rows})):
        for key in keys:
            pts = sorted((r["context"], r["ms"]) for r in rows
                         if (r["mode"], r["gpus"], r.get("kv_dtype", "auto"), r["batch"]) == (*key, batch))
            ax.plot([p[0] / 1024 for p in pts], [p[1] for p in pts], marker="o", label=names[key])
        ax.set_xscale("log", base=2)
        ax.set(title=f"B={batch}", xlabel="context (K tokens)", ylabel="ms / token")
        ax.legend()
    fig.suptitle(f"Decode latency, {result['card']}, {result['preset']} ({result['layers']} layers)")
    fig.tight_layout()
    fig.savefig(base + "-latency.png", dpi=110)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    top = max(r["context"] for r in rows)
    for key in keys:
        pts = sorted((r["batch"], r["tokens_per_s_per_user"]) for r in rows
                     if (r["mode"], r["gpus"], r.get("kv_dtype", "auto"), r["context"]) == (*key, top))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=names[key])
    ax.set(title=f"tokens/s/user at {top // 1024}K context", xlabel="batch", ylabel="tokens/s/user")
    ax.legend()
    fig.tight_layout()
    fig.savefig(base + "-throughput.png", dpi=110)
