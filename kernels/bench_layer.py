"""The decode layer's pieces outside the KV kernel, each against the form it replaced, in one run on one card
(docs/design.md §8.3; issue 15, point 3).

DeepSeek-V3-Lite shapes (D 2560, 32 heads, 72 experts top-6, I 1536, two shared experts), B = 1 by default:

* router: ``kernels.router`` (two Triton launches, no sort) against its torch twin compiled by inductor
  (``F.linear`` of the float32 gate + sigmoid / top-k / gather: the previous decode path);
* residual add + RMSNorm: ``kernels.rms_norm`` against an eager add and the inductor-fused norm;
* MoE: ``moe_decode`` with the shared expert inside against shared-expert GEMVs (gate, up, silu * up, down) +
  ``moe_decode`` + add, for one GPU (E_r 72, shared width 3072) and expert-parallel N = 2 (E_r 36, 1536); a few
  launch shapes of the new kernels;
* q / kv_a projections: one GEMV over the concatenated weights against two.

Each variant runs over ``layers`` distinct weight sets in one CUDA graph (more bytes than L2 holds, as in a
step where the KV stream evicts them), timed per layer: the median of graph replays / layers. Every new form is
checked against the old one first. ``python -m kernels.bench_layer --out DIR`` writes layer-<card>.json / .md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

from kernels.bench import card_tag, log, measure_read_bandwidth, rel_err, time_graph
from kernels.moe_decode import MoEConfig, moe_decode_triton
from kernels.rms_norm import add_rms_norm_triton, rms_norm_torch
from kernels.router import RouterSpec, route_torch, route_triton

D, E, K, I, HEADS, QK, LKV_R = 2560, 72, 6, 1536, 32, 192, 576
SPEC = RouterSpec(E, K, 1, 1, True, True, True, 2.0)


def per_layer(fn, layers: int) -> float:
    """us per layer of ``fn(i)`` for i in range(layers), all captured in one graph."""
    return time_graph(lambda: [fn(i) for i in range(layers)], replays=30) / layers * 1e6


def bench_router(layers: int, tokens: int) -> dict:
    xs = [torch.randn(tokens, D, device="cuda", dtype=torch.bfloat16) for _ in range(layers)]
    gates = [torch.randn(E, D, device="cuda") * D ** -0.5 for _ in range(layers)]
    biases = [torch.randn(E, device="cuda") * 0.1 for _ in range(layers)]
    old = torch.compile(route_torch, fullgraph=True)
    ids_old, w_old = old(xs[0], gates[0], biases[0], SPEC)
    ids_new, w_new = route_triton(xs[0], gates[0], biases[0], SPEC)
    assert torch.equal(ids_old.int(), ids_new), (ids_old, ids_new)
    out = {"check_weights_rel_err": rel_err(w_new, w_old),
           "inductor (previous)": per_layer(lambda i: old(xs[i], gates[i], biases[i], SPEC), layers)}
    for block_e in (1, 2, 4):
        out[f"triton block_e={block_e}"] = per_layer(lambda i: route_triton(xs[i], gates[i], biases[i], SPEC,
                                                                           block_e=block_e), layers)
    return out


def bench_norm(layers: int, tokens: int) -> dict:
    xs = [torch.randn(tokens, D, device="cuda", dtype=torch.bfloat16) for _ in range(layers)]
    ds = [torch.randn(tokens, D, device="cuda", dtype=torch.bfloat16) for _ in range(layers)]
    w = torch.rand(D, device="cuda", dtype=torch.bfloat16) + 0.5
    norm = torch.compile(rms_norm_torch, fullgraph=True)
    y_old = norm(xs[0] + ds[0], w, 1e-6)
    y_new, h_new = add_rms_norm_triton(xs[0], ds[0], w, 1e-6)
    assert torch.equal(h_new, xs[0] + ds[0])
    return {"check_rel_err": rel_err(y_new, y_old),
            "eager add + inductor norm (previous)": per_layer(lambda i: norm(xs[i] + ds[i], w, 1e-6), layers),
            "triton add_rms_norm": per_layer(lambda i: add_rms_norm_triton(xs[i], ds[i], w, 1e-6), layers)}


def bench_moe(layers: int, tokens: int, experts: int, shared_width: int) -> dict:
    def rand(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * shape[-1] ** -0.5

    sets = [(rand(experts, I, D), rand(experts, I, D), rand(experts, D, I),
             (rand(shared_width, D), rand(shared_width, D), rand(D, shared_width))) for _ in range(layers)]
    xs = [torch.randn(tokens, D, device="cuda", dtype=torch.bfloat16) for _ in range(layers)]
    g = torch.Generator().manual_seed(0)
    ids = [torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(tokens)]).cuda() for _ in range(layers)]
    wts = [torch.rand(tokens, K, device="cuda") for _ in range(layers)]

    def old(i):
        wg, wu, wd, (sg, su, sd) = sets[i]
        shared = F.linear(F.silu(F.linear(xs[i], sg)) * F.linear(xs[i], su), sd)
        return shared + moe_decode_triton(xs[i], wg, wu, wd, ids[i], wts[i])

    def new(i, config=None):
        wg, wu, wd, shared = sets[i]
        return moe_decode_triton(xs[i], wg, wu, wd, ids[i], wts[i], shared, config=config)

    local = sum(int(((t >= 0) & (t < experts)).sum()) for t in ids) / layers
    mb = (local * 3 * I * D + 3 * shared_width * D) * 2 / 1e6
    out = {"check_rel_err": rel_err(new(0), old(0)), "local_choices": local, "MB_per_layer": mb,
           "shared GEMVs + moe_decode + add (previous)": per_layer(old, layers)}
    for cfg in MOE_CONFIGS:
        out[f"fused {cfg}"] = per_layer(lambda i: new(i, cfg), layers)
    return out


MOE_CONFIGS = (MoEConfig(block_k=256), MoEConfig(), MoEConfig(block_k=1024, warps_2=8),
               MoEConfig(block_k=512, block_n=8), MoEConfig(block_k=512, block_n=32, warps_2=8),
               MoEConfig(block_k=512, stages=4), MoEConfig(block_k=512, stages=2),
               MoEConfig(block_k=512, block_d=512, warps_1=8), MoEConfig(block_k=512, block_i=8),
               MoEConfig(block_k=512, block_d=512, block_i=8, warps_1=8, stages=4))


def bench_qkv(layers: int, tokens: int) -> dict:
    qs = [torch.randn(HEADS * QK, D, device="cuda", dtype=torch.bfloat16) for _ in range(layers)]
    kvs = [torch.randn(LKV_R, D, device="cuda", dtype=torch.bfloat16) for _ in range(layers)]
    cats = [torch.cat([q, kv]) for q, kv in zip(qs, kvs)]
    xs = [torch.randn(tokens, D, device="cuda", dtype=torch.bfloat16) for _ in range(layers)]
    return {"two GEMVs (previous)": per_layer(lambda i: (F.linear(xs[i], qs[i]), F.linear(xs[i], kvs[i])), layers),
            "one GEMV, concatenated": per_layer(lambda i: F.linear(xs[i], cats[i]), layers),
            "MB_per_layer": cats[0].numel() * 2 / 1e6}


def markdown(res: dict) -> str:
    lines = [f"# Decode layer pieces outside the KV kernel: {res['card']}, T = {res['tokens']}", "",
             f"Read bandwidth {res['read_GBps']:.0f} GB/s (same run). us per layer, median of CUDA-graph "
             f"replays over {res['layers']} weight sets (`python -m kernels.bench_layer`).", ""]
    for part, figures in res["parts"].items():
        lines += [f"## {part}", "", "| variant | us / layer |", "|---|---|"]
        lines += [f"| {k} | {v:.2e} |" if k.startswith("check") else f"| {k} | {v:.2f} |" if isinstance(v, float)
                  else f"| {k} | {v} |" for k, v in figures.items()]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=1)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--out", default="golden/perf")
    args = p.parse_args(argv)
    ceil = measure_read_bandwidth()
    card = torch.cuda.get_device_name()
    parts = {"router": bench_router(64, args.tokens), "add + RMSNorm": bench_norm(args.layers, args.tokens),
             "MoE, one GPU (E_r 72, shared 3072)": bench_moe(4, args.tokens, 72, 2 * I),
             "MoE, EP N=2 rank (E_r 36, shared 1536)": bench_moe(4, args.tokens, 36, I),
             "q + kv_a projections": bench_qkv(args.layers, args.tokens)}
    # the read bandwidth beside, not as "ceilings": these are no floor-checked points (tests/test_perf_floors.py)
    res = {"card": card, "tokens": args.tokens, "layers": args.layers, "read_GBps": ceil["read_GBps"], "parts": parts}
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"layer-{card_tag(card)}")
    with open(base + ".json", "w") as f:
        json.dump(res, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(markdown(res))
    log(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
